"""The OpenAI-compatible server, driven by the official `openai` client (and raw httpx where the
client would hide what is sent) against a real uvicorn server on loopback, tiny random model."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from fastdecode import LLM, SamplingParams, kernels
from fastdecode.server import create_app
from conftest import make_tiny_model
from server_util import running_server

KEY = "test-key"
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    dtype = "bfloat16" if kernels.cpu_supports_avx2_fma() else "float32"
    return LLM(str(tiny_llama_dir), dtype=dtype)


@pytest.fixture(scope="module")
def server(llm: LLM):
    app = create_app(llm, model_name="tiny", method="ar", max_batch=4, max_waiting=16, api_key=KEY)
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _post(server, path: str, body: dict | bytes, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, dict):
        return httpx.post(server[0] + path, json=body, headers=headers, timeout=60, **kw)
    return httpx.post(server[0] + path, content=body, headers={**headers, "Content-Type": "application/json"},
                      timeout=60, **kw)


def _error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_completion_equals_generate_with_exact_usage(client, llm: LLM) -> None:
    prompt = "def fibonacci(n):\n    if n < 2:"
    want = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0]
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == len(want.prompt_token_ids) + len(want.token_ids)
    ids = client.completions.create(model="tiny", prompt=want.prompt_token_ids, max_tokens=24, temperature=0)
    assert ids.choices[0].text == want.text


def test_chat_equals_llm_chat(client, llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]
    want = llm.chat(messages, SamplingParams(max_tokens=30, temperature=0))[0]
    got = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=30, temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)


@pytest.mark.parametrize("method", ["ar", "suffix", "pld"])
def test_streamed_text_equals_non_streamed(client, llm: LLM, method: str) -> None:
    kw = dict(model="tiny", max_tokens=40, temperature=0, extra_body={"method": method})
    prompt = "a b c d e f g a b c d e f g a"
    whole = client.completions.create(prompt=prompt, **kw)
    chunks = list(client.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and _counts(chunks[-1].usage) == _counts(whole.usage)
    if llm.prefix_cache:  # the same prompt again: all of it but its last token was cached
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1
    messages = [{"role": "user", "content": prompt}]
    whole = client.chat.completions.create(messages=messages, **kw)
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert _counts(chunks[-1].usage) == _counts(whole.usage)


def _counts(usage) -> tuple[int, int, int]:
    """The token counts of a usage (its cached_tokens differ between a first and a repeated prompt)."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def test_stream_ends_with_done_and_no_usage_unless_asked(server) -> None:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all("usage" not in c for c in chunks)


def test_stop_strings_cut_the_text(client, llm: LLM) -> None:
    prompt = "Shopping list:\n- apples\n- bread\n-"
    free = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0))[0].text
    stop = free[3:5]
    want = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop=[stop, "\u00ff"]))[0]
    for stream in (False, True):
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0,
                                          stop=[stop, "\u00ff"], stream=stream)
        text = "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text
        assert text == want.text and stop not in text
    assert want.finish_reason == "stop"


def test_seed_reproduces_sampled_output(client, llm: LLM) -> None:
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0.9, top_p=0.95)
    first = client.completions.create(seed=1234, **kw).choices[0].text
    assert client.completions.create(seed=1234, **kw).choices[0].text == first
    want = llm.generate("Once upon a time", SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234))
    assert first == want[0].text
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in range(4)}
    assert len(others) > 1


def test_concurrent_requests_equal_each_alone(client, llm: LLM) -> None:
    jobs = [("def f(x):\n    return", "suffix", 30, None), ("the the the the", "lookahead", 25, None),
            ("1. Preheat the oven.\n2.", "pld", 35, ["\n"]), ("x", "ar", 3, None), ("Days: Monday,", "auto", 20, None),
            ("Hello!", "recycling", 28, ["o"])]
    want = [llm.generate(p, SamplingParams(max_tokens=n, temperature=0, stop=s), method=m)[0].text
            for p, m, n, s in jobs]
    got: list[str | None] = [None] * len(jobs)

    def run(i: int) -> None:
        p, m, n, s = jobs[i]
        reply = client.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0, stop=s,
                                          extra_body={"method": m})
        got[i] = reply.choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_models_health_metrics(server, client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server[0] + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    client.completions.create(model="tiny", prompt="count: 1 2 3", max_tokens=8, temperature=0,
                              extra_body={"method": "suffix"})
    text = httpx.get(server[0] + "/metrics", timeout=10).text
    for name in ("fastdecode_time_to_first_token_seconds_count", "fastdecode_inter_token_latency_seconds_bucket",
                 "fastdecode_e2e_request_latency_seconds_sum", "fastdecode_prompt_tokens_total",
                 "fastdecode_generation_tokens_total", "fastdecode_drafted_tokens_total",
                 "fastdecode_accepted_tokens_total", "fastdecode_requests_running", "fastdecode_requests_waiting"):
        assert name in text, name
    ttft = [line for line in text.splitlines() if line.startswith("fastdecode_time_to_first_token_seconds_count")]
    assert float(ttft[0].split()[-1]) >= 1


def test_api_key_is_required(server) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    _error(_post(server, "/v1/completions", body, key=None), 401)
    _error(_post(server, "/v1/completions", body, key="wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server[0] + "/health").status_code == 200  # not behind the key


def test_unknown_model_is_404(server, client) -> None:
    _error(_post(server, "/v1/completions", {"model": "gpt-9", "prompt": "hi"}), 404, "model")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    _error(httpx.get(server[0] + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"}), 404)


BAD_FIELDS = [
    ({"temperature": 5}, "temperature"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"n": 2}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop.0"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"seed": 2**70}, "seed"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"method": "nope"}, "method"),
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 10**6]}, "prompt"), ({"prompt": "x" * 600}, "prompt"),
    ({"prompt": ""}, "prompt"), ({"model": None}, "model"), ({"stream": "maybe"}, "stream"), ({"echo": True}, "echo"),
    ({"logprobs": 3}, "logprobs"), ({"max_tokens": "lots"}, "max_tokens"), ({"prompt": None}, "prompt"),
]


@pytest.mark.parametrize("patch,param", BAD_FIELDS, ids=[p for _, p in BAD_FIELDS])
def test_bad_completion_fields_are_400_naming_the_field(server, patch: dict, param: str) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, **patch}
    error = _error(_post(server, "/v1/completions", body), 400)
    assert error["param"] is not None and error["param"].startswith(param.split(".")[0]), error


@pytest.mark.parametrize("patch,param", [
    ({"messages": []}, "messages"), ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"), ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"logprobs": True}, "logprobs"), ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages.0.content"),
])
def test_bad_chat_fields_are_400_naming_the_field(server, patch: dict, param: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **patch}
    error = _error(_post(server, "/v1/chat/completions", body), 400)
    assert error["param"].startswith(param), error


