"""Fuzz: schemathesis generates requests (valid and invalid) from the server's own /openapi.json and
sends them to a real server on loopback; none may get a 5xx, and the server is healthy after."""
from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastdecode import LLM, kernels  # noqa: E402
from fastdecode.server import create_app  # noqa: E402
from server_util import running_server  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_url(tiny_llama_dir):
    dtype = "bfloat16" if kernels.cpu_supports_avx2_fma() else "float32"
    llm = LLM(str(tiny_llama_dir), dtype=dtype, max_model_len=48)  # short answers, whatever max_tokens says
    with running_server(create_app(llm, model_name="tiny", method="ar", max_batch=4)) as url:
        yield url


EXAMPLES = 50  # per operation and mode (3 GETs + 2 POSTs x 2 modes: 350 requests)


def _check(case, served: bool) -> None:
    if served and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "tiny"  # so that the body reaches the engine, not only the 404
    response = case.call(timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text}"
    if response.status_code >= 400 and case.path.startswith("/v1"):
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_gets_a_server_error(fuzz_url, mode: str) -> None:
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(fuzz_url + "/openapi.json")
    for found in schema.get_all_operations():
        operation = found.ok()
        if mode == "negative" and operation.method.upper() != "POST":
            continue  # a GET without parameters has no invalid form

        @given(case=operation.as_strategy(GenerationMode(mode)), served=st.booleans())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case, served: bool) -> None:
            _check(case, served)

        fuzz()


def test_still_healthy_after_fuzzing(fuzz_url) -> None:
    assert httpx.get(fuzz_url + "/health", timeout=10).json()["status"] == "ok"
    # greedy: at the API's default temperature 1 the tiny random model sometimes ends early (EOS)
    body = {"model": "tiny", "prompt": "still here", "max_tokens": 3, "temperature": 0}
    assert httpx.post(fuzz_url + "/v1/completions", json=body, timeout=30).json()["usage"]["completion_tokens"] == 3
