"""Bad input gets a clear error naming the bad value and what is allowed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastdecode import LLM, SamplingParams
from fastdecode.config import ModelConfig
from fastdecode.weights import INSTALL_DEFAULT_MODEL, default_model_path


def test_missing_model_file() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM("/no/such/model.gguf")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a .gguf file"):
        LLM(str(f))


def test_unsupported_architecture_names_it_and_the_supported_list(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'gpt_neox'.*supported: llama, mistral, qwen2"):
        LLM(str(tmp_path))
    with pytest.raises(ValueError, match="'falcon'"):
        ModelConfig.from_gguf({"general.architecture": "falcon"}, True)


def test_missing_default_model_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=INSTALL_DEFAULT_MODEL):
        default_model_path()


def test_prompt_longer_than_the_context(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=32)
    with pytest.raises(ValueError, match=r"prompt of 40 tokens does not fit the context length 32"):
        llm.generate([5] * 40, SamplingParams(max_tokens=4))
    out = llm.generate([5] * 28, SamplingParams(max_tokens=50, temperature=0))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 32 - 28 + 1


def test_bad_options(tiny_llama_dir: Path, tiny_llm) -> None:
    with pytest.raises(ValueError, match=r"unknown dtype 'float8'; supported: bfloat16, float32"):
        LLM(str(tiny_llama_dir), dtype="float8")
    with pytest.raises(ValueError, match="threads=0"):
        LLM(str(tiny_llama_dir), threads=0)
    with pytest.raises(ValueError, match=r"unknown method 'magic'; known methods: ar"):
        tiny_llm.generate("hi", SamplingParams(), method="magic")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_llm.generate([1, 99999], SamplingParams())
    with pytest.raises(ValueError, match="prompt is empty"):
        tiny_llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="'role' and 'content'"):
        tiny_llm.chat([{"text": "hi"}])
