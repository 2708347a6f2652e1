"""SamplingParams and the per-request Sampler: logits processors, then greedy or seeded sampling.

The same Sampler scores a plain decoding step and every node a verifier walks through, so
temperature, top-k/p, min-p and the penalties shape one and the same target distribution
whichever decoding method runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Per-request settings, named and defaulted as in vLLM."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0 means greedy)"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= -1, "an integer >= 1, or 0 / -1 to disable"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 disables it)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "token ids >= 0"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer or None"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: must be {allowed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """The argmax of every row of `logits [rows, vocab]` (first index on ties, as torch.argmax).
    numpy's is ~25x faster than torch's on this CPU (5 vs 130 us for a 49152-wide row)."""
    return logits.numpy().argmax(-1).tolist()


class Sampler:
    """Turns one row of logits into the next token, tracking the counts the penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else int(torch.seed()) % 2**63)
        self.output_counts = torch.zeros(vocab_size, dtype=torch.float32)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)  # prompt + output, for repetition_penalty
        if prompt_ids:
            self.seen[torch.tensor(prompt_ids, dtype=torch.long).clamp_(0, vocab_size - 1)] = True

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalties: the token is argmax of the raw logits, so rows can be batched."""
        return self.params.greedy and not self.params.has_penalties

    def accept(self, token: int) -> None:
        """Record an emitted token (penalties of later positions depend on it)."""
        self.output_counts[token] += 1
        self.seen[token] = True

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The target distribution `[vocab]` for the next token after processing (temperature > 0)."""
        logits = self._penalized(logits)
        p = self.params
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1:
            sorted_p, order = torch.sort(probs, descending=True)
            # drop a token when the mass strictly before it already reaches top_p (the top one always stays)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= p.top_p
            drop[0] = False  # also when top_p is below fp32's smallest number (it rounds to 0)
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return probs / probs.sum()

    def sample(self, logits: torch.Tensor) -> int:
        """Next token from one row of fp32 logits `[vocab]`."""
        if self.params.greedy:
            return int(self._penalized(logits).numpy().argmax())
        return int(torch.multinomial(self.probs(logits), 1, generator=self.generator))

    def _penalized(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        logits = logits[: self.vocab_size]
        if not p.has_penalties:
            return logits
        logits = logits.clone()
        if p.repetition_penalty != 1:
            hit = logits[self.seen]
            logits[self.seen] = torch.where(hit > 0, hit / p.repetition_penalty, hit * p.repetition_penalty)
        if p.frequency_penalty:
            logits -= p.frequency_penalty * self.output_counts
        if p.presence_penalty:
            logits -= p.presence_penalty * (self.output_counts > 0).float()
        return logits
