"""Decoding methods by name. Each entry builds a Drafter for one LLM instance (it may keep
memory across that instance's requests); the engine only ever sees the Drafter protocol."""
from __future__ import annotations

from collections.abc import Callable

from fastdecode.drafters.auto import AutoDrafter
from fastdecode.drafters.base import Drafter, DrafterEnv, NoDraft
from fastdecode.drafters.aded import Aded
from fastdecode.drafters.head import head_drafter
from fastdecode.drafters.lookahead import Lookahead
from fastdecode.drafters.model import draft_model, layer_skip
from fastdecode.drafters.ngram import PromptLookupDrafter
from fastdecode.drafters.recycling import TokenRecycling
from fastdecode.drafters.suffix import SuffixDrafter

METHODS: dict[str, Callable[[DrafterEnv], Drafter]] = {
    "ar": lambda env: NoDraft(),
    "recycling": lambda env: TokenRecycling(env.config.vocab_size, table=env.successor_table()),
    "aded": lambda env: Aded(),
    "lookahead": lambda env: Lookahead(),
    "pld": lambda env: PromptLookupDrafter(),
    "suffix": lambda env: SuffixDrafter(datastore=env.datastore()),
    "layerskip": layer_skip,
    "draft": draft_model,
    "head": head_drafter,
    "auto": lambda env: AutoDrafter({name: AUTO_MEMBER_OPTIONS.get(name, METHODS[name])(env)
                                     for name in auto_members(env)}, env.cost),
}
# Members of `auto`: drafters that accept any tree in update(). Lookahead is left out: its
# Jacobi window only advances when its own window rows are verified. Recycling was left out while
# its update (the top 8 of every verified row, numpy) cost ~0.7 ms of a ~10 ms step; the native
# top-k (csrc/sampling.cpp) made that a few microseconds a row. In `fastdecode bench --limit 10
# --max-new-tokens 256` (bf16, AVX512-BF16 EPYC, 2 threads) auto went from 1.78x our AR, tau 2.44
# (without recycling, docs/bench/avx512-bf16) to 1.85x, tau 2.71 (with it, docs/bench/avx512-bf16-auto4).
# `pld` was a member too until its n-gram matches proved to add nothing `suffix` lacks: without it,
# two A/B runs in one process each (bf16, 256 tokens, greedy) gave tau 2.71 vs 2.71 and 281.6 vs
# 280.3 decode tok/s over 28 Spec-Bench prompts, tau 2.61 vs 2.63 and 277.0 vs 273.5 over 42; the
# time of its proposals (~0.07 ms a step) is saved.
AUTO_MEMBERS = ("suffix", "aded", "recycling")
# Members built otherwise inside `auto` than alone. `suffix` alone drafts nodes it rates >= 0.3
# (its match confidence tops out at 0.9 a token, so its chains stop at 11 deep); `auto` weighs
# every node by measured acceptance, so its suffix member offers nodes down to 0.1 (21 deep at 0.9
# a token; 32 at most), which long copies accept whole. Interleaved A/B (greedy, budget 24, 21
# Spec-Bench prompts, 256 tokens): 197.4 decode tok/s, tau 3.52, against 183.0, tau 3.29 with the
# member as `suffix` alone; down to 0.05 and 48 deep: tau 3.61 but 192.0 (larger trees, more
# Python a step).
AUTO_MEMBER_OPTIONS: dict[str, Callable[[DrafterEnv], Drafter]] = {
    "suffix": lambda env: SuffixDrafter(min_score=0.1, max_draft_depth=32, datastore=env.datastore()),
}


def auto_members(env: DrafterEnv) -> tuple[str, ...]:
    """AUTO_MEMBERS, and `head` when the LLM was given a trained draft head (`draft_head=`)."""
    return AUTO_MEMBERS + (("head",) if env.draft_head() is not None else ())


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return name
