"""Block-quantized weights (dtypes int4 / int8): the q_linear kernel, quantization, GGUF blocks, the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdecode import LLM, kernels
from fastdecode.quant import Blocks, QLinear, from_gguf, quantize
from fastdecode.weights import default_model_path

KINDS = ["q4_1", "q8_0"]


@pytest.fixture(scope="module", autouse=True)
def require_kernel() -> None:
    if not kernels.cpu_supports_avx2_fma():
        pytest.skip("this CPU lacks AVX2/FMA, which the q_linear kernel requires")
    assert kernels.q_linear_op() is not None, "the fastdecode kernels failed to build on an AVX2+FMA CPU"


def _blocks(kind: str, n_out: int, k: int, seed: int = 0) -> Blocks:
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(n_out, k, generator=g), kind)


def _call(x: torch.Tensor, b: Blocks, bias: torch.Tensor | None = None) -> torch.Tensor:
    return kernels.q_linear(x, b.codes, b.scales, b.mins, bias)


def _as_kernel_sees(x: torch.Tensor) -> torch.Tensor:
    """x after the kernel's activation quantization: int8 per 32-block, scale max|x| / 127."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return ((blocks * inv).round().clamp(-127, 127) * d).reshape(x.shape)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 32, 1), (2, 64, 3), (3, 576, 5), (4, 96, 8), (5, 1536, 130), (17, 576, 67),
                                   (64, 128, 9)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_linear_on_dequantized_weights(kind: str, shape: tuple[int, int, int], bias: bool) -> None:
    n, k, n_out = shape
    b = _blocks(kind, n_out, k)
    g = torch.Generator().manual_seed(n * 10_000 + k)
    x = torch.randn(n, k, generator=g)
    bvec = torch.randn(n_out, generator=g) if bias else None
    got = _call(x, b, bvec)
    torch.testing.assert_close(got, F.linear(_as_kernel_sees(x), b.dequantize(), bvec), rtol=1e-4, atol=1e-4)
    # against unquantized activations: each x moved by at most half its block's step (max|x| / 254)
    exact = F.linear(x, b.dequantize(), bvec)
    half_step = x.reshape(n, -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(n, k) / 254
    assert ((got - exact).abs() <= half_step @ b.dequantize().abs().T + 1e-4).all()


@pytest.mark.parametrize("kind", KINDS)
def test_a_row_does_not_depend_on_the_batch_or_the_threads(kind: str) -> None:
    """Bitwise: what makes speculative decoding token-for-token equal to AR with these weights."""
    b = _blocks(kind, 203, 576)
    x = torch.randn(37, 576)
    full = _call(x, b)
    for i in range(37):
        assert torch.equal(_call(x[i : i + 1], b)[0], full[i]), f"row {i} alone differs from row {i} in a batch"
    for n in (2, 3, 5, 8):
        assert torch.equal(_call(x[:n].contiguous(), b), full[:n])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(_call(x, b), full)
    finally:
        torch.set_num_threads(threads)


def test_quantization_error_is_at_most_half_a_step() -> None:
    w = torch.randn(16, 256) * torch.rand(16, 1) * 3
    for kind in KINDS:
        b = quantize(w, kind)
        step = b.scales.repeat_interleave(32, dim=1)
        assert ((b.dequantize() - w).abs() <= step / 2 + 1e-6).all(), kind
    q4 = quantize(w, "q4_1")
    assert torch.equal(quantize(q4.dequantize(), "q4_1").codes, q4.codes)  # requantizing is stable
    zero = quantize(torch.zeros(2, 32), "q8_0")
    assert torch.equal(zero.dequantize(), torch.zeros(2, 32))  # all-zero blocks: no division by zero


def test_gguf_block_bytes() -> None:
    """One hand-made Q4_1 block and one Q8_0 block, laid out as ggml stores them."""
    q = np.arange(32) % 16
    q4 = np.concatenate([np.array([0.5, -2.0], np.float16).view(np.uint8),
                         (q[:16] | (q[16:] << 4)).astype(np.uint8)])
    got = from_gguf(q4, "q4_1", rows=1).dequantize()
    assert torch.equal(got, torch.tensor(0.5 * q - 2.0, dtype=torch.float32).unsqueeze(0))
    c = np.arange(-16, 16, dtype=np.int8)
    q8 = np.concatenate([np.array([0.25], np.float16).view(np.uint8), c.view(np.uint8)])
    got = from_gguf(q8, "q8_0", rows=1).dequantize()
    assert torch.equal(got, torch.tensor(0.25 * c, dtype=torch.float32).unsqueeze(0))


@pytest.mark.parametrize("case", [
    ("K not a multiple of 32", (torch.randn(1, 40), torch.zeros(2, 20, dtype=torch.uint8), torch.ones(2, 1),
                                torch.zeros(2, 1), None)),
    ("q4 without mins", (torch.randn(1, 32), torch.zeros(2, 16, dtype=torch.uint8), torch.ones(2, 1), None, None)),
    ("codes of the wrong dtype", (torch.randn(1, 32), torch.zeros(2, 32, dtype=torch.int32), torch.ones(2, 1),
                                  None, None)),
    ("scales of the wrong shape", (torch.randn(1, 32), torch.zeros(2, 32, dtype=torch.int8), torch.ones(3, 1),
                                   None, None)),
    ("bias of the wrong shape", (torch.randn(1, 32), torch.zeros(2, 32, dtype=torch.int8), torch.ones(2, 1),
                                 None, torch.ones(3))),
], ids=lambda c: c[0])
def test_bad_arguments_raise_value_error(case: tuple[str, tuple]) -> None:
    with pytest.raises(ValueError):
        kernels.q_linear(*case[1])


@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_quantized_tiny_model_is_close_to_fp32(tiny_llama_dir, tiny_llm, dtype: str) -> None:
    q = LLM(str(tiny_llama_dir), dtype=dtype)
    linears = [m for m in q.model.modules() if isinstance(m, QLinear)]
    assert len(linears) == 4 * q.config.num_layers + 1
    assert q.model.lm_head.kind == "q8_0"  # the head stays 8-bit for both dtypes
    tokens = torch.tensor(q.tokenizer.encode("The quick brown fox jumps over the lazy dog."))
    pos = torch.arange(len(tokens))
    ref = tiny_llm.model(tokens, pos, tiny_llm.model.new_cache())
    got = q.model(tokens, pos, q.model.new_cache())
    cos = F.cosine_similarity(ref, got, dim=-1)
    # random Gaussian weights are the worst case for 4 bits (real checkpoints: see scripts/perplexity.py)
    assert cos.min() > (0.9 if dtype == "int4" else 0.999) and cos.mean() > (0.97 if dtype == "int4" else 0.9995), cos


def test_int4_uses_the_gguf_files_own_blocks() -> None:
    """The default model is Q4_1 in its file: int4 computes with exactly those weights."""
    try:
        path = default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    q = LLM(path, dtype="int4", max_model_len=256)
    ref = LLM(path, dtype="float32", max_model_len=256)  # the file's weights, dequantized as loaded
    for name in ("blocks.0.qkv", "blocks.7.gate_up", "blocks.29.down", "lm_head"):
        got, want = q.model.get_submodule(name), ref.model.get_submodule(name)
        assert got.kind == ("q8_0" if name == "lm_head" else "q4_1")
        torch.testing.assert_close(got.blocks().dequantize(), want.weight, rtol=1e-6, atol=1e-7)
    ids = torch.tensor(q.tokenizer.encode("The capital of France is Paris. It is known for the Eiffel Tower and"))
    pos = torch.arange(len(ids))
    got = q.model(ids, pos, q.model.new_cache())
    want = ref.model(ids, pos, ref.model.new_cache())
    # same weights; int4 also rounds activations to int8 per block: close, not equal
    assert F.cosine_similarity(got, want, dim=-1).min() > 0.99
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
