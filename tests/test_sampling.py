"""Sampling behaviour: seeds, excluded tokens, penalties, stop strings, streaming."""
from __future__ import annotations

import pytest
import numpy as np
import torch

from fastdecode import SamplingParams
from fastdecode.sampling import Sampler

PROMPT = "Once upon a time"


def test_same_seed_same_output_and_different_seed_differs(tiny_llm) -> None:
    p = SamplingParams(max_tokens=24, temperature=1.0, seed=123)
    a = tiny_llm.generate(PROMPT, p)[0].token_ids
    b = tiny_llm.generate(PROMPT, p)[0].token_ids
    c = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=24, temperature=1.0, seed=124))[0].token_ids
    assert a == b
    assert a != c


def _allowed(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    probs = Sampler(params, [], logits.shape[0]).probs(logits)
    return set(torch.nonzero(probs > 0).flatten().tolist())


def test_top_k_top_p_min_p_never_emit_an_excluded_token() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    order = torch.argsort(logits, descending=True).tolist()
    probs = torch.softmax(logits, -1)
    assert _allowed(logits, SamplingParams(temperature=1.0, top_k=5)) == set(order[:5])
    cum = torch.cumsum(probs[order], 0)
    nucleus = set(order[: int((cum < 0.6).sum()) + 1])
    assert 1 < len(nucleus) < 50
    assert _allowed(logits, SamplingParams(temperature=1.0, top_p=0.6)) == nucleus
    assert _allowed(logits, SamplingParams(temperature=1.0, min_p=0.2)) == set(
        torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist()
    )
    for params, allowed in [
        (SamplingParams(temperature=1.5, top_k=3, seed=1), set(order[:3])),
        (SamplingParams(temperature=1.0, top_p=0.6, seed=2), nucleus),
    ]:
        sampler = Sampler(params, [], 50)
        drawn = set(_draws(sampler, logits, 300))
        assert drawn <= allowed and len(drawn) > 1


def _draws(sampler: Sampler, logits: torch.Tensor, n: int) -> list[int]:
    """n successive tokens, each accepted (the noise is per output position, so that moves it on)."""
    out = []
    for _ in range(n):
        out.append(sampler.sample(logits))
        sampler.accept(out[-1])
    return out


def test_samples_follow_the_processed_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    sampler = Sampler(SamplingParams(temperature=0.7, seed=5), [], 5)
    counts = torch.bincount(torch.tensor(_draws(sampler, logits, 4000)), minlength=5).float()
    expected = torch.softmax(logits / 0.7, -1)
    assert (counts / 4000 - expected).abs().max() < 0.03


def test_repetition_and_frequency_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([3.0, 2.9, 0.0])
    plain = Sampler(SamplingParams(temperature=0), [0], 3)
    assert plain.sample(logits) == 0
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=1.2), [0], 3).sample(logits) == 1
    freq = Sampler(SamplingParams(temperature=0, frequency_penalty=0.5), [], 3)
    freq.accept(0)
    assert freq.sample(logits) == 1


def test_stop_string_is_cut_and_finish_reason_stop(tiny_llm) -> None:
    full = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0))[0]
    stop = full.text[10:13]
    assert len(stop) == 3 and "\ufffd" not in stop
    cut = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=40, temperature=0, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]


def test_stop_token_and_eos_end_the_output(tiny_llm) -> None:
    full = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=30, temperature=0))[0]
    stop_id = full.token_ids[7]
    first = full.token_ids.index(stop_id)
    out = tiny_llm.generate(PROMPT, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: first + 1]
    assert full.finish_reason == "length" and len(full.token_ids) == 30


def test_streamed_deltas_concatenate_to_the_full_text(tiny_llm) -> None:
    for params in [
        SamplingParams(max_tokens=40, temperature=0),
        SamplingParams(max_tokens=40, temperature=0.9, seed=7),
    ]:
        full = tiny_llm.generate(PROMPT, params)[0].text
        assert "".join(tiny_llm.stream(PROMPT, params)) == full


