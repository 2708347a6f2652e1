"""Verification: pick the path of a draft tree that the target model itself would have produced.

Glossary (as in vLLM's rejection sampler and Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding"):
- accepted tokens: draft tokens equal to what the target emits at their parent;
- bonus token: the token the target emits at the last accepted node (always one per step).

At every node on the walk the target's token is drawn by the request's Sampler from the
node's logits (argmax when greedy), and the walk descends into the child carrying that token.
The draw at output position i uses Gumbel noise fixed by (seed, i) alone (sampling.py), so the
emitted tokens are exactly AR's with the same seed whatever the tree held: lossless for greedy
and sampling alike. For deterministic drafts this is the multi-candidate rule of SpecInfer
(Miao et al. 2024); model drafters guess with the same noise (`Sampler.draft_with_prob`), which
couples their guesses to the target's picks (Daliri et al. 2024) in place of Leviathan et al.'s
min(1, p/q) test, whose output would depend on the draft.
"""
from __future__ import annotations

import torch

from fastdecode.sampling import Sampler, argmax_rows
from fastdecode.tree import DraftTree


def verify(
    logits: torch.Tensor, tree: DraftTree, sampler: Sampler, argmax: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """Walk the tree from the root. `logits`: [len(tree) + 1, vocab], row 0 = root; `argmax`:
    every row's argmax when the caller has computed it (used when the sampler is plain greedy).

    Returns (accepted input rows, starting with the root row 0; emitted tokens: accepted
    draft tokens followed by the bonus token). Every emitted token is recorded in the sampler.
    """
    children = tree.children()
    if sampler.plain_greedy:
        argmax = argmax if argmax is not None else argmax_rows(logits)  # one op for all rows
        pick = argmax.__getitem__
    else:
        def pick(row: int) -> int:
            return sampler.sample(logits[row])

    rows, emitted, row = [0], [], 0
    while True:
        token = pick(row)
        sampler.accept(token)
        emitted.append(token)
        row = children[row].get(token, -1)
        if row < 0:
            return rows, emitted
        rows.append(row)
