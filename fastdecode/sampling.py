"""SamplingParams and the per-request Sampler: logits processors, then greedy or seeded sampling.

The same Sampler scores a plain decoding step and every node a verifier walks through, so
temperature, top-k/p, min-p and the penalties shape one and the same target distribution
whichever decoding method runs.

Sampling is the Gumbel-max trick with noise fixed per output position, in its exponential-race
form: the token at output index i is argmax_t p_i[t] / E_i[t] (= argmax log p_i[t] + g_i[t] with
g = -log E, a Gumbel(0, 1) draw), where E_i[t] = -log U is an Exp(1) draw made from a hash of
(seed, i, t) alone. That is an exact draw from p_i, and it makes the output a function of the
seed and the model only: a drafter that knows the noise can guess the target's pick
(`Sampler.draft_with_prob`), and whatever it guesses, the emitted tokens are those AR gives with
the same seed (Daliri et al. 2024, "Drafter-invariant speculative decoding"). Where the kernels
are built, a draw is one native call (csrc/sampling.cpp, `sample_row`: the processors, softmax,
nucleus and race in one pass); elsewhere `Sampler.probs` and `race_pick` in torch and numpy. The
two agree to fp32 rounding (tested); within a process every method and AR share one of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fastdecode.kernels import race_pick_op, sample_row_op, top_k_rows_op


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


TOP_K = 8  # the row top every step computes once (StepResult.top): the greedy walk's argmax and the drafters'


def top_rows(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest logits, largest first, the lower index first among equals: (indices
    int64 [rows, k], values float32 [rows, k]). Column 0 is `argmax_rows` wherever a row has no
    NaN. Native where built (one pass a row: NaNs never picked, -1 and 0 past a row's non-NaN
    values); else numpy, which reads NaN as -inf."""
    logits = logits.float().contiguous()
    op = top_k_rows_op()
    if op is not None:
        top, values = op(logits, k)
        return top.numpy(), values.numpy()
    x = np.nan_to_num(logits.numpy(), nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    kth = np.take_along_axis(x, top_k_rows(x, k), 1).min(-1)  # each row's k-th largest value
    top = np.empty((len(x), k), dtype=np.int64)
    for r, row in enumerate(x):  # those above the k-th, then the lowest indices equal to it
        above = np.flatnonzero(row > kth[r])
        top[r] = np.concatenate([above, np.flatnonzero(row == kth[r])[: k - len(above)]])
    values = np.take_along_axis(x, top, 1)
    order = np.lexsort((top, -values), axis=-1)  # value descending, then index
    return np.take_along_axis(top, order, 1), np.take_along_axis(values, order, 1).astype(np.float32)


def top_k_rows(x: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Indices of the k largest entries of every row of `x [n, V]`, largest first (ties in any
    order; `top_rows` orders them). The top k of a row lie in the k chunks with the largest
    maxima, so only those are searched: 0.36 ms for 9 rows of 49152 against 0.55 ms for
    torch.topk on this CPU."""
    n, v = x.shape
    if v % chunk or v // chunk < 4 * k:  # small vocabularies: search the whole row
        top = np.argpartition(x, -k, axis=-1)[:, -k:] if k < v else np.tile(np.arange(v), (n, 1))
    else:
        c = x.reshape(n, v // chunk, chunk)
        best = np.argpartition(c.max(-1), -k, axis=-1)[:, -k:]  # [n, k] chunks
        candidates = np.take_along_axis(c, best[:, :, None], 1).reshape(n, k * chunk)
        index = (best[:, :, None] * chunk + np.arange(chunk)).reshape(n, k * chunk)
        pick = np.argpartition(candidates, -k, axis=-1)[:, -k:]
        top = np.take_along_axis(index, pick, 1)
    order = np.argsort(-np.take_along_axis(x, top, 1), axis=-1, kind="stable")
    return np.take_along_axis(top, order, 1)


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (Steele et al. 2014): a bijective 64-bit mixer, elementwise."""
    z = z + _MIX[0]
    z = (z ^ (z >> np.uint64(30))) * _MIX[1]
    z = (z ^ (z >> np.uint64(27))) * _MIX[2]
    return z ^ (z >> np.uint64(31))


def race_uniform(seed: int, index: int, tokens: np.ndarray) -> np.ndarray:
    """U(0, 1) draws (53 bits) for `tokens` at output position `index`: a hash of (seed, index,
    token), so any subset of the vocabulary costs only its own size."""
    key = _splitmix64(np.array([seed % 2**64], dtype=np.uint64) ^ _splitmix64(np.array([index], dtype=np.uint64)))
    bits = _splitmix64(key ^ (tokens.astype(np.uint64) * _MIX[2]))
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53


def int64_seed(seed: int) -> int:
    """The seed's low 64 bits as a signed int64 (what the native ops take)."""
    low = seed % 2**64
    return low - 2**64 if low >= 2**63 else low


def race_pick(probs: np.ndarray, seed: int, index: int) -> int:
    """argmax over the tokens of nonzero probability of p / E, E = -log(race_uniform): an exact
    draw from `probs` (float32 [vocab]); ties go to the lowest id. The native op gives the same
    token and is ~10x faster over a whole vocabulary."""
    op = race_pick_op()
    if op is not None:
        token = op(torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32)), int64_seed(seed), index)
    else:
        support = np.flatnonzero(probs > 0)
        token = -1 if not len(support) else int(support[
            (probs[support].astype(np.float64) / -np.log(race_uniform(seed, index, support))).argmax()])
    if token < 0:
        raise ValueError("no token has a nonzero probability")
    return token