def test_stream_never_splits_a_utf8_character_and_holds_back_stop_strings(tiny_llm) -> None:
    # byte tokenizer: every non-ASCII character spans several tokens
    ids = tiny_llm.tokenizer.encode("héllo wörld ✓ 你好")
    from fastdecode.output import RequestOutput, TextTracker

    out = RequestOutput("", [])
    tracker = TextTracker(tiny_llm.tokenizer, SamplingParams(max_tokens=50, stop=["wörld"]), [], out)
    shown = []
    for token in ids:
        done = tracker.add(token)
        if done:
            tracker.finish()
        shown.append(tracker.delta())
        if done:
            break
    assert all("\ufffd" not in s for s in shown)
    assert "".join(shown) == "héllo " and out.finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.5}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 1.5},
        {"max_tokens": 0}, {"repetition_penalty": 0.0}, {"presence_penalty": 3.0}, {"stop": [""]},
        {"stop_token_ids": [-1]},
    ],
)
def test_invalid_sampling_values_name_the_field(kwargs: dict) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"invalid {name}="):
        SamplingParams(**kwargs)


def test_the_draw_at_a_position_is_a_function_of_seed_and_position() -> None:
    logits = torch.randn(40, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=7)
    a, b = Sampler(params, [], 40), Sampler(params, [], 40)
    first = _draws(a, logits, 30)
    ahead = [b.draft(logits, i) for i in range(30)]  # guessed before any token was accepted
    assert first == ahead == _draws(b, logits, 30)
    other = _draws(Sampler(SamplingParams(temperature=1.0, seed=8), [], 40), logits, 30)
    assert other != first


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999999])
def test_top_p_through_the_candidates_equals_a_full_sort(top_p: float) -> None:
    """The nucleus found among the tokens within NUCLEUS_CUT of the best (or, when they hold less
    than top_p, among all) is the one a full sort gives: flat logits need every token, peaked
    ones a few, and a near-one-hot row a single candidate."""
    gen = torch.Generator().manual_seed(3)
    for scale in (0.1, 3.0, 12.0, 40.0):
        logits = torch.randn(5000, generator=gen) * scale
        probs = torch.softmax(logits, -1)
        p = probs.numpy()
        order = np.lexsort((np.arange(len(p)), -p))  # every token, best first, lower id on ties
        # the mass before each token in fp32, summed in that order (torch.cumsum's rounding differs)
        drop = np.cumsum(p[order]) - p[order] >= top_p
        drop[0] = False
        want = torch.from_numpy(np.where(np.isin(np.arange(len(p)), order[~drop]), p, 0.0).astype(np.float32))
        got = Sampler(SamplingParams(temperature=1.0, top_p=top_p), [], 5000).probs(logits)
        assert torch.equal(got > 0, want > 0)
        assert torch.allclose(got, want / want.sum())


def test_top_p_keeps_the_lower_id_of_equal_probabilities() -> None:
    """Ties at the edge of the nucleus go to the lower token id, so AR and every verifier keep the
    same tokens: four equal tokens, top_p 0.5 keeps the first two by id."""
    logits = torch.full((10,), -30.0)
    logits[[7, 2, 9, 4]] = 5.0
    probs = Sampler(SamplingParams(temperature=1.0, top_p=0.5), [], 10).probs(logits)
    assert torch.nonzero(probs).flatten().tolist() == [2, 4]


def test_native_draw_equals_the_numpy_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """csrc/sampling.cpp (which skips most logs) and the numpy fallback pick the same token: whole
    vocabularies, sparse supports (top-k/p), seeds over 2**63, ties of equal probability."""
    import numpy as np

    from fastdecode import kernels, sampling

    if kernels.race_pick_op() is None:
        pytest.skip("the kernels are not built on this machine")
    rng = np.random.default_rng(0)
    cases = []
    for trial in range(120):
        vocab = (3, 50, 49152)[trial % 3]
        probs = torch.softmax(torch.tensor(rng.normal(size=vocab) * rng.uniform(0.1, 6), dtype=torch.float32), -1).numpy()
        if trial % 4 == 0:
            probs[rng.random(vocab) < 0.7] = 0.0
            probs[int(rng.integers(vocab))] = 0.5
        if trial % 5 == 0:
            probs[:] = 1.0 / vocab  # all tied
        cases.append((probs, int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 5000))))
    native = [sampling.race_pick(p, seed, i) for p, seed, i in cases]
    monkeypatch.setattr(sampling, "race_pick_op", lambda: None)
    assert [sampling.race_pick(p, seed, i) for p, seed, i in cases] == native
    with pytest.raises(ValueError, match="nonzero probability"):
        sampling.race_pick(np.zeros(4, dtype=np.float32), 0, 0)


