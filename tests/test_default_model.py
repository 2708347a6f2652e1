"""End-to-end on the real default model (SmolLM2-135M-Instruct GGUF): greedy fp32 tokens equal
transformers' greedy `generate` on the same file, chat template and CLI work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdecode import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "List three fruits that are red.",
    "Explain gravity to a child in two sentences.",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    from fastdecode.weights import default_model_path

    path = Path(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def test_greedy_fp32_tokens_equal_transformers_generate(default_llm_fp32, hf_model) -> None:
    for prompt in PROMPTS:
        ids = default_llm_fp32.apply_chat_template([{"role": "user", "content": prompt}])
        ours = default_llm_fp32.generate(ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))[0]
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=default_llm_fp32.eos_ids,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            )[0, len(ids):].tolist()
        assert ours.token_ids == ref, prompt


def test_chat_answers_and_stops_at_end_of_turn(default_llm_fp32) -> None:
    out = default_llm_fp32.chat(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        SamplingParams(max_tokens=32, temperature=0), method="ar",
    )[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in default_llm_fp32.eos_ids
    assert out.metrics.steps == len(out.token_ids) - 1 and out.metrics.accepted_per_step == 1.0


def test_cli_generate_json_and_info() -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = subprocess.run(
        [sys.executable, "-m", "fastdecode.cli", "generate", "Name a color.", "--chat", "--json", "--max-tokens", "8",
         "--threads", "2"],
        capture_output=True, text=True, env=env, check=True,
    )
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(record) == {"text", "token_ids", "finish_reason", "metrics"}
    assert 1 <= len(record["token_ids"]) <= 8 and record["finish_reason"] in ("stop", "length")
    info = subprocess.run([sys.executable, "-m", "fastdecode.cli", "info"], capture_output=True, text=True, env=env,
                          check=True).stdout
    assert "architecture: llama" in info and "layers: 30" in info and "dtype: bfloat16" in info
    bad = subprocess.run([sys.executable, "-m", "fastdecode.cli", "generate", "x", "--top-p", "2"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "invalid top_p=2.0" in bad.stderr and "Traceback" not in bad.stderr


METHOD_PROMPTS = [
    "Repeat this list twice: apples, pears, plums, cherries.",
    "Write a Python function is_prime(n) and test it on 7.",
    "Summarize in one sentence: The meeting moved to Friday because the room was booked on Thursday.",
]


@pytest.mark.parametrize("method", ["pld", "suffix", "recycling", "aded", "lookahead", "auto"])
def test_every_method_greedy_fp32_equals_ar_on_the_real_model(default_llm_fp32, method: str) -> None:
    params = SamplingParams(max_tokens=40, temperature=0)
    for prompt in METHOD_PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        want = default_llm_fp32.chat(messages, params, method="ar")[0].token_ids
        assert default_llm_fp32.chat(messages, params, method=method)[0].token_ids == want, prompt


@pytest.mark.parametrize("dtype", ["bfloat16", "int4"])
def test_low_precision_methods_equal_ar_exactly(dtype: str) -> None:
    """bf16 / int4 weights, fp32 activations: the kernels sum every output in one fixed order
    whatever the number of tokens in the forward, so a draft tree reproduces AR bit for bit."""
    from fastdecode import LLM

    llm = LLM(dtype=dtype, max_model_len=2048)
    params = SamplingParams(max_tokens=64, temperature=0)
    for prompt in METHOD_PROMPTS:
        ids = llm.apply_chat_template([{"role": "user", "content": prompt}])
        ar = llm.generate(ids, params, method="ar")[0].token_ids
        for method in ("pld", "recycling", "auto"):
            assert llm.generate(ids, params, method=method)[0].token_ids == ar, (dtype, method, prompt)


def test_a_gguf_files_index_is_cached_and_follows_the_file(tmp_path, monkeypatch) -> None:
    """The first load parses the GGUF file with gguf's reader and caches its metadata and where each
    tensor lies; a later load maps the same bytes without the reader; a changed file is parsed again."""
    import shutil

    import gguf
    import numpy as np

    from fastdecode import weights
    from fastdecode.weights import default_model_path

    monkeypatch.setenv("FASTDECODE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    shutil.copy(default_model_path(), path)
    meta, tensors = weights._gguf_contents(path)
    assert meta["general.architecture"] == "llama" and len(tensors) > 100
    assert len(list((tmp_path / "cache" / "gguf-index").glob("*.json"))) == 1

    real = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: pytest.fail("the index should spare the reader"))
    meta2, tensors2 = weights._gguf_contents(path)
    assert meta2 == json.loads(json.dumps(meta))  # as JSON keeps it
    assert [(n, t) for n, t, _ in tensors2] == [(n, t) for n, t, _ in tensors]
    for (_, _, a), (_, _, b) in zip(tensors, tensors2):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)

    os.utime(path, ns=(0, 0))  # the file "changed": its key is another, so the reader runs again
    calls = []
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: calls.append(1) or real(*a, **k))
    weights._gguf_contents(path)
    assert calls == [1]


def test_the_loaders_dequantization_is_ggufs_on_every_quantized_tensor() -> None:
    """The GGUF loader dequantizes Q4_1 / Q8_0 matrices with fastdecode's blocks (faster than gguf's
    numpy code): on every such tensor of the default model the numbers must be gguf's, bit for bit."""
    import gguf
    import numpy as np

    from fastdecode import weights
    from fastdecode.quant import from_gguf
    from fastdecode.weights import default_model_path

    _, tensors = weights._gguf_contents(Path(default_model_path()))
    kinds = set()
    for name, kind, data in tensors:
        if kind.name.lower() in ("q4_1", "q8_0"):
            kinds.add(kind.name)
            want = np.asarray(gguf.quants.dequantize(data, kind), dtype=np.float32)
            got = from_gguf(data, kind.name.lower(), rows=data.shape[0]).dequantize().numpy()
            assert np.array_equal(got, want), name
    assert kinds == {"Q4_1", "Q8_0"}