NUCLEUS_CUT = 1e-4  # top_p first looks among the tokens of at least this times the best one's probability


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the nucleus: best first (equal probabilities: lower id first), drop a token when the
    mass strictly before it already reaches top_p; the top token always stays (also when top_p is
    below fp32's smallest number). Only the candidates are sorted: the tokens within NUCLEUS_CUT of
    the best, or every token of nonzero probability when those do not reach top_p. In decoding
    (SmolLM2-135M, T 0.7, top-p 0.9) this costs 0.135 ms a row, where a torch.topk probe of the
    best 512 tokens cost 0.27 (0.02 and 0.1 when called in a loop, with warm caches)."""
    p = probs.numpy()
    kept = _nucleus(p, np.flatnonzero(p >= p.max() * NUCLEUS_CUT), top_p, every=False)
    if kept is None:  # the candidates hold less than top_p: every token of nonzero probability is one
        kept = _nucleus(p, np.flatnonzero(p), top_p, every=True)
    out = np.zeros_like(p)
    out[kept] = p[kept]
    return torch.from_numpy(out)


def _nucleus(p: np.ndarray, ids: np.ndarray, top_p: float, every: bool) -> np.ndarray | None:
    """The nucleus among the candidates `ids` (ascending; every other token's probability is below
    theirs), or None when they hold less than top_p and are not `every` token (then the rest would
    have less than top_p before them, and some would stay)."""
    if not len(ids):
        return ids if every else None
    cand = p[ids]
    order = np.argsort(-cand, kind="stable")  # best first; ids ascend, so ties keep the lower id first
    best = cand[order]
    mass = np.cumsum(best)  # fp32, in order, as a full sort's would begin
    if mass[-1] < top_p and not every:
        return None
    keep = (mass - best) < top_p
    keep[0] = True
    return ids[order[keep]]


class Sampler:
    """Turns one row of logits into the next token, tracking the counts the penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.seed = params.seed if params.seed is not None else int(torch.seed())
        self.count = 0  # tokens accepted so far: the output index of the next one
        # numpy, as a scalar update of a torch tensor costs ~10 us and every emitted token makes two
        self.output_counts = np.zeros(vocab_size, dtype=np.float32)
        self.seen = np.zeros(vocab_size, dtype=bool)  # prompt + output, for repetition_penalty
        if prompt_ids:
            self.seen[np.clip(np.asarray(prompt_ids, dtype=np.int64), 0, vocab_size - 1)] = True

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalties: the token is argmax of the raw logits, so rows can be batched."""
        return self.params.greedy and not self.params.has_penalties

    def accept(self, token: int) -> None:
        """Record an emitted token (penalties of later positions depend on it; without penalties
        only the output index moves: numpy's scalar updates cost ~20 us each right after a
        forward, which has pushed their code and data out of the caches)."""
        self.count += 1
        if self.params.has_penalties:
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
            probs = _top_p(probs, p.top_p)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return probs / probs.sum()

    def sample(self, logits: torch.Tensor) -> int:
        """Next token (output index `count`) from one row of fp32 logits `[vocab]`."""
        return self.draft(logits, 0)

    def draft(self, logits: torch.Tensor, ahead: int) -> int:
        """The token this sampler would pick `ahead` positions after the next one (output index
        `count + ahead`) if `logits` were the target's there: drafters pass their own logits to
        guess the target's pick; ahead = 0 with the target's logits is `sample`."""
        if self.params.greedy:
            return int(self._penalized(logits).numpy().argmax())
        return self._draw(logits, ahead)[0]

    def draft_with_prob(self, logits: torch.Tensor, ahead: int) -> tuple[int, float]:
        """`draft`, and the probability `logits` give that token after processing (a drafter's
        confidence; at temperature 0, the plain softmax's)."""
        if self.params.greedy:
            logits = self._penalized(logits)
            token = int(logits.numpy().argmax())
            return token, float(torch.softmax(logits, -1)[token])
        return self._draw(logits, ahead)

    def race_order(self, tokens: np.ndarray, weights: np.ndarray, ahead: int) -> list[int]:
        """Indices of candidate `tokens` best first by the race at output index count + ahead, if
        their probabilities there were proportional to `weights` (>= 0; 0 = never picked, last):
        a drafter that holds a guess of the distribution (stale logits, counts) orders its
        candidates by the noise the target will use, so its first guess is the target's pick
        whenever the guess is close (the Gumbel coupling of Daliri et al. 2024)."""
        race = weights / -np.log(race_uniform(self.seed, self.count + ahead, tokens))
        return np.argsort(-race, kind="stable").tolist()

    def _draw(self, logits: torch.Tensor, ahead: int) -> tuple[int, float]:
        """The seeded draw at output index count + ahead, and its probability after processing."""
        op = sample_row_op()
        if op is None:
            probs = self.probs(logits).numpy()
            token = race_pick(probs, self.seed, self.count + ahead)
            return token, float(probs[token])
        p = self.params
        row = self._penalized(logits).float().contiguous()
        token, prob = op(row, p.temperature, p.top_k, p.top_p, p.min_p, NUCLEUS_CUT, int64_seed(self.seed), self.count + ahead)
        if token < 0:
            raise ValueError("no token has a nonzero probability")
        return token, prob

    def _penalized(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        logits = logits[: self.vocab_size]
        if not p.has_penalties:
            return logits
        logits = logits.clone()
        counts = torch.from_numpy(self.output_counts)
        if p.repetition_penalty != 1:
            seen = torch.from_numpy(self.seen)
            hit = logits[seen]
            logits[seen] = torch.where(hit > 0, hit / p.repetition_penalty, hit * p.repetition_penalty)
        if p.frequency_penalty:
            logits -= p.frequency_penalty * counts
        if p.presence_penalty:
            logits -= p.presence_penalty * (counts > 0).float()
        return logits
