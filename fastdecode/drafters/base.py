"""The Drafter protocol: every decoding method is a drafter; plain AR is the one that drafts nothing.

The engine calls, per request: `begin(prompt)`, then per step `propose(context, budget)` ->
DraftTree, then `update(step)` with what the target model said about that tree. The engine
never branches on a method's name; a drafter never touches the target model (model-based
drafters get an explicit handle at construction).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from fastdecode.config import ModelConfig
from fastdecode.kv_cache import KVCache
from fastdecode.sampling import TOP_K, Sampler, top_rows
from fastdecode.tree import DraftTree

if TYPE_CHECKING:
    from fastdecode.drafters.head import DraftHead
    from fastdecode.drafters.suffix import SuffixTrie
    from fastdecode.model import Transformer


@dataclass
class DrafterEnv:
    """What a drafter may know when it is built: the model's shape, this machine's cost curve, for
    drafters that draft with a model the target model and an optional draft model or head, an
    optional datastore for `suffix`, and the model's successor table for `recycling`."""

    config: ModelConfig
    cost: Callable[[int], float]  # time of an n-token forward over a 1-token one (measured lazily)
    model: "Transformer | None" = None  # the target (layerskip and early-exit drafts run parts of it)
    draft_model: "Callable[[], Transformer | None]" = lambda: None  # a separate draft model, loaded on first use
    draft_head: "Callable[[], DraftHead | None]" = lambda: None  # a trained draft head, loaded on first use
    datastore: "Callable[[], SuffixTrie | None]" = lambda: None  # a corpus trie for `suffix` (LLM(datastore=))
    # `recycling`'s starting matrix from the model itself (successors, logits), built on first use
    successor_table: "Callable[[], tuple[np.ndarray, np.ndarray] | None]" = lambda: None


@dataclass
class DraftRequest:
    """What a drafter may use of the request it drafts for (model-based drafters need both)."""

    sampler: Sampler  # the request's own: `Sampler.draft` guesses the target's pick from draft logits
    cache: KVCache  # the request's target KV cache: committed up to the last token of the context


@dataclass
class StepResult:
    """What one verification step decided, handed to the drafter so it can learn from it."""

    root: int  # the token the tree hung from
    tree: DraftTree
    logits: torch.Tensor  # [len(tree) + 1, vocab] fp32, row 0 = root
    accepted_rows: list[int]  # input rows kept (row 0 = root, then accepted draft nodes)
    emitted: list[int]  # tokens emitted this step: accepted draft tokens + the bonus token
    row_top: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # top_rows(logits, >= 1), if known

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every row's k largest logits (indices, values; sampling.top_rows), computed once a step
        for the verifier and every drafter: one pass over the rows' logits, which the forward has
        just pushed out of the caches (~80 us for 7 rows in place, a pass)."""
        if self.row_top is None or self.row_top[0].shape[1] < k:
            self.row_top = top_rows(self.logits, max(k, min(TOP_K, self.logits.shape[-1])))
        return self.row_top[0][:, :k], self.row_top[1][:, :k]

    def argmax(self) -> list[int]:
        """The argmax of every row (column 0 of `top`; numpy's argmax for rows without NaN)."""
        return self.top(1)[0][:, 0].tolist()


class Drafter(Protocol):
    def begin(self, prompt_ids: list[int], request: DraftRequest | None = None) -> None:
        """A new request starts with this prompt (the engine always passes `request`)."""

    def propose(self, context: list[int], budget: int) -> DraftTree:
        """A tree of at most `budget` nodes continuing `context` (prompt + output so far)."""

    def update(self, step: StepResult) -> None:
        """Learn from a verified step."""

    def end(self, output_ids: list[int]) -> None:
        """The request finished with this output (drafters with cross-request memory keep it)."""


class NoDraft:
    """Plain autoregressive decoding: an empty tree, so each step is one token."""

    def begin(self, prompt_ids: list[int], request: DraftRequest | None = None) -> None:
        return None

    def propose(self, context: list[int], budget: int) -> DraftTree:
        return DraftTree()

    def update(self, step: StepResult) -> None:
        return None

    def end(self, output_ids: list[int]) -> None:
        return None
