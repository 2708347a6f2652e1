"""The generation loop for one sequence: prefill, then steps of propose -> verify -> commit.

    tokens so far --> drafter.propose --> DraftTree
      --> model.forward(root + tree, positions = base + depth, mask = ancestors only)
      --> verify (walk from the root) --> cache.keep(accepted rows) --> drafter.update --> text

Plain AR is the same loop with a drafter that proposes nothing. The cache length is owned
here, never inside the model.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fastdecode.drafters.base import Drafter, DraftRequest, StepResult
from fastdecode.kv_cache import KVCache
from fastdecode.model import Segment, Transformer
from fastdecode.output import RequestOutput, TextTracker
from fastdecode.sampling import Sampler, SamplingParams
from fastdecode.tree import DraftTree
from fastdecode.verify import verify


class Engine:
    def __init__(self, model: Transformer, tokenizer: Any, eos_ids: list[int], prefix_cache: bool = False) -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.cache: KVCache = model.new_cache()  # one sequence at a time, reused across requests
        self.prefix_cache = prefix_cache  # keep the K/V of a prefix the next prompt shares (needs exact rows)

    def run(
        self, prompt: str, prompt_ids: list[int], params: SamplingParams, drafter: Drafter, budget: int
    ) -> Iterator[tuple[RequestOutput, TextTracker]]:
        """Generate; yields after the prefill and after every step, last with finish_reason set."""
        check_prompt(prompt_ids, self.cache.max_len, self.model.cfg.vocab_size)
        out = RequestOutput(prompt, list(prompt_ids))
        tracker = TextTracker(self.tokenizer, params, self.eos_ids, out)
        sampler = Sampler(params, prompt_ids, self.model.cfg.vocab_size)
        drafter.begin(list(prompt_ids), DraftRequest(sampler, self.cache))
        start = time.perf_counter()
        done = self._prefill(prompt_ids, sampler, tracker)
        out.metrics.prefill_s = time.perf_counter() - start
        yield out, tracker
        while not done:
            done = self._step(out, sampler, tracker, drafter, budget)
            out.metrics.decode_s = time.perf_counter() - start - out.metrics.prefill_s
            yield out, tracker
        drafter.end(list(out.token_ids))
        self.cache.remember(out.prompt_token_ids + out.token_ids)

    def _prefill(self, prompt_ids: list[int], sampler: Sampler, tracker: TextTracker) -> bool:
        start_prefill(self.cache, prompt_ids, self.prefix_cache, tracker.out)
        seg = prefill_segment(prompt_ids, self.cache)
        logits = self.model(seg.tokens, seg.positions, self.cache, last_only=True)
        return commit_prefill(logits, sampler, tracker, self.cache)

    def _step(
        self, out: RequestOutput, sampler: Sampler, tracker: TextTracker, drafter: Drafter, budget: int
    ) -> bool:
        room = self.cache.max_len - self.cache.length - 1  # slots left beside the root's
        if room < 0:
            tracker.finish("length")
            return True
        tree = propose(drafter, out, budget, room)
        root = out.token_ids[-1]
        segment = tree_segment(root, tree, self.cache)
        logits = self.model(segment.tokens, segment.positions, self.cache, segment.mask)
        return commit_step(logits, root, tree, sampler, tracker, drafter, self.cache, self.model.row_top)


def check_prompt(prompt_ids: list[int], max_len: int, vocab: int) -> None:
    """Raise ValueError unless the prompt is non-empty, leaves room for a token and is in the vocabulary."""
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    if len(prompt_ids) >= max_len:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens does not fit the context length {max_len} "
            f"(prompt + at least one generated token must fit)"
        )
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")


MAX_TREE_NODES = 63  # a step's forward is at most 64 tokens: the attention core's bound for tree rows


def propose(drafter: Drafter, out: RequestOutput, budget: int, room: int) -> DraftTree:
    """The drafter's tree for the next step, cut to the `room` pending slots the cache has left and
    to MAX_TREE_NODES (a tree row of the AMX attention core sees at most 64 new slots, which keeps
    its bits equal to the one-token forward's: csrc/attention_512.cpp)."""
    room = min(room, MAX_TREE_NODES)
    tree = drafter.propose(out.prompt_token_ids + out.token_ids, min(budget, room))
    if len(tree) > room:  # parents precede children, so any prefix of a tree is a tree
        tree = DraftTree(tree.tokens[:room], tree.parents[:room])
    return tree


def tree_segment(root: int, tree: DraftTree, cache: KVCache) -> Segment:
    """The inputs of one target forward over [root] + tree (mask None when there is no tree)."""
    tokens = torch.tensor([root] + tree.tokens, dtype=torch.long)
    if not tree:
        return Segment(tokens, torch.tensor([cache.length]), cache)
    length = cache.length
    positions = torch.tensor([length + depth for depth in tree.depths()])
    mask = np.ones((len(tokens), length + len(tokens)), dtype=bool)  # numpy: fewer, cheaper ops
    mask[:, length:] = tree.ancestor_rows()
    return Segment(tokens, positions, cache, torch.from_numpy(mask))


def start_prefill(cache: KVCache, prompt_ids: list[int], reuse: bool, out: RequestOutput) -> None:
    """Ready `cache` for a new prompt: keep the slots of the prefix it shares with what the cache
    last held when `reuse` (the model has exact rows), else empty it."""
    if not reuse:
        cache.truncate(0)
    out.metrics.cached_tokens = cache.reuse(prompt_ids)  # an empty cache shares nothing


def prefill_segment(prompt_ids: list[int], cache: KVCache, chunk: int | None = None) -> Segment:
    """The next piece of a prefill: the prompt from its first uncommitted token, at most `chunk`
    tokens of it (None: all), wanting the logits of its last row."""
    start = cache.length
    end = len(prompt_ids) if chunk is None else min(len(prompt_ids), start + chunk)
    return Segment(torch.tensor(prompt_ids[start:end], dtype=torch.long), torch.arange(start, end), cache,
                   last_only=True)


def commit_prefill(logits: torch.Tensor, sampler: Sampler, tracker: TextTracker, cache: KVCache) -> bool:
    """Commit the rest of a prompt's pending K/V and emit the first token from its last row's logits
    `[1, vocab]`; the cache then remembers the prompt (a stream given up later can still share it)."""
    prompt = tracker.out.prompt_token_ids
    cache.append(len(prompt) - cache.length)
    cache.remember(prompt)
    token = sampler.sample(logits[0])
    sampler.accept(token)
    return emit([token], tracker)


def commit_step(
    logits: torch.Tensor, root: int, tree: DraftTree, sampler: Sampler, tracker: TextTracker, drafter: Drafter,
    cache: KVCache, row_top: tuple[np.ndarray, np.ndarray] | None = None,
) -> bool:
    """Verify a forward's logits `[len(tree) + 1, vocab]`, keep the accepted rows, tell the drafter,
    emit the tokens; True when the request has finished. row_top: the rows' top logits if the
    forward ranked them (Transformer.row_top)."""
    step = StepResult(root, tree, logits, [], [], row_top)
    argmax = step.argmax() if sampler.plain_greedy else None  # the walk's; its pass serves the drafters too
    step.accepted_rows, step.emitted = verify(logits, tree, sampler, argmax)
    rows, emitted = step.accepted_rows, step.emitted
    cache.keep(rows)
    drafter.update(step)
    tracker.out.metrics.steps += 1
    tracker.out.metrics.drafted += len(tree)
    return emit(emitted, tracker)


def emit(tokens: list[int], tracker: TextTracker) -> bool:
    """Feed emitted tokens to the stop checks; tokens after a stop are dropped, as AR never made them."""
    for token in tokens:
        if tracker.add(token):
            tracker.finish()
            tracker.out.metrics.tokens = len(tracker.out.token_ids)
            return True
    tracker.out.metrics.tokens = len(tracker.out.token_ids)
    return False