def test_native_draw_from_logits_equals_probs_then_race(monkeypatch: pytest.MonkeyPatch) -> None:
    """csrc/sampling.cpp's sample_row (the processors, softmax, nucleus and race in one call) picks
    the token Sampler.probs + race_pick pick, with the same probability to fp32 rounding: every
    processor alone and together, vocabularies not a multiple of 8, -inf logits, ties at the top_k
    edge, the nucleus's all-token fallback (flat rows) and near-one-hot rows."""
    import numpy as np

    from fastdecode import kernels, sampling

    if kernels.sample_row_op() is None:
        pytest.skip("the kernels are not built on this machine")
    settings = [dict(temperature=0.7, top_p=0.9), dict(temperature=1.0), dict(temperature=0.8, top_k=50),
                dict(temperature=1.3, top_p=0.95, min_p=0.05), dict(temperature=0.5, top_k=3, top_p=0.5, min_p=0.1),
                dict(temperature=2.0, top_p=0.3), dict(temperature=1.0, top_k=300), dict(temperature=1.0, top_p=0.999)]
    rng = np.random.default_rng(1)
    cases = []
    for trial in range(96):
        vocab = (5, 50, 1003, 49152)[trial % 4]
        logits = torch.tensor(rng.normal(size=vocab) * (0.01, 1.0, 4.0, 30.0)[trial // 4 % 4], dtype=torch.float32)
        if trial % 3 == 0:
            logits[torch.from_numpy(rng.random(vocab) < 0.3)] = float("-inf")
            logits[0] = 1.0  # one finite logit at least
        if trial % 7 == 0:
            logits[: min(vocab, 60)] = 2.5  # a block of ties (at the top_k edge for top_k=50)
        params = SamplingParams(**settings[trial % len(settings)], seed=int(rng.integers(0, 2**64, dtype=np.uint64)))
        cases.append((logits, params, int(rng.integers(0, 50))))
    # one token holds half the mass, 49,151 tokens below NUCLEUS_CUT of it the other half: the
    # candidates hold less than top_p, so the nucleus is sought among every token
    tail = torch.tensor(rng.normal(size=49152) * 0.05 - 0.8, dtype=torch.float32)
    tail[7] = 10.0
    for seed in range(6):
        cases.append((tail, SamplingParams(temperature=1.0, top_p=0.9, seed=seed), seed))

    def draws() -> list[tuple[int, float]]:
        return [Sampler(params, [], len(logits)).draft_with_prob(logits, ahead) for logits, params, ahead in cases]

    native = draws()
    monkeypatch.setattr(sampling, "sample_row_op", lambda: None)
    reference = draws()
    assert [t for t, _ in native] == [t for t, _ in reference]
    for (_, got), (_, want) in zip(native, reference):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9)
    assert len({t for t, _ in native}) > 20  # the cases do draw varied tokens


def test_native_draw_is_the_same_on_any_number_of_threads() -> None:
    """sample_row splits a row into fixed parts (their sums added in order) and runs them on the
    threads there are: one thread and two give the same token and the same probability, bit for
    bit, on SmolLM2-sized rows and on rows whose width is not a multiple of the parts' 8 lanes."""
    from fastdecode import kernels

    if kernels.sample_row_op() is None:
        pytest.skip("the kernels are not built on this machine")
    op = kernels.sample_row_op()
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randn(v, generator=gen) * scale for v in (49152, 49157, 1003, 37) for scale in (1.0, 4.0, 12.0)]
    settings = [(0.7, 0, 0.9, 0.0), (1.0, 0, 0.95, 0.05), (0.8, 40, 0.9, 0.0), (1.5, 0, 1.0, 0.0)]
    before = torch.get_num_threads()
    draws = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            draws[threads] = [op(row, t, k, p, mp, 1e-4, 11, i) for i, row in enumerate(rows) for t, k, p, mp in settings]
    finally:
        torch.set_num_threads(before)
    assert draws[1] == draws[2]
    assert len({token for token, _ in draws[1]}) > 10


