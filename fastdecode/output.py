"""Request outputs and the text side of generation: detokenization, stop conditions, stream deltas."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastdecode.sampling import SamplingParams


@dataclass
class Metrics:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0  # target forwards after prefill
    tokens: int = 0  # generated tokens
    drafted: int = 0  # draft nodes sent to the target
    cached_tokens: int = 0  # prompt tokens whose K/V a cached prefix already held (not prefilled)

    @property
    def accepted_per_step(self) -> float:
        """tau: tokens emitted per target forward; the first token comes from the prefill."""
        return (self.tokens - 1) / self.steps if self.steps else 1.0

    def as_dict(self) -> dict[str, float]:
        return {
            "prefill_s": self.prefill_s, "decode_s": self.decode_s, "steps": self.steps,
            "tokens": self.tokens, "drafted": self.drafted, "accepted_per_step": self.accepted_per_step,
        }


@dataclass
class RequestOutput:
    prompt: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    metrics: Metrics = field(default_factory=Metrics)


class TextTracker:
    """Adds tokens one at a time and decides when the request ends, exactly as AR would.

    A stop token (EOS unless ignore_eos, or stop_token_ids) is kept in token_ids but not in
    the text; a stop string is cut from the text with everything after it.
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: list[int], out: RequestOutput) -> None:
        self.tokenizer, self.params, self.out = tokenizer, params, out
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.max_stop = max((len(s) for s in params.stop), default=0)
        self.sent = 0  # characters already streamed

    def add(self, token: int) -> bool:
        """Append one token; True when the request has finished (then ignore later tokens)."""
        out = self.out
        out.token_ids.append(token)
        if token in self.stop_ids:
            out.finish_reason = "stop"
        elif self.params.stop and self._cut_stop_string():
            out.finish_reason = "stop"
        elif len(out.token_ids) >= self.params.max_tokens:
            out.finish_reason = "length"
        return out.finish_reason is not None

    def finish(self, reason: str | None = None) -> None:
        """Settle the final text (and a finish reason forced from outside, e.g. a full context)."""
        if self.out.finish_reason is None:
            self.out.finish_reason = reason or "length"
        if not self.params.stop or self.out.finish_reason != "stop" or self.out.token_ids[-1] in self.stop_ids:
            self.out.text = self._decode()

    def delta(self) -> str:
        """New text safe to show now: no half UTF-8 character, no text that may become a stop string."""
        text = self.out.text if self.out.finish_reason else self._decode()
        if self.out.finish_reason is None:
            end = len(text.rstrip("\ufffd"))  # an incomplete byte sequence decodes to U+FFFD
            if self.max_stop:
                end = min(end, len(text) - (self.max_stop - 1))
            text = text[: max(end, self.sent)]
        piece, self.sent = text[self.sent :], max(self.sent, len(text))
        return piece

    def _decode(self) -> str:
        return self.tokenizer.decode(self.out.token_ids, skip_special_tokens=True)

    def _cut_stop_string(self) -> bool:
        text = self._decode()
        start = max(0, len(self.out.text) - self.max_stop)  # a stop string may straddle the last cut
        hits = [i for s in self.params.stop if (i := text.find(s, start)) >= 0]
        if hits:
            self.out.text = text[: min(hits)]
            return True
        self.out.text = text
        return False
