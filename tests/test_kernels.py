"""Tests for fastdecode.kernels.bf16_linear against F.linear on upcast weights."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastdecode import kernels
from fastdecode.kv_cache import blocked_keys, key_rows, paired_values, value_rows
from fastdecode.tree import DraftTree


@pytest.fixture(scope="module", autouse=True)
def require_kernel() -> None:
    """Fail loudly if the kernel is missing on a CPU that should run it."""
    if not kernels.cpu_supports_avx2_fma():
        pytest.skip("this CPU lacks AVX2/FMA, which the bf16_linear kernel requires")
    assert kernels.bf16_linear_available(), "bf16_linear failed to build on an AVX2+FMA CPU"


def _inputs(n: int, k: int, big_n: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    w = torch.randn(big_n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(big_n, generator=g) if bias else None
    return x, w, b


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes up to fp32 summation order: with AVX512-BF16 the activations are
    rounded to bf16 first (vdpbf16ps multiplies bf16 pairs), with AVX2 they stay fp32."""
    if kernels.bf16_isa() == "avx512bf16":
        x = x.bfloat16().float()
    return F.linear(x, w.float(), b)


def _on_one_thread(fn):
    """fn() with torch's intra-op threads set to 1, then restored."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(threads)


def _check(n: int, k: int, big_n: int, bias: bool) -> None:
    x, w, b = _inputs(n, k, big_n, bias)
    y = kernels.bf16_linear(x, w, b)
    ref = _reference(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (n, big_n)
    # Only the fp32 summation order differs; its error grows with K.
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * max(1.0, k / 576))


def test_isa_follows_the_cpu_and_the_switch() -> None:
    """AVX512-BF16 CPUs get the vdpbf16ps kernel unless FASTDECODE_NO_AVX512 is set."""
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    wanted = "avx512bf16" if {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= set(flags) else "avx2"
    assert kernels.bf16_isa() == (
        "avx2" if os.environ.get("FASTDECODE_NO_AVX512", "0") not in ("", "0") else wanted
    )


def test_amx_follows_the_cpu_and_the_switch() -> None:
    """CPUs with AMX-TILE, AMX-BF16 and AVX512-BF16 take packed matrices unless FASTDECODE_NO_AMX (or
    FASTDECODE_NO_AVX512) is set; a bf16 model's reports then name the "amx" kernel."""
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    off = any(os.environ.get(v, "0") not in ("", "0") for v in ("FASTDECODE_NO_AMX", "FASTDECODE_NO_AVX512"))
    wanted = {"amx_tile", "amx_bf16", "avx512_bf16", "avx512f"} <= flags and not off
    assert kernels.amx_bf16() == wanted
    assert kernels.bf16_kernel() == ("amx" if wanted else kernels.bf16_isa())


def _amx_or_skip() -> None:
    if not kernels.amx_bf16():
        pytest.skip("this CPU (or FASTDECODE_NO_AMX) gives no AMX-BF16: packed matrices cannot run here")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("big_n,k", [(16, 32), (48, 64), (208, 576), (96, 1536)])
def test_amx_packed_matches_f_linear_and_rows_are_independent(big_n: int, k: int, bias: bool) -> None:
    """The AMX kernel on pack_amx weights: close to F.linear on bf16-rounded activations, and each
    row the same bits alone, in any batch (one or two token tiles a pass, partial tiles) and on any
    thread count."""
    _amx_or_skip()
    x, w, b = _inputs(70, k, big_n, bias)
    packed = kernels.pack_amx(w)
    full = kernels.bf16_linear(x, packed, b)
    torch.testing.assert_close(full, F.linear(x.bfloat16().float(), w.float(), b), rtol=1e-5, atol=1e-4 * max(1.0, k / 576))
    for n in (1, 2, 15, 16, 17, 31, 32, 33, 48, 49, 64):
        part = kernels.bf16_linear(x[:n].contiguous(), packed, b)
        assert torch.equal(part, full[:n]), f"n={n}"
    for i in (0, 17, 69):
        assert torch.equal(kernels.bf16_linear(x[i : i + 1], packed, b)[0], full[i]), f"row {i}"
    assert torch.equal(_on_one_thread(lambda: kernels.bf16_linear(x, packed, b)), full)