@pytest.mark.parametrize("native", [True, False])
def test_race_order_over_the_whole_distribution_starts_with_the_samplers_pick(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """race_order ranks candidates by the noise of the draw at count + ahead: given the whole
    processed distribution as weights, its first index is the token the sampler draws there."""
    if not native:
        monkeypatch.setattr("fastdecode.sampling.sample_row_op", lambda: None)
        monkeypatch.setattr("fastdecode.sampling.race_pick_op", lambda: None)
    vocab, gen = 64, torch.Generator().manual_seed(3)
    firsts = set()
    for seed in range(12):
        sampler = Sampler(SamplingParams(temperature=0.8, top_p=0.95, seed=seed), [], vocab)
        sampler.accept(0)  # count 1: ahead is counted from the next output index
        logits = 2 * torch.randn(vocab, generator=gen)
        weights = sampler.probs(logits).numpy().astype(np.float64)
        for ahead in (0, 1, 5):
            order = sampler.race_order(np.arange(vocab), weights, ahead)
            assert sorted(order) == list(range(vocab))
            assert order[0] == sampler.draft(logits, ahead)
            assert all(weights[i] == 0 for i in order[np.count_nonzero(weights):])  # excluded tokens last
            firsts.add(order[0] != int(logits.argmax()))
    assert firsts == {True, False}  # the order is the race's, not the weights' (which would give the argmax)


@pytest.mark.parametrize("vocab,k", [(1, 1), (5, 3), (8, 8), (49152, 8), (49157, 4)])
def test_top_rows_native_and_numpy_agree_and_lead_with_the_argmax(monkeypatch: pytest.MonkeyPatch, vocab: int,
                                                                   k: int) -> None:
    """The row top every step computes once (the greedy walk takes column 0, the drafters the rest):
    native and numpy give the same indices and values, largest first, the lower index first among
    equals (ties at the max included), and column 0 is numpy's argmax; the native op never picks
    a NaN (-1 and 0 past a row's other values)."""
    import fastdecode.sampling as sampling
    from fastdecode.sampling import top_rows

    rng = np.random.default_rng(vocab)
    x = rng.standard_normal((5, vocab)).astype(np.float32)
    x[1] = np.round(x[1])  # ties, at the max among them
    x[1, -1] = x[1].max()  # one in the tail
    x[2] = -np.inf
    x[3, -1] = 100.0  # the max in the tail
    native = top_rows(torch.from_numpy(x), k)
    with monkeypatch.context() as m:
        m.setattr(sampling, "top_k_rows_op", lambda: None)
        plain = top_rows(torch.from_numpy(x), k)
    assert np.array_equal(native[0], plain[0]) and np.array_equal(native[1], plain[1])
    assert native[0][:, 0].tolist() == x.argmax(-1).tolist()
    assert np.array_equal(native[1], np.take_along_axis(x, native[0], 1))
    for row in range(5):  # largest first, lower index first among equals
        pairs = list(zip(-native[1][row], native[0][row]))
        assert pairs == sorted(pairs)
    if vocab >= 4:
        nan = x[:1].copy()
        nan[0, 2:] = np.nan
        top, values = top_rows(torch.from_numpy(nan), 4)
        assert top[0].tolist() == sorted(range(2), key=lambda i: -nan[0, i]) + [-1, -1]
        assert values[0, 2:].tolist() == [0.0, 0.0]
