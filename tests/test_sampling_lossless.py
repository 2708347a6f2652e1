"""Lossless sampling: every method draws from the model's own distribution (temperature > 0).

Two checks, on the tiny random model (fp32):
- a goodness-of-fit test: the next 3 tokens drawn by each method, over many seeds, against the
  exact distribution of those 3 tokens, computed by enumerating every continuation the logits
  processors leave possible. A chi-square test must not reject (p > 0.001); an outcome the exact
  distribution gives probability 0 fails at once. Seeds are fixed, so the test is deterministic.
- the same seed gives the same tokens with every method as with `ar`. The verifier draws each
  emitted token from the target distribution with Gumbel noise fixed by (seed, output position),
  as AR does, so this is the expected behaviour, not a coincidence, also for the model drafters,
  whose guesses use that same noise.

Both use a prompt the model itself continues repetitively, so drafts really are accepted: a guard
asserts more than one token per step on average, or the checks would prove nothing.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from fastdecode import SamplingParams
from fastdecode.drafters import METHODS
from fastdecode.sampling import Sampler

SEED_TEXT = "the cat sat on the mat. the cat sat on the"
LENGTH = 3  # tokens per sample
SAMPLES = 600
# The tiny random model is nearly uniform over its 320 tokens, so every setting bounds the support
# with top_k (27 to 125 possible 3-token outcomes) while varying the other processors.
SETTINGS = {
    "t1.0-top_k3": dict(temperature=1.0, top_k=3),
    "t1.2-top_k4-min_p0.1-rep1.3": dict(temperature=1.2, top_k=4, min_p=0.1, repetition_penalty=1.3),
    "t1.5-top_k5-top_p0.9": dict(temperature=1.5, top_k=5, top_p=0.9),
}


@pytest.fixture(scope="module")
def prompt_ids(tiny_llm) -> list[int]:
    """The seed text plus the model's own greedy continuation: text the model tends to repeat."""
    seed = tiny_llm.tokenizer.encode(SEED_TEXT)
    out = tiny_llm.generate(seed, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))[0]
    return seed + out.token_ids


def exact_distribution(llm, prompt_ids: list[int], params: SamplingParams, length: int) -> dict[tuple, float]:
    """P(next `length` tokens) under `params`, by enumerating every prefix of nonzero probability."""
    model, vocab = llm.model, llm.model.cfg.vocab_size
    dist: dict[tuple, float] = {}

    def expand(prefix: tuple[int, ...], prob: float) -> None:
        if len(prefix) == length:
            dist[prefix] = prob
            return
        ids = prompt_ids + list(prefix)
        logits = model(torch.tensor(ids), torch.arange(len(ids)), model.new_cache(), last_only=True)[0]
        sampler = Sampler(params, prompt_ids, vocab)
        for token in prefix:
            sampler.accept(token)
        p = sampler.probs(logits).double()
        for token in torch.nonzero(p).flatten().tolist():
            expand(prefix + (token,), prob * float(p[token]))

    expand((), 1.0)
    assert abs(sum(dist.values()) - 1) < 1e-6
    return dist


def chi_square_p(counts: Counter, expected: dict[tuple, float], n: int) -> float:
    """p-value of Pearson's chi-square test; outcomes expected < 5 times are pooled into one bin."""
    big = [k for k, p in expected.items() if p * n >= 5]
    obs = [counts.get(k, 0) for k in big]
    exp = [expected[k] * n for k in big]
    rest_exp, rest_obs = n - sum(exp), n - sum(obs)
    if rest_exp >= 1:
        obs.append(rest_obs)
        exp.append(rest_exp)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = len(obs) - 1
    assert df >= 2, "too few bins for a meaningful test"
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def draw(llm, prompt_ids: list[int], settings: dict, method: str, n: int) -> tuple[Counter, float]:
    """n samples of LENGTH tokens (seeds 0..n-1); returns their counts and tokens per step."""
    counts: Counter = Counter()
    tokens = steps = 0
    for seed in range(n):
        params = SamplingParams(max_tokens=LENGTH, ignore_eos=True, seed=seed, **settings)
        out = llm.generate(prompt_ids, params, method=method)[0]
        counts[tuple(out.token_ids)] += 1
        tokens += len(out.token_ids) - 1  # the first token comes from the prefill
        steps += out.metrics.steps
    return counts, tokens / max(steps, 1)


@pytest.fixture(scope="module")
def exact(tiny_llm, prompt_ids) -> dict[str, dict[tuple, float]]:
    return {name: exact_distribution(tiny_llm, prompt_ids, SamplingParams(**s), LENGTH) for name, s in SETTINGS.items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_samples_follow_the_model_distribution(tiny_llm, prompt_ids, exact, method: str) -> None:
    taus = []
    for name, settings in SETTINGS.items():
        counts, tau = draw(tiny_llm, prompt_ids, settings, method, SAMPLES)
        impossible = [k for k in counts if k not in exact[name]]
        assert not impossible, f"{method} {name}: drew {impossible[0]}, which has probability 0"
        p = chi_square_p(counts, exact[name], SAMPLES)
        assert p > 1e-3, f"{method} {name}: chi-square rejects the model's distribution (p = {p:.2e})"
        taus.append(tau)
    if method != "ar":  # the guard: drafts were accepted, so verification was exercised
        assert max(taus) > 1.05, f"{method}: tokens per step {taus}; no draft was ever accepted"


def test_the_test_detects_a_wrong_distribution(tiny_llm, prompt_ids, exact) -> None:
    """Top-2 samples judged against the exact top-3 distribution: every drawn outcome is possible
    there, but most of that distribution's outcomes never appear, and the test must say so."""
    counts, _ = draw(tiny_llm, prompt_ids, dict(temperature=1.0, top_k=2), "ar", SAMPLES)
    wrong = exact["t1.0-top_k3"]
    assert all(k in wrong for k in counts)
    assert chi_square_p(counts, wrong, SAMPLES) < 1e-3


@pytest.mark.parametrize("method", [m for m in METHODS if m != "ar"])
def test_a_seed_gives_the_same_tokens_as_ar(tiny_llm, prompt_ids, method: str) -> None:
    for seed in range(20):
        params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=seed)
        want = tiny_llm.generate(prompt_ids, params, method="ar")[0].token_ids
        assert tiny_llm.generate(prompt_ids, params, method=method)[0].token_ids == want, f"seed {seed}"