def test_pack_amx_layout_and_errors() -> None:
    """pack_amx puts row 16 i + r's weights k = 2p, 2p + 1 at [i, p, r, 0:2]; shapes it cannot pack
    are refused with the shape named."""
    w = torch.arange(32 * 64, dtype=torch.float32).reshape(32, 64).bfloat16()
    packed = kernels.pack_amx(w)
    assert packed.shape == (2, 32, 16, 2)
    assert torch.equal(packed[1, 5, 3], w[16 + 3, 10:12])
    with pytest.raises(ValueError, match="N=20, K=64"):
        kernels.pack_amx(torch.zeros(20, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="N=16, K=40"):
        kernels.pack_amx(torch.zeros(16, 40, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.pack_amx(torch.zeros(16, 64))
    if kernels.amx_bf16():
        x = torch.randn(2, 32)
        with pytest.raises(ValueError, match="K=64"):
            kernels.bf16_linear(x, packed, None)
        with pytest.raises(ValueError, match="bias must be a float32 tensor \\[32\\]"):
            kernels.bf16_linear(torch.randn(2, 64), packed, torch.zeros(16))


def test_without_amx_packed_weights_are_refused_and_models_stay_unpacked(tiny_llama_dir: Path) -> None:
    """With FASTDECODE_NO_AMX=1 a bf16 model keeps [N, K] matrices (the vdpbf16ps or AVX2 kernel) and a
    packed matrix gets a clear error, not a crash; here, on an AMX CPU, the same model is packed."""
    script = textwrap.dedent(
        f"""
        import torch
        from fastdecode import kernels
        from fastdecode.llm import LLM
        from fastdecode.model import Linear
        assert not kernels.amx_bf16()
        llm = LLM({str(tiny_llama_dir)!r}, dtype="bfloat16")
        assert all(m.weight.dim() == 2 for m in llm.model.modules() if isinstance(m, Linear))
        try:
            kernels.bf16_linear(torch.randn(1, 64), torch.zeros(1, 32, 16, 2, dtype=torch.bfloat16), None)
        except ValueError as exc:
            assert "AMX-BF16" in str(exc), exc
        else:
            raise AssertionError("packed weights ran without AMX")
        print("ok")
        """
    )
    env = dict(os.environ, FASTDECODE_NO_AMX="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
    if kernels.amx_bf16():
        from fastdecode.llm import LLM
        from fastdecode.model import Linear

        llm = LLM(str(tiny_llama_dir), dtype="bfloat16")
        linears = [m for m in llm.model.modules() if isinstance(m, Linear)]
        assert linears and all(m.weight.dim() == 4 for m in linears)
        assert llm.model.embed.weight.dim() == 2


def test_the_avx2_kernel_in_a_process_without_avx512() -> None:
    """On an AVX512-BF16 machine the AVX2 kernel (what AVX2-only CPUs run) is still checked here:
    fp32 activations, close to F.linear, rows independent of the batch."""
    script = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        from fastdecode import kernels
        assert kernels.bf16_isa() == "avx2", kernels.bf16_isa()
        g = torch.Generator().manual_seed(0)
        for n, k, big_n in [(1, 576, 67), (5, 1536, 203), (16, 40, 5), (33, 13, 3)]:
            x = torch.randn(n, k, generator=g)
            w = torch.randn(big_n, k, generator=g).bfloat16()
            b = torch.randn(big_n, generator=g)
            y = kernels.bf16_linear(x, w, b)
            torch.testing.assert_close(y, F.linear(x, w.float(), b), rtol=1e-5, atol=1e-4 * max(1.0, k / 576))
            for i in range(n):
                assert torch.equal(kernels.bf16_linear(x[i : i + 1], w, b)[0], y[i]), (n, k, i)
        print("ok")
        """
    )
    env = dict(os.environ, FASTDECODE_NO_AVX512="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize("switch", ["FASTDECODE_NO_AVX512", "FASTDECODE_NO_AMX"])
def test_the_other_kernels_attention_and_tree_exactness_in_a_process_without_them(switch: str) -> None:
    """The AVX2 attention core (what AVX2-only CPUs run; AVX512 CPUs run attention_512.cpp) still
    matches torch, gives a row the same bits alone or in a chunk, and keeps tree forwards equal
    to one-token forwards bit for bit; on an AMX CPU the same for unpacked bf16 matrices (what
    AVX512-BF16 CPUs without AMX run)."""
    if switch == "FASTDECODE_NO_AMX" and not kernels.amx_bf16():
        pytest.skip("no AMX here: this process already runs the kernels FASTDECODE_NO_AMX would")
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, **{switch: "1"})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "(attention or tree_forward) and not process",
         str(tests / "test_kernels.py"), str(tests / "test_exactness.py")],
        env=env, capture_output=True, text=True, timeout=600, cwd=tests.parent,
    )
    assert done.returncode == 0 and " passed" in done.stdout, (done.stdout + done.stderr)[-3000:]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 33, 64])
@pytest.mark.parametrize("big_n", [1, 3, 5, 67])
@pytest.mark.parametrize("k", [7, 13, 40, 576, 1536])
def test_matches_f_linear(k: int, big_n: int, n: int, bias: bool) -> None:
    _check(n, k, big_n, bias)


@pytest.mark.parametrize("n", [1, 4, 16, 19])
def test_many_rows_split_across_threads(n: int) -> None:
    # Odd N over many row groups exercises the parallel split and row tails.
    _check(n, 576, 4099, bias=True)


def test_result_independent_of_thread_count() -> None:
    x, w, b = _inputs(9, 200, 1001, bias=True)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.bf16_linear(x, w, b)
        torch.set_num_threads(2)
        two = kernels.bf16_linear(x, w, b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_empty_batch_and_zero_k() -> None:
    x, w, b = _inputs(0, 16, 3, bias=True)
    assert kernels.bf16_linear(x, w, b).shape == (0, 3)
    x, w, b = _inputs(2, 0, 3, bias=True)
    torch.testing.assert_close(kernels.bf16_linear(x, w, b), b.expand(2, 3))


def _bad_args() -> list[tuple[str, tuple]]:
    x, w, b = _inputs(2, 16, 3, bias=True)
    return [
        ("x bf16", (x.bfloat16(), w, b)),
        ("x 1-D", (x[0], w, b)),
        ("x 3-D", (x[None], w, b)),
        ("weight fp32", (x, w.float(), b)),
        ("weight fp16", (x, w.half(), b)),
        ("K mismatch", (x, w[:, :8].contiguous(), b)),
        ("bias fp64", (x, w, b.double())),
        ("bias wrong N", (x, w, b[:2])),
        ("bias 2-D", (x, w, b[None])),
        ("x non-contiguous", (torch.randn(16, 2).t(), w, b)),
        ("weight non-contiguous", (x, torch.randn(16, 3).bfloat16().t(), b)),
    ]


@pytest.mark.parametrize("case", _bad_args(), ids=lambda c: c[0])
def test_bad_arguments_raise_value_error(case: tuple[str, tuple]) -> None:
    with pytest.raises(ValueError):
        kernels.bf16_linear(*case[1])


def test_build_failure_is_warned_once_and_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_build() -> None:
        raise OSError("no compiler\nsecond line")

    monkeypatch.setattr(kernels, "_op", None)
    monkeypatch.setattr(kernels, "_failure", None)
    monkeypatch.setattr(kernels, "_build", broken_build)
    with pytest.warns(UserWarning, match="OSError: no compiler$"):
        assert not kernels.bf16_linear_available()
    assert not kernels.bf16_linear_available()  # remembered: no second build, no warning
    x, w, b = _inputs(1, 16, 3, bias=False)
    with pytest.raises(RuntimeError, match="unavailable"):
        kernels.bf16_linear(x, w, b)


def test_a_row_does_not_depend_on_the_batch_or_the_threads() -> None:
    """Bitwise: each output element is summed in one fixed order whatever n and the thread count
    (every tile shape: pieces of 1-8 tokens, several token chunks, row tails)."""
    for n, k in [(2, 576), (3, 576), (4, 1536), (5, 576), (6, 1536), (7, 576), (8, 576), (9, 1536), (37, 576)]:
        x, w, b = _inputs(n, k, 203, bias=True)
        full = kernels.bf16_linear(x, w, b)
        for i in range(n):
            assert torch.equal(kernels.bf16_linear(x[i : i + 1], w, b)[0], full[i]), f"n={n} k={k} row {i}"
    x, w, b = _inputs(37, 576, 203, bias=True)
    full = kernels.bf16_linear(x, w, b)
    assert torch.equal(_on_one_thread(lambda: kernels.bf16_linear(x, w, b)), full)


def _attention_case(n: int, length: int, heads: int = 4, kv_heads: int = 2, hd: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * hd, generator=g)
    slots = -(-(length + n + 5) // 16) * 16  # whole blocks, as a bf16 cache needs
    cache = torch.randn(2, 3, kv_heads, slots, hd, generator=g)  # (k|v, layers, ...)
    angles = torch.rand(n, hd // 2, generator=g) * 6
    rot = torch.stack([angles.cos(), angles.sin()], dim=-1).contiguous()
    return qkv, cache[0].contiguous(), cache[1].contiguous(), rot


def _attention_reference(qkv, k_cache, v_cache, layer, length, rot, mask, heads, kv_heads, round_p=False):
    """Plain torch: rotate, write the cache, softmax attention (what model._attention_torch does);
    `round_p`: the softmax numerators e^(s - max) rounded to bf16 first (as over a bf16 cache)."""
    n = qkv.shape[0]
    hd = qkv.shape[1] // (heads + 2 * kv_heads)
    x = qkv.view(n, heads + 2 * kv_heads, hd)
    pairs = torch.view_as_complex(x[:, : heads + kv_heads].reshape(n, heads + kv_heads, hd // 2, 2).contiguous())
    qk = torch.view_as_real(pairs * torch.view_as_complex(rot).unsqueeze(1)).flatten(-2)
    k_cache[layer, :, length : length + n] = qk[:, heads:].transpose(0, 1)
    v_cache[layer, :, length : length + n] = x[:, heads + kv_heads :].transpose(0, 1)
    keys = k_cache[layer, :, : length + n].repeat_interleave(heads // kv_heads, 0)
    values = v_cache[layer, :, : length + n].repeat_interleave(heads // kv_heads, 0)
    if mask is None:
        mask = torch.ones(n, length + n, dtype=torch.bool)
        mask[:, length:] = torch.ones(n, n, dtype=torch.bool).tril()
    scores = (qk[:, :heads].transpose(0, 1) @ keys.transpose(1, 2)) / hd**0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    if round_p:
        p = (scores - scores.amax(-1, keepdim=True)).exp().to(torch.bfloat16).to(scores.dtype)
        attn = (p @ values) / p.sum(-1, keepdim=True)
    else:
        attn = scores.softmax(-1) @ values  # [heads, n, hd]
    return attn.transpose(0, 1).reshape(n, heads * hd)


@pytest.mark.parametrize("hd", [16, 64])  # 64: the four-keys-at-a-time path (SmolLM2's head size)
@pytest.mark.parametrize("n,length,masked", [(1, 0, False), (1, 37, False), (5, 0, False), (7, 20, False),
                                             (7, 20, True), (64, 9, True), (9, 150, False)])
def test_attention_matches_torch(n: int, length: int, masked: bool, hd: int) -> None:
    op = kernels.attention_op()
    qkv, k, v, rot = _attention_case(n, length, hd=hd)
    mask = None
    if masked:  # a random tree: each new token sees the cache, itself and a random earlier new token's path
        parents = [-1] + [int(torch.randint(-1, i, (1,))) for i in range(1, n)]
        mask = torch.zeros(n, length + n, dtype=torch.bool)
        mask[:, :length] = True
        for i, p in enumerate(parents):
            mask[i, length + i] = True
            if p >= 0:
                mask[i, length:] |= mask[p, length:]
    k2, v2 = k.clone(), v.clone()
    got = op(qkv, k, v, 1, length, rot, mask, 4, 2)
    want = _attention_reference(qkv, k2, v2, 1, length, rot, mask, 4, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k2, rtol=1e-6, atol=1e-6)  # the new keys landed in the pending slots, rotated
    assert torch.equal(v, v2)


@pytest.mark.parametrize("hd", [16, 64])
def test_attention_row_is_the_same_bits_alone_or_in_a_chunk(hd: int) -> None:
    """A token's output and cached k/v are bit-identical whether it comes with 63 others (tiled
    tasks, blocks of 64 slots) or alone after them: prefills can be split anywhere and a cached
    prefix reused, without changing a bit of what follows."""
    op = kernels.attention_op()
    n, length, heads, kv_heads = 64, 100, 6, 2
    qkv, k, v, rot = _attention_case(n, length, heads=heads, kv_heads=kv_heads, hd=hd)
    whole = op(qkv, k, v, 1, length, rot, None, heads, kv_heads)
    k2, v2 = k.clone(), v.clone()  # rows < t are in place; row t alone rewrites its own slot
    for t in (0, 5, 31, 63):  # row t alone, after rows < t were written by the chunk above
        alone = op(qkv[t : t + 1].contiguous(), k2, v2, 1, length + t, rot[t : t + 1].contiguous(), None, heads, kv_heads)
        assert torch.equal(alone[0], whole[t])
    assert torch.equal(k[:, :, : length + n], k2[:, :, : length + n]) and torch.equal(v, v2)


def test_attention_bad_arguments_name_the_problem() -> None:
    op = kernels.attention_op()
    qkv, k, v, rot = _attention_case(3, 4)
    with pytest.raises(RuntimeError, match="exceeds the cache"):
        op(qkv, k, v, 0, k.shape[2] - 1, rot, None, 4, 2)
    with pytest.raises(RuntimeError, match="mask must be"):
        op(qkv, k, v, 0, 4, rot, torch.ones(3, 5, dtype=torch.bool), 4, 2)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        op(qkv, k, v, 0, 4, rot, None, 3, 2)


def test_rms_norm_and_silu_mul_match_torch() -> None:
    ops = kernels.layer_ops()
    g = torch.Generator().manual_seed(3)
    for d in (7, 64, 576, 579):
        x, w = torch.randn(5, d, generator=g) * 3, torch.randn(d, generator=g)
        torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (d,), w, 1e-5), rtol=1e-5, atol=1e-6)
        gate, up = torch.randn(5, d, generator=g) * 4, torch.randn(5, d, generator=g)
        gate[0, :3] = torch.tensor([-100.0, 0.0, 90.0])  # far tails of the exp
        torch.testing.assert_close(ops.silu_mul(torch.cat([gate, up], 1)), F.silu(gate) * up, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="must be even"):
        ops.silu_mul(torch.randn(2, 7))


def test_silu_mul_gives_the_same_bits_without_avx512(tmp_path: Path) -> None:
    """The 16-lane loop (CPUs with AVX512) and the 8-lane one take the same steps per element."""
    ops = kernels.layer_ops()
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(rows, 2 * inter, generator=g) * 6 for rows, inter in ((1, 1536), (8, 1536), (3, 1001), (11, 24))]
    torch.save(inputs, tmp_path / "in.pt")
    code = ("import sys, torch; from fastdecode import kernels; ops = kernels.layer_ops(); "
            "torch.save([ops.silu_mul(x) for x in torch.load(sys.argv[1])], sys.argv[2])")
    env = dict(os.environ, FASTDECODE_NO_AVX512="1")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for x, other in zip(inputs, torch.load(tmp_path / "out.pt")):
        assert torch.equal(ops.silu_mul(x), other)


def test_silu_mul_split_over_threads_gives_each_row_its_own_bits() -> None:
    """From 8,192 elements silu_mul splits rows into column ranges over the threads: every row must
    still get exactly the bits it gets alone (the serial path), tails of 8 lanes and scalars included."""
    ops = kernels.layer_ops()
    g = torch.Generator().manual_seed(4)
    for rows, inter in ((11, 1536), (25, 1001), (6, 1500)):
        gate, up = torch.randn(rows, inter, generator=g) * 4, torch.randn(rows, inter, generator=g)
        gate[0, :3] = torch.tensor([-100.0, 0.0, 90.0])
        got = ops.silu_mul(torch.cat([gate, up], 1))
        assert rows * inter >= 8192  # the split path
        for r in range(rows):
            assert torch.equal(got[r], ops.silu_mul(torch.cat([gate[r : r + 1], up[r : r + 1]], 1))[0])
        torch.testing.assert_close(got, F.silu(gate) * up, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "bfloat16-amx", "int4", "float32"])
def test_fused_layer_equals_its_pieces(dtype: str) -> None:
    """`layer` is exactly rms_norm -> qkv -> attention -> o -> residual -> rms_norm -> gate_up ->
    silu_mul -> down -> residual, run op by op from Python (bit for bit). With AMX-packed weights
    the residuals are added inside the linear (bf16_linear_add), after the bias."""
    from fastdecode.quant import QLinear, quantize

    if dtype == "bfloat16-amx" and not kernels.amx_bf16():
        pytest.skip("this CPU has no AMX-BF16 (the packed weights' kernel)")

    heads, kv, hd, hidden, inter = 4, 2, 16, 64, 96
    g = torch.Generator().manual_seed(5)

    def lin(out_f: int, in_f: int, bias: bool = False) -> list:
        w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
        b = torch.randn(out_f, generator=g) if bias else None
        if dtype == "int4":
            return QLinear(quantize(w, "q4_1"), b).spec()
        if dtype == "bfloat16-amx":
            return [kernels.pack_amx(w.to(torch.bfloat16).contiguous()), None, None, b, None]
        return [w.to(getattr(torch, dtype)).contiguous(), None, None, b, None]

    def run(spec: list, x: torch.Tensor) -> torch.Tensor:
        w, scales, mins, b, rows = spec
        if w.dtype == torch.bfloat16:
            return kernels.bf16_linear_op()(x, w, b)
        if w.dtype == torch.float32:
            return F.linear(x, w, b)
        return kernels.q_linear_op()(x, w, scales, mins, b, int(rows))

    qkv, o, gate_up, down = lin((heads + 2 * kv) * hd, hidden, True), lin(hidden, heads * hd, True), lin(2 * inter, hidden), lin(hidden, inter)
    n1, n2 = torch.rand(hidden, generator=g) + 0.5, torch.rand(hidden, generator=g) + 0.5
    ops = kernels.layer_ops()
    for n, length in ((1, 9), (6, 9), (19, 9)):  # 19: two token tiles in the AMX kernel
        x = torch.randn(n, hidden, generator=g)
        rot = torch.view_as_real(torch.polar(torch.ones(n, hd // 2), torch.rand(n, hd // 2, generator=g) * 6)).contiguous()
        k1 = torch.randn(2, kv, 32, hd, generator=g)
        v1 = torch.randn(2, kv, 32, hd, generator=g)
        k2, v2 = k1.clone(), v1.clone()
        mask = torch.ones(n, length + n, dtype=torch.bool)
        mask[:, length:] = torch.ones(n, n, dtype=torch.bool).tril()
        got = ops.layer(x, n1, n2, 1e-5, qkv, o, gate_up, down, k1, v1, 1, length, rot, mask, heads, kv)
        attn = kernels.attention_op()(run(qkv, ops.rms_norm(x, n1, 1e-5)), k2, v2, 1, length, rot, mask, heads, kv)
        h = x + run(o, attn)
        want = h + run(down, ops.silu_mul(run(gate_up, ops.rms_norm(h, n2, 1e-5))))
        assert torch.equal(got, want)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    with pytest.raises(RuntimeError, match="qkv: a linear is"):
        ops.layer(x, n1, n2, 1e-5, qkv[:2], o, gate_up, down, k1, v1, 1, length, rot, mask, heads, kv)


@pytest.mark.parametrize("hd", [16, 32, 64, 128])
@pytest.mark.parametrize("n,length,masked", [(1, 0, False), (1, 37, False), (7, 20, True), (9, 150, False),
                                             (1, 200, False), (12, 170, True)])  # 150-200: AMX's sums from slot 0
def test_attention_over_a_bf16_cache(n: int, length: int, masked: bool, hd: int) -> None:
    """On the AVX512-BF16 core a bfloat16 KV cache holds new keys and values rounded to nearest even
    (as torch's .to(bfloat16) rounds them) in its own layouts (keys in 16-slot blocks, values in
    slot pairs), and attention is softmax attention over those entries with the queries and the
    softmax numerators rounded to bf16 as well (vdpbf16ps scores and weighted sums), up to fp32 sums."""
    if kernels.attention_isa() != "avx512bf16":
        pytest.skip("bf16 KV caches run on the AVX512-BF16 attention core only")
    op = kernels.attention_op()
    heads, kv_heads = 4, 2
    qkv, k, v, _ = _attention_case(n, length, hd=hd, seed=n + length)
    still = torch.stack([torch.ones(n, hd // 2), torch.zeros(n, hd // 2)], dim=-1).contiguous()  # RoPE by angle 0
    mask = None
    if masked:
        mask = torch.ones(n, length + n, dtype=torch.bool)
        mask[:, length:] = torch.rand(n, n, generator=torch.Generator().manual_seed(1)) < 0.5
        mask[:, length:] |= torch.eye(n, dtype=torch.bool)
    kb, vb = blocked_keys(k.to(torch.bfloat16)), paired_values(v.to(torch.bfloat16))
    got = op(qkv, kb, vb, 1, length, still, mask, heads, kv_heads)
    new = slice(length, length + n)
    x = qkv.view(n, heads + 2 * kv_heads, hd)
    assert torch.equal(key_rows(kb)[1, :, new], x[:, heads : heads + kv_heads].transpose(0, 1).to(torch.bfloat16))
    assert torch.equal(value_rows(vb)[1, :, new], x[:, heads + kv_heads :].transpose(0, 1).to(torch.bfloat16))
    assert torch.equal(key_rows(kb)[:, :, :length], k[:, :, :length].to(torch.bfloat16))  # the rest untouched
    assert torch.equal(value_rows(vb)[:, :, :length], v[:, :, :length].to(torch.bfloat16))
    # the reference in float64 over the same entries, queries and numerators rounded to bf16.
    # Nearly every (token, head) agrees to ~1e-7; where a numerator lies at a rounding boundary
    # the kernel's exp may round it the other way, one bf16 step (<= 2^-8 relative), which moves
    # that head's result by up to ~3e-3. Without rounding the numerators (or the queries) most
    # heads move by 1e-5 to 1e-3.
    rounded = qkv.to(torch.bfloat16).double()
    kd, vd = key_rows(kb).double(), value_rows(vb).double()
    want = _attention_reference(rounded, kd, vd, 1, length, still.double(), mask, heads, kv_heads, round_p=True)
    err = (got.double() - want).abs().view(n, heads, hd).amax(-1)
    assert err.max() < 5e-3 and (err > 1e-5).sum() <= max(1, err.numel() // 20), err
    # equal scores (zero queries): every numerator is 1, and the result is the visible values'
    # mean to fp32 rounding
    flat = qkv.clone()
    flat[:, : heads * hd] = 0
    got = op(flat, kb, vb, 1, length, still, mask, heads, kv_heads)
    want = _attention_reference(flat.to(torch.bfloat16).double(), kd, vd, 1, length, still.double(), mask, heads,
                                kv_heads)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hd", [16, 64, 128])
@pytest.mark.parametrize("length", [36, 37, 46, 150, 161])  # 150, 161: AMX's first 32-slot chunks end mid-chain
@pytest.mark.parametrize("nodes,chain", [([-1, 0, 0, 2, 2, 4, 3, 5], [0, 2, 4, 5]), ([-1, 0, 0], [0, 2]), ([-1, 0], [0, 1]),
                                         ([-1] + list(range(18)), list(range(19)))])
def test_attention_over_a_bf16_cache_tree_rows_are_one_token_rows(length: int, hd: int, nodes: list[int],
                                                                   chain: list[int]) -> None:
    """Over a bf16 cache (vdpbf16ps scores) a chain token in a tree, its ancestors spread among
    siblings' masked slots, gets the bits of the same token in one-token forwards, its ancestors
    compacted, for odd and even cache lengths, trees of 2, 3 and 8 tokens and a chain of 19
    (softmax sums run in 16 lanes by position: chains that cross a multiple of 16 past the
    cache, and one whose new positions fill a whole block of lanes; with AMX the weighted sums of
    positions below (position + 1 - 64) rounded down to 32 run on the tile unit, and the chains
    over 150 and 161 cached slots cross such a bound)."""
    if kernels.attention_isa() != "avx512bf16":
        pytest.skip("bf16 KV caches run on the AVX512-BF16 attention core only")
    op = kernels.attention_op()
    heads, kv_heads = 4, 2
    n = len(nodes)  # nodes: each input row's parent row (row 0 the root); chain: a root-to-leaf path
    tree = DraftTree([0] * (n - 1), [parent - 1 for parent in nodes[1:]])  # the engine's own mask and depths
    mask = torch.ones(n, length + n, dtype=torch.bool)
    mask[:, length:] = tree.ancestor_mask()
    for seed in range(4):
        qkv, k, v, rot = _attention_case(n, length, hd=hd, seed=length + hd + 1000 * seed)
        # queries 6x: scores spread wide, so the bf16 numerators span many exponents and a sum
        # taken in another order shows in its last bits (with the spread of x1, sums of bf16
        # numerators are mostly exact in any order, and a wrong order went unseen)
        qkv[:, : heads * hd] *= 6
        k, v = blocked_keys(k.to(torch.bfloat16)), paired_values(v.to(torch.bfloat16))
        rots = rot[torch.tensor(tree.depths())].contiguous()  # a node's angle follows its depth
        together = op(qkv, k.clone(), v.clone(), 1, length, rots, mask, heads, kv_heads)
        k_ar, v_ar = k.clone(), v.clone()
        for step, row in enumerate(chain):
            alone = op(qkv[row : row + 1].contiguous(), k_ar, v_ar, 1, length + step,
                       rots[row : row + 1].contiguous(), None, heads, kv_heads)
            assert torch.equal(alone[0], together[row]), f"seed {seed}: chain token {step} differs from its one-token forward"


@pytest.mark.parametrize("bf16", [False, True])
def test_attention_bits_do_not_depend_on_the_threads(bf16: bool) -> None:
    """A tree's attention is split into tasks of one KV group x a tile of tokens, run on however
    many threads there are: every query's result is the same bits for 1, 2 and 3 threads, over 3
    KV groups as SmolLM2 has, for trees of 2-13 tokens."""
    if bf16 and kernels.attention_isa() != "avx512bf16":
        pytest.skip("bf16 KV caches run on the AVX512-BF16 attention core only")
    op = kernels.attention_op()
    heads, kv_heads, length, hd = 9, 3, 70, 64
    threads = torch.get_num_threads()
    try:
        for n in (2, 3, 5, 9, 10, 13):
            qkv, k, v, rot = _attention_case(n, length, heads=heads, kv_heads=kv_heads, hd=hd, seed=n)
            if bf16:
                k, v = blocked_keys(k.to(torch.bfloat16)), paired_values(v.to(torch.bfloat16))
            parents = [-1] + [int(torch.randint(-1, i, (1,), generator=torch.Generator().manual_seed(i))) for i in range(n - 1)]
            mask = torch.ones(n, length + n, dtype=torch.bool)
            mask[:, length:] = DraftTree([0] * (n - 1), parents[1:]).ancestor_mask() if n > 1 else True
            outs = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                outs.append(op(qkv, k.clone(), v.clone(), 1, length, rot, mask, heads, kv_heads))
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), f"n={n}"
    finally:
        torch.set_num_threads(threads)


def test_attention_kv_cache_dtype_follows_the_core() -> None:
    """bf16 / int8 / int4 models get a bfloat16 KV cache where the AVX512-BF16 core runs, fp32 elsewhere;
    float32 models always keep fp32 (this test also runs in the FASTDECODE_NO_AVX512 process)."""
    from fastdecode.model import kv_cache_dtype

    bf16 = kernels.attention_isa() == "avx512bf16"
    assert kv_cache_dtype("float32", 64) == torch.float32
    for dtype in ("bfloat16", "int8", "int4"):
        assert kv_cache_dtype(dtype, 64) == (torch.bfloat16 if bf16 else torch.float32)
    assert kv_cache_dtype("bfloat16", 80) == torch.float32  # a head size the AVX512 core lacks


def test_attention_refuses_a_bf16_cache_without_the_avx512_core() -> None:
    """The AVX2 core takes fp32 caches only, and says so (runs in the FASTDECODE_NO_AVX512 process)."""
    if kernels.attention_isa() != "avx2":
        pytest.skip("this process runs an AVX512 core; the FASTDECODE_NO_AVX512 process runs this test")
    qkv, k, v, rot = _attention_case(1, 3)
    with pytest.raises(RuntimeError, match="bfloat16 cache needs the AVX512-BF16 core"):
        kernels.attention_op()(qkv, k.to(torch.bfloat16), v.to(torch.bfloat16), 1, 3, rot, None, 4, 2)


@pytest.mark.parametrize("n,k_in,n_out,k", [(9, 576, 4096, 8), (1, 64, 256, 8), (19, 96, 512, 20), (3, 32, 48, 8)])
def test_lm_head_ranked_as_written_equals_top_k_rows(n: int, k_in: int, n_out: int, k: int) -> None:
    """bf16_linear_topk: the AMX linear's outputs bit for bit, and each row's k largest as
    top_k_rows ranks them (value descending, the lower index first among equals; equal outputs
    planted in columns far apart, among the largest, and a NaN column, which is never taken), on
    1 and 2 threads (the lists of several threads merged)."""
    _amx_or_skip()
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n_out, k_in, generator=g).bfloat16()
    w[5] = w[7] = w[9] = w[n_out - 1] = 0.5  # equal outputs, large for x >= 0: among every row's top
    w[11, 0] = float("nan")
    x = torch.randn(n, k_in, generator=g).abs()
    packed = kernels.pack_amx(w)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y, top, values = kernels.bf16_linear_topk_op()(x, packed, k)
            want = kernels.bf16_linear_op()(x, packed, None)
            torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)  # bit for bit, the NaN column too
            want_top, want_values = kernels.top_k_rows_op()(want, k)
            assert torch.equal(top, want_top) and torch.equal(values, want_values)
            assert all({5, 7, 9, n_out - 1} <= set(row.tolist()) and 11 not in row.tolist() for row in top)
    finally:
        torch.set_num_threads(before)
