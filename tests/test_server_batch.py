"""Continuous batching is exact: a batched forward gives each sequence the logits of its own forward,
bit for bit, and every request served in a batch gets the tokens LLM.generate gives it alone."""
from __future__ import annotations

import threading

import pytest
import torch

from fastdecode import LLM, SamplingParams, kernels
from fastdecode.batch import BatchEngine, QueueFullError, Request, Update
from fastdecode.model import Segment

from conftest import force_model_drafting

# (new tokens, tokens already cached): long and short prefills, one-token decodes, trees. With a
# segment over 64 rows the layers run piece by piece; with all at most 64, in one native call per
# layer for the whole batch (csrc/layer.cpp's layer_batch).
SHAPES = {
    "with long prefills": [(100, 0), (5, 30), (1, 50), (70, 0), (9, 12), (1, 0)],
    "all short": [(5, 30), (1, 50), (40, 0), (9, 12), (1, 0), (64, 3)],
}


def _cache_with(model, cached: int):
    cache = model.new_cache()
    if cached:
        prefix = torch.randint(0, 320, (cached,), generator=torch.Generator().manual_seed(cached))
        model(prefix, torch.arange(cached), cache)
        cache.append(cached)
    return cache


@pytest.mark.parametrize("shapes", list(SHAPES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int4"])
def test_forward_batch_equals_separate_forwards_bitwise(tiny_llama_dir, dtype: str, shapes: str) -> None:
    cases = SHAPES[shapes]
    if dtype != "float32" and not kernels.cpu_supports_avx2_fma():
        pytest.skip("bf16/int4 need the AVX2 kernels")
    model = LLM(str(tiny_llama_dir), dtype=dtype).model
    tokens = [torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(100 + n)) for n, _ in cases]
    masks = []
    for n, cached in cases:  # a random tree-like mask (diagonal always visible) for the decode segments
        mask = torch.rand(n, cached + n, generator=torch.Generator().manual_seed(n)) < 0.7
        mask[:, cached:] &= torch.ones(n, n, dtype=torch.bool).tril()
        mask[:, cached:] |= torch.eye(n, dtype=torch.bool)
        masks.append(mask if cached else None)
    alone = []
    for (n, cached), toks, mask in zip(cases, tokens, masks):
        alone.append(model(toks, cached + torch.arange(n), _cache_with(model, cached), mask, last_only=cached == 0))
    caches = [_cache_with(model, cached) for _, cached in cases]
    segments = [
        Segment(toks, cached + torch.arange(n), cache, mask, last_only=cached == 0)
        for (n, cached), toks, cache, mask in zip(cases, tokens, caches, masks)
    ]
    batched = model.forward_batch(segments)
    for shape, want, got in zip(cases, alone, batched):
        assert torch.equal(want, got), f"{dtype}: segment {shape} differs from its own forward"


def _serve(engine: BatchEngine, jobs: list[tuple[str, SamplingParams, str]]) -> list[list[Update]]:
    """Submit every job at once and wait for all to finish; returns each job's updates."""
    updates: list[list[Update]] = [[] for _ in jobs]
    done = [threading.Event() for _ in jobs]

    def sink(i: int):
        def on_update(u: Update) -> None:
            updates[i].append(u)
            if u.done:
                done[i].set()
        return on_update

    for i, (prompt, params, method) in enumerate(jobs):
        text, ids = engine.encode(prompt)
        engine.submit(Request(text, ids, params, method, sink(i)))
    for event in done:
        assert event.wait(120), "a request never finished"
    return updates


JOBS = [
    ("def fibonacci(n):\n    if n < 2:\n        return n\n", SamplingParams(max_tokens=40, temperature=0), "suffix"),
    ("a b c d e f g a b c d e f g a b c", SamplingParams(max_tokens=30, temperature=0), "pld"),
    ("Shopping list:\n- apples\n- bread\n-", SamplingParams(max_tokens=25, temperature=0, stop=["e"]), "ar"),
    ("x", SamplingParams(max_tokens=1, temperature=0), "recycling"),
    ("the the the the", SamplingParams(max_tokens=35, temperature=0), "lookahead"),
    ("Hello! How can I help", SamplingParams(max_tokens=20, temperature=0.8, seed=7), "aded"),
    ("Days: Monday, Tuesday,", SamplingParams(max_tokens=33, temperature=0, repetition_penalty=1.3), "auto"),
    ("0123456789 0123456789", SamplingParams(max_tokens=28, temperature=1.0, top_k=20, seed=3), "suffix"),
    ("one two three one two three", SamplingParams(max_tokens=26, temperature=0), "layerskip"),
    ("The weather today is", SamplingParams(max_tokens=22, temperature=0.7, top_p=0.9, seed=5), "draft"),
    ("the cat sat on the mat. the cat sat", SamplingParams(max_tokens=30, temperature=0), "head"),
]


@pytest.fixture(scope="module")
def llm_bf16(tiny_llama_dir, tiny_head) -> LLM:
    if not kernels.cpu_supports_avx2_fma():
        pytest.skip("bf16 batching is exact with the AVX2 kernels")
    llm = LLM(str(tiny_llama_dir), dtype="bfloat16", draft_head=str(tiny_head[3]))
    force_model_drafting(llm)  # layerskip and draft really draft, between the batch's forwards
    return llm


@pytest.mark.parametrize("max_batch", [3, 8])
def test_batched_requests_equal_each_alone(llm_bf16: LLM, max_batch: int) -> None:
    want = [llm_bf16.generate(p, params, method=m)[0] for p, params, m in JOBS]
    engine = BatchEngine(llm_bf16, max_batch=max_batch, max_waiting=len(JOBS)).start()
    try:
        got = _serve(engine, JOBS)
    finally:
        engine.stop()
    for job, alone, updates in zip(JOBS, want, got):
        final = updates[-1].output
        assert final.token_ids == alone.token_ids, job
        assert final.text == alone.text and final.finish_reason == alone.finish_reason, job
        assert "".join(u.text for u in updates) == alone.text, job  # the streamed deltas add up to the text
        assert sum(u.new_tokens for u in updates) == len(alone.token_ids), job
    assert engine.num_caches <= max_batch


def test_fp32_batch_equals_alone(tiny_llm: LLM) -> None:
    jobs = JOBS[:4]
    want = [tiny_llm.generate(p, params, method=m)[0].token_ids for p, params, m in jobs]
    engine = BatchEngine(tiny_llm, max_batch=4).start()
    try:
        got = _serve(engine, jobs)
    finally:
        engine.stop()
    assert [u[-1].output.token_ids for u in got] == want


def test_queue_limit_and_cancel_free_the_slot(llm_bf16: LLM) -> None:
    engine = BatchEngine(llm_bf16, max_batch=1, max_waiting=1).start()
    started = threading.Event()
    try:
        text, ids = engine.encode("a b c")
        long_one = Request(text, ids, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True), "ar",
                           lambda u: started.set())
        engine.submit(long_one)
        assert started.wait(30)
        waiting = engine.submit(Request(text, ids, SamplingParams(max_tokens=2), "ar", lambda u: None))
        with pytest.raises(QueueFullError, match="limit 1"):
            engine.submit(Request(text, ids, SamplingParams(max_tokens=2), "ar", lambda u: None))
        waiting.cancel()
        long_one.cancel()
        finished = threading.Event()
        engine.submit(Request(text, ids, SamplingParams(max_tokens=3), "ar", lambda u: u.done and finished.set()))
        assert finished.wait(30), "a cancelled request kept its slot"
        assert engine.num_caches == 1
    finally:
        engine.stop()


def test_submit_refuses_bad_requests_with_clear_errors(llm_bf16: LLM) -> None:
    engine = BatchEngine(llm_bf16, max_batch=1)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        engine.submit(Request("x", [1], SamplingParams(), "nope", lambda u: None))
    with pytest.raises(ValueError, match="does not fit the context length"):
        engine.encode([5] * 600)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.encode([5, 99999])
    with pytest.raises(ValueError, match="max_batch=0"):
        BatchEngine(llm_bf16, max_batch=0)


def test_serve_command_parses_and_refuses_an_unknown_method(capsys) -> None:
    from fastdecode.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--max-batch", "4", "--port", "9", "--api-key", "k"])
    assert (args.max_batch, args.port, args.api_key, args.method, args.host) == (4, 9, "k", "auto", "127.0.0.1")
    assert main(["serve", "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
