"""Decoding methods by name. Each entry builds a Drafter for one LLM instance (it may keep
memory across that instance's requests); the engine only ever sees the Drafter protocol."""
from __future__ import annotations

from collections.abc import Callable

from fastdecode.config import ModelConfig
from fastdecode.drafters.base import Drafter, NoDraft
from fastdecode.drafters.aded import Aded
from fastdecode.drafters.lookahead import Lookahead
from fastdecode.drafters.ngram import PromptLookupDrafter
from fastdecode.drafters.recycling import TokenRecycling
from fastdecode.drafters.suffix import SuffixDrafter

METHODS: dict[str, Callable[[ModelConfig], Drafter]] = {
    "ar": lambda cfg: NoDraft(),
    "recycling": lambda cfg: TokenRecycling(cfg.vocab_size),
    "aded": lambda cfg: Aded(),
    "lookahead": lambda cfg: Lookahead(),
    "pld": lambda cfg: PromptLookupDrafter(),
    "suffix": lambda cfg: SuffixDrafter(),
}


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return name