def test_malformed_bodies_are_400_and_huge_ones_413(server) -> None:
    for raw in (b"{not json", b"", b"[]", b"null", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}'):
        _error(_post(server, "/v1/completions", raw), 400)
    huge = json.dumps({"model": "tiny", "prompt": "x" * (3 * 1024 * 1024)}).encode()
    _error(_post(server, "/v1/completions", huge), 413)

    def chunks():  # no Content-Length: the limit still holds
        for _ in range(40):
            yield b" " * 100_000

    chunked = httpx.post(server[0] + "/v1/completions", content=chunks(), timeout=30,
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    _error(chunked, 413)


def test_openai_client_sees_400_as_bad_request(client) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="hi", temperature=7)


def _running(url: str) -> int:
    return httpx.get(url + "/health", timeout=10).json()["running"]


def _wait_idle(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while _running(url) != 0:
        assert time.monotonic() < deadline, "a request kept its slot"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def one_slot_server(tmp_path_factory):
    """One slot, no queue, and a 4096-token context so a request can run long enough to be cut off."""
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny_4k"), max_position_embeddings=4096)
    llm = LLM(str(folder), dtype="bfloat16" if kernels.cpu_supports_avx2_fma() else "float32")
    app = create_app(llm, model_name="tiny", method="ar", max_batch=1, max_waiting=0)
    with running_server(app) as url:
        yield url, app


def test_queue_full_is_429_and_disconnect_frees_the_slot(one_slot_server) -> None:
    url, app = one_slot_server
    # 4,000 tokens hold the slot ~2 s on this tiny model (400 took 0.2 s, a window that a slow
    # moment of the machine could close before the second request arrived)
    body = {"model": "tiny", "prompt": "a", "max_tokens": 4000, "temperature": 0, "stream": True}
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)  # the first token has arrived: the request holds the only slot
        assert _running(url) == 1
        error = _error(httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=30), 429)
        assert "busy" in error["message"]
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny", prompt="b", max_tokens=2)
    _wait_idle(url)  # the client went away: its request was cancelled and its cache freed
    reply = client.completions.create(model="tiny", prompt="b", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3
    assert app.state.engine.num_caches == 1
    assert _cancelled(url) >= 1


def _cancelled(url: str) -> float:
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    found = [line for line in lines if line.startswith('fastdecode_requests_total{finish_reason="cancelled"}')]
    return float(found[0].split()[-1]) if found else 0.0


def test_non_streaming_client_timeout_cancels(one_slot_server) -> None:
    url, _ = one_slot_server
    before = _cancelled(url)
    body = {"model": "tiny", "prompt": "a", "max_tokens": 4000, "temperature": 0}  # ~2 s of work
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.25))
    _wait_idle(url)
    assert _cancelled(url) == before + 1


def test_memory_stays_bounded_over_many_requests(one_slot_server) -> None:
    import resource

    url, app = one_slot_server
    body = {"model": "tiny", "prompt": "memory", "max_tokens": 4, "temperature": 0}
    with httpx.Client(timeout=30) as http:
        def burst(n: int) -> None:
            for i in range(n):
                if i % 3 == 0:  # a cancelled stream
                    with http.stream("POST", url + "/v1/completions", json={**body, "stream": True, "max_tokens": 500}) as r:
                        next(r.iter_lines())
                    _wait_idle(url)
                else:
                    assert http.post(url + "/v1/completions", json=body).status_code == 200

        burst(30)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        burst(150)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert app.state.engine.num_caches == 1
    assert after - before < 50_000, f"peak RSS grew by {after - before} KiB over 150 requests"


def test_extreme_but_valid_sampling_values_work(client) -> None:
    """Found by the fuzzer: a top_p below fp32's range, and a temperature whose inverse overflows."""
    kw = dict(model="tiny", prompt="edge", max_tokens=6)
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    assert client.completions.create(temperature=1e-300, **kw).choices[0].text == greedy
    assert client.completions.create(temperature=1.0, top_p=5e-324, seed=1, **kw).choices[0].text == greedy
    reply = client.completions.create(temperature=2.0, seed=1, extra_body={"repetition_penalty": 0.01}, **kw)
    assert reply.usage.completion_tokens >= 1
