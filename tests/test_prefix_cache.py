"""Prefix reuse and chunked prefill are exact: where the model has exact rows (bf16, int8, int4), a
prompt prefilled in pieces, or after a cached prefix, gets bit-identical logits, so every method
emits exactly the tokens of a whole prefill; in fp32 (torch's GEMM) nothing is reused."""
from __future__ import annotations

import threading

import pytest
import torch

from fastdecode import LLM, SamplingParams, kernels
from fastdecode.batch import BatchEngine, Request, Update
from fastdecode.kv_cache import KVCache

from conftest import force_model_drafting

pytestmark = pytest.mark.skipif(not kernels.cpu_supports_avx2_fma(), reason="exact rows need the AVX2 kernels")


@pytest.fixture(scope="module", params=["bfloat16", "int4"])
def llms(request, tiny_llama_dir) -> tuple[LLM, LLM]:
    """(with prefix reuse, without) on the same tiny checkpoint."""
    pair = tuple(LLM(str(tiny_llama_dir), dtype=request.param, prefix_cache=c) for c in (True, False))
    for llm in pair:
        force_model_drafting(llm)
    return pair


def test_cache_shares_the_longest_prefix_but_never_the_last_token() -> None:
    cache = KVCache(1, 1, 2, 16, torch.float32)
    cache.append(5)
    cache.remember([1, 2, 3, 4, 5, 6])  # 5 slots: the newest token (6) has no entry yet
    assert cache.tokens == [1, 2, 3, 4, 5]
    assert cache.shared([1, 2, 9]) == 2
    assert cache.shared([1, 2, 3]) == 2  # the last prompt token is always run: its logits are needed
    assert cache.shared([1, 2, 3, 4, 5, 6, 7]) == 5
    assert cache.shared([7]) == 0
    assert cache.reuse([1, 2, 3, 8]) == 3 and cache.length == 3 and cache.tokens == [1, 2, 3]
    cache.truncate(1)
    assert cache.tokens == [1]
    cache.append(4)  # slots past the ids given (drafts accepted after a stop) are not recorded
    cache.remember([1, 2])
    assert cache.tokens == [1, 2] and cache.shared([1, 2, 3, 4]) == 2


@pytest.mark.parametrize("dtype", ["bfloat16", "int4"])
def test_prefill_in_pieces_is_bitwise_a_whole_prefill(tiny_llama_dir, dtype: str) -> None:
    model = LLM(str(tiny_llama_dir), dtype=dtype).model
    assert model.exact_rows
    ids = torch.randint(0, 320, (150,), generator=torch.Generator().manual_seed(1))
    whole = model.new_cache()
    want = model(ids, torch.arange(150), whole, last_only=True)
    whole.append(150)
    for cuts in ([0, 64, 128, 150], [0, 1, 100, 149, 150], [0, 7, 14, 150]):
        cache = model.new_cache()
        for a, b in zip(cuts, cuts[1:]):
            got = model(ids[a:b], torch.arange(a, b), cache, last_only=True)
            cache.append(b - a)
        assert torch.equal(got, want), cuts
        assert torch.equal(cache.keys()[:, :, :150], whole.keys()[:, :, :150]) and torch.equal(cache.values()[:, :, :150], whole.values()[:, :, :150])


def test_fp32_reuses_nothing(tiny_llama_dir) -> None:
    llm = LLM(str(tiny_llama_dir), dtype="float32", prefix_cache=True)
    assert not llm.model.exact_rows and not llm.prefix_cache
    llm.generate("abcdef", SamplingParams(max_tokens=3, temperature=0))
    assert llm.generate("abcdef", SamplingParams(max_tokens=3, temperature=0))[0].metrics.cached_tokens == 0


@pytest.mark.parametrize("method", ["ar", "pld", "suffix", "recycling", "aded", "lookahead", "layerskip", "draft", "auto"])
def test_repeated_and_extended_prompts_reuse_the_cache_and_change_nothing(llms, method: str) -> None:
    cached, plain = llms
    greedy = SamplingParams(max_tokens=12, temperature=0)
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=4)
    first = "The list: apples, pears, plums, apples, pears,"
    for params in (greedy, sampled):
        a = cached.generate(first, params, method=method)[0]
        again = cached.generate(first, params, method=method)[0]
        ids = cached.tokenizer.encode(first, add_special_tokens=True)
        assert again.metrics.cached_tokens == len(ids) - 1
        # the next turn: the prompt goes on from the first answer (all of it has cached entries but its last token)
        follow = a.prompt_token_ids + a.token_ids + cached.tokenizer.encode(" and", add_special_tokens=False)
        b = cached.generate(follow, params, method=method)[0]
        assert b.metrics.cached_tokens >= len(a.prompt_token_ids) + len(a.token_ids) - 1
        for got, prompt in ((a, first), (again, first), (b, follow)):
            want = plain.generate(prompt, params, method=method)[0]
            assert want.metrics.cached_tokens == 0
            assert got.token_ids == want.token_ids, (method, params.temperature)


def _serve(engine: BatchEngine, prompts: list[list[int]], params: SamplingParams) -> list[Update]:
    finals: list[Update | None] = [None] * len(prompts)
    done = [threading.Event() for _ in prompts]

    def sink(i: int):
        def on_update(u: Update) -> None:
            if u.done:
                finals[i] = u
                done[i].set()
        return on_update

    for i, ids in enumerate(prompts):
        engine.submit(Request("", ids, params, "auto", sink(i)))
    for event in done:
        assert event.wait(120), "a request never finished"
    return finals


def test_batch_prefills_in_chunks_and_shares_prefixes_exactly(llms) -> None:
    cached, plain = llms
    params = SamplingParams(max_tokens=10, temperature=0)
    system = cached.tokenizer.encode("You are a careful assistant. " * 6, add_special_tokens=True)  # ~170 tokens
    prompts = [system + cached.tokenizer.encode(q, add_special_tokens=False)
               for q in ("Count: 1, 2, 3,", "Name a fruit:", "Count: 1, 2, 3,", "abc abc abc", "x")]
    want = [plain.generate(p, params, method="auto")[0].token_ids for p in prompts]
    engine = BatchEngine(cached, max_batch=2, prefill_chunk=16).start()  # 170-token prompts: ~11 chunks each
    try:
        first = _serve(engine, prompts[:2], params)  # two new caches, prefilled side by side
        rest = [_serve(engine, [p], params)[0] for p in prompts[2:]]  # each takes the best cache left
    finally:
        engine.stop()
    assert [u.output.token_ids for u in first + rest] == want
    assert [u.output.metrics.cached_tokens for u in first] == [0, 0]
    assert rest[0].output.metrics.cached_tokens == len(prompts[2]) - 1  # the first prompt again
    assert all(u.output.metrics.cached_tokens >= len(system) for u in rest)


def test_prefill_chunk_is_checked(llms) -> None:
    with pytest.raises(ValueError, match="prefill_chunk=0"):
        BatchEngine(llms[0], prefill_chunk=0)
