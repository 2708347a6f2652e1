"""Native CPU kernels for small-batch linears with fp32 activations: bf16 and block-quantized weights.

This module owns building, loading and calling ``csrc/linear_bf16.cpp``, ``csrc/linear_q.cpp``,
``csrc/attention.cpp`` and ``csrc/layer.cpp`` (one extension). The linears compute ``y[n, N] = x[n, K] @ W[N, K]^T (+ bias)`` with ``x``, ``bias`` and
``y`` in float32 and fp32 accumulation; ``W`` is stored as bfloat16 (``bf16_linear``) or in ggml's
32-weight blocks, Q4_1 or Q8_0 (``q_linear``, with activations quantized to int8 per block as
llama.cpp does; see ``fastdecode/quant.py``). ``attention`` does a
layer's RoPE, KV-cache writes and attention for up to 64 new tokens in one call, and ``layer`` a
whole decoder layer (norms, linears, attention, SiLU, residuals) in one call.

Why it exists: on AVX2-only CPUs (no AVX512-BF16/AMX, e.g. the 2-core AMD EPYC
this runtime is tuned on) torch's bf16 GEMM is fast only for one row. Measured
with 2 threads, ``F.linear`` on bf16 takes 0.23 ms at n=1 but 3.5 ms at n=16 for
W[3072, 576], and 3.9 ms vs 54 ms for the W[49152, 576] LM head; upcasting the
weights to fp32 doubles their memory traffic (10.6 ms at n=1). torch's weight-only
int8/int4 ops (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) take fp32
activations at ~25-100x their bf16-activation time, and with bf16 activations
still cost ~n times their 1-row time (e.g. 0.15 ms at n=1, 1.2 ms at n=16, same W).
Decoding, speculative verification and short prefills all live at n = 1..64, where
the op should cost about one pass over the weights. The kernels stream the weights
once per call and keep the per-tile work in registers; see the C++ files for the
tiling. ``scripts/bench_kernels.py`` measures them.

On CPUs with AVX512-BF16, ``bf16_linear`` runs ``csrc/linear_bf16_512.cpp`` instead
(``vdpbf16ps``, activations rounded to bf16; ``bf16_isa()`` says which): a bf16 forward of
16 tokens over 256 cached tokens then costs 1.44x one token, against 3.2x with the AVX2 kernels
on the same CPU (``scripts/forward_cost.py``). Both
compute every row in an order that does not depend on the number of rows, which is what keeps
speculative decoding token-for-token equal to AR. On CPUs with AVX512F/BW/VL the attention
core is ``csrc/attention_512.cpp`` (16 lanes; half the AVX2 core's time for a 16-token tree);
``FASTDECODE_NO_AVX512=1`` forces the AVX2 code for both.

On CPUs with AMX-BF16 (Intel Sapphire Rapids and later) a matrix packed by ``pack_amx`` runs
``csrc/linear_bf16_amx.cpp``, the tile unit: one token costs about what ``vdpbf16ps`` does and 16
tokens 1.1x one, where ``vdpbf16ps`` takes 2.4x (``scripts/bench_amx.py``, README). The model packs its bf16
matrices so at load where ``amx_bf16()`` holds; ``FASTDECODE_NO_AMX=1`` turns that off.

The extension is compiled on first use with ``torch.utils.cpp_extension.load``
and cached by torch under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); the first build takes ~30 s. A failed build is
remembered for the process and reported once via ``warnings.warn``.
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "amx_bf16", "attention_op", "bf16_isa", "bf16_kernel", "pack_amx", "bf16_linear", "layer_ops", "bf16_linear_available", "bf16_linear_op", "bf16_linear_topk_op", "cpu_supports_avx2_fma", "q_linear",
    "q_linear_op", "pack_panels", "unpack_panels", "race_pick_op", "sample_row_op", "top_k_rows_op",
    "race_orders_op", "recycle_propose_op", "recycle_update_op", "aded_table", "auto_core",
]

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = [_CSRC / name for name in ("linear_bf16.cpp", "linear_bf16_512.cpp", "linear_bf16_amx.cpp", "linear_q.cpp", "attention.cpp", "attention_512.cpp", "layer.cpp", "sampling.cpp", "aded.cpp", "auto.cpp")]
_HEADERS = [_CSRC / "kernels.h", _CSRC / "avx512.h"]
_EXTENSION_NAME = "fastdecode_kernels"

_lock = threading.Lock()
_op: Any = None  # torch.ops.fastdecode_kernels, once built and loaded
_failure: str | None = None  # why the kernel is unavailable, once known


def source_digest() -> str:
    """A short hash of the kernels' sources: measurements of the kernels (the cost curve) key on it."""
    import hashlib

    h = hashlib.sha1()
    for src in _SOURCES + _HEADERS:
        h.update(src.read_bytes())
    return h.hexdigest()[:12]


def cpu_supports_avx2_fma() -> bool:
    """Whether this CPU has the AVX2 and FMA instructions the kernel is built for."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    # No /proc (not Linux): torch's own dispatch level requires AVX2 and FMA.
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _build() -> Any:
    """Compile (or fetch from torch's cache) and load the extension; return its op namespace."""
    from torch.utils import cpp_extension

    flags = ["-O3", "-mavx2", "-mfma"]
    ldflags: list[str] = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is header code around `#pragma omp parallel`: without
        # -fopenmp it silently runs on one thread. The link adds a dependency on
        # libgomp.so.1, which the loader resolves to the copy torch has already
        # loaded, so the kernel shares torch's thread pool (no second runtime).
        flags.append("-fopenmp")
        ldflags.append("-fopenmp")
    cpp_extension.load(
        # torch rebuilds when a source changes but not a header: the digest in the name covers both
        name=f"{_EXTENSION_NAME}_{source_digest()}",
        sources=[str(src) for src in _SOURCES],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.fastdecode_kernels


def _load() -> Any:
    """Return the op namespace (or None), attempting the build at most once per process."""
    global _op, _failure
    if _op is not None or _failure is not None:
        return _op
    with _lock:
        if _op is not None or _failure is not None:
            return _op
        if not cpu_supports_avx2_fma():
            _failure = "this CPU lacks AVX2/FMA"
        else:
            try:
                _op = _build()
            except Exception as exc:  # compiler missing, build error, load error...
                first_line = (str(exc).strip().splitlines() or [""])[0]
                _failure = f"building the {_EXTENSION_NAME} extension failed: {type(exc).__name__}: {first_line}"
        if _failure is not None:
            warnings.warn(f"fastdecode kernels unavailable: {_failure}", stacklevel=3)
    return _op


def bf16_linear_available() -> bool:
    """True when the CPU has AVX2+FMA and the extension built and loaded.

    The first call triggers the (cached) build; a failure is remembered and
    warned about once, and every later call returns False without retrying.
    """
    return _load() is not None


def bf16_linear_op() -> Callable[..., torch.Tensor] | None:
    """The raw op `(x, weight, bias) -> y` for hot loops (it validates its inputs in C++), or None."""
    ops = _load()
    return None if ops is None else ops.bf16_linear


def bf16_isa() -> str | None:
    """Which bf16_linear runs on [N, K] weights: "avx512bf16" (vdpbf16ps, bf16-rounded activations; on
    CPUs with AVX512-BF16 unless FASTDECODE_NO_AVX512=1) or "avx2" (fp32 activations); None without
    kernels. Weights packed by ``pack_amx`` take the AMX kernel (``amx_bf16``)."""
    ops = _load()
    return None if ops is None else ops.bf16_isa()


def amx_bf16() -> bool:
    """True when ``bf16_linear`` can take ``pack_amx`` weights: the CPU has AMX-TILE and AMX-BF16, the
    OS lets this process use the tiles, AVX512-BF16 is on and ``FASTDECODE_NO_AMX`` is unset."""
    ops = _load()
    return ops is not None and bool(ops.amx_bf16())


def bf16_kernel() -> str | None:
    """The kernel a bf16 model's matrices run on (what reports print): "amx" where `build_model` packs
    them (``amx_bf16()``), else ``bf16_isa()``."""
    return "amx" if amx_bf16() else bf16_isa()


def pack_amx(weight: torch.Tensor) -> torch.Tensor:
    """bf16 ``[N, K]`` -> ``[N / 16, K / 2, 16, 2]``, the AMX kernel's layout: for each block of 16 output
    rows, pair by pair of k, the rows' two weights side by side. N must be a multiple of 16, K of 32."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D bfloat16 tensor [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if n % 16 or k % 32:
        raise ValueError(f"pack_amx needs N % 16 == 0 and K % 32 == 0, got N={n}, K={k}")
    return weight.reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def attention_isa() -> str | None:
    """Which attention core runs: "avx512bf16" (csrc/attention_512.cpp on a CPU with AVX512-BF16: takes
    bf16 KV caches too, scored by vdpbf16ps), "avx512" (the same core without AVX512-BF16: fp32 caches)
    or "avx2" (fp32 caches; also forced by FASTDECODE_NO_AVX512=1); None without kernels."""
    ops = _load()
    return None if ops is None else ops.attention_isa()


def attention_op() -> Callable[..., torch.Tensor] | None:
    """The raw op `(qkv, cache_k, cache_v, layer, length, rot, mask, heads, kv_heads) -> attn`:
    RoPE, the pending KV writes and attention of one layer in one call (csrc/attention.cpp), or None."""
    ops = _load()
    return None if ops is None else ops.attention


def race_pick_op() -> Callable[[torch.Tensor, int, int], int] | None:
    """The raw op `(probs, seed, index) -> token`: the seeded sampler's draw (csrc/sampling.cpp), or None."""
    ops = _load()
    return None if ops is None else ops.race_pick


def sample_row_op() -> Callable[..., tuple[int, float]] | None:
    """The raw op `(logits [vocab] float32, temperature, top_k, top_p, min_p, nucleus_cut, seed, index)
    -> (token, probability)`: `Sampler.probs` and the race in one native pass (csrc/sampling.cpp), or None."""
    ops = _load()
    return None if ops is None else ops.sample_row


def top_k_rows_op() -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None:
    """The raw op `(x [n, V] float32, k) -> (indices int64 [n, k], values float32 [n, k])`: each
    row's k largest entries, largest first, lower index first among equals, NaNs never (-1 and 0
    past a row's non-NaN values) (csrc/sampling.cpp), or None."""
    ops = _load()
    return None if ops is None else ops.top_k_rows


def recycle_update_op() -> Callable[..., None] | None:
    """The raw op `(successors [V, k] int32, logits [V, k] float32, scored [V] bool, rows [n],
    top [n, k] int64, top_values [n, k] float32, accepted) -> None`: Token Recycling's table update
    from a verify step's rows' top k, in place (csrc/sampling.cpp; drafters/recycling.py), or None."""
    ops = _load()
    return None if ops is None else ops.recycle_update


def bf16_linear_topk_op() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """The raw op `(x, AMX-packed weight, k) -> (y, indices [n, k], values [n, k])`: the linear and
    each row's k largest outputs as `top_k_rows_op` ranks them (csrc/linear_bf16_amx.cpp), or None."""
    ops = _load()
    return None if ops is None else ops.bf16_linear_topk


def race_orders_op() -> Callable[..., list[int]] | None:
    """The raw op `(successors [V, k] int32, logits [V, k] float32, tokens, indices, temperature,
    top_k, top_p, seed) -> orders`: Token Recycling's successors of each token in the sampler's race
    order at its index, the orders concatenated (csrc/sampling.cpp; drafters/recycling.py), or None."""
    ops = _load()
    return None if ops is None else ops.race_orders


def recycle_propose_op() -> Callable[..., tuple[list[int], list[int]]] | None:
    """The raw op `(successors, logits, template parents, template ranks, root, temperature (0:
    greedy), top_k, top_p, seed, count) -> (tokens, parents)`: Token Recycling's template walk
    (csrc/sampling.cpp; drafters/recycling.py), or None."""
    ops = _load()
    return None if ops is None else ops.recycle_propose


def aded_table(top_m: int, c_puct: float, max_depth: int) -> Any:
    """A new native ADED table (csrc/aded.cpp: tri-gram counts and the PUCT draft search of
    drafters/aded.py), or None when the kernels are unavailable."""
    ops = _load()
    return None if ops is None else torch.classes.fastdecode_kernels.AdedTable(top_m, c_puct, max_depth)


def auto_core(base_rate: float, prior_weight: float, max_trials: float, max_rank: int, max_agree: int,
              max_seen: int) -> Any:
    """A new native core of `auto` (csrc/auto.cpp: its merge, node scores and statistics), or None
    when the kernels are unavailable."""
    ops = _load()
    return None if ops is None else torch.classes.fastdecode_kernels.AutoCore(
        base_rate, prior_weight, max_trials, max_rank, max_agree, max_seen)


def layer_ops() -> Any:
    """The namespace with `layer` (a whole decoder layer in one call), `layer_batch` (the same for
    every sequence of a batch), `rms_norm` and `silu_mul` (csrc/layer.cpp), or None when the
    kernels are unavailable."""
    return _load()


def q_linear_op() -> Callable[..., torch.Tensor] | None:
    """The raw op `(x, codes, scales, mins, bias, rows) -> y` on panel-packed blocks (see `q_linear`
    and `pack_panels`), or None."""
    ops = _load()
    return None if ops is None else ops.q_linear


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ValueError unless the arguments match what the kernel reads raw."""
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"x must be a 2-D float32 tensor [n, K], got {x.dtype} {tuple(x.shape)}")
    packed = weight.dim() == 4 and tuple(weight.shape[2:]) == (16, 2)
    if weight.dtype != torch.bfloat16 or not (weight.dim() == 2 or packed):
        raise ValueError(
            f"weight must be a bfloat16 tensor [N, K] or pack_amx's [N / 16, K / 2, 16, 2], "
            f"got {weight.dtype} {tuple(weight.shape)}"
        )
    if packed and not amx_bf16():
        raise ValueError("pack_amx weights need a CPU with AMX-BF16 (amx_bf16() is False)")
    n_out, k = (weight.shape[0] * 16, weight.shape[1] * 2) if packed else tuple(weight.shape)
    if k != x.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but weight has K={k}")
    tensors = [("x", x), ("weight", weight)]
    if bias is not None:
        if bias.dtype != torch.float32 or tuple(bias.shape) != (n_out,):
            raise ValueError(f"bias must be a float32 tensor [{n_out}], got {bias.dtype} {tuple(bias.shape)}")
        tensors.append(("bias", bias))
    for name, t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` with bf16 weights, fp32 activations and fp32 accumulation.

    x: float32 [n, K], contiguous. weight: bfloat16 [N, K], contiguous, or ``pack_amx(W)`` where
    ``amx_bf16()`` holds (the AMX kernel: another summation order, as row-independent).
    bias: float32 [N] or None. Returns a new float32 [n, N] tensor. Matches
    ``F.linear(x, weight.float(), bias)`` up to fp32 summation order.

    Raises ValueError on bad shapes, dtypes, devices or layouts, and
    RuntimeError if the kernel is unavailable (check ``bf16_linear_available``).
    """
    _check_args(x, weight, bias)
    op = bf16_linear_op()
    if op is None:
        raise RuntimeError(f"fastdecode bf16_linear kernel unavailable: {_failure}")
    return op(x, weight, bias)


PANEL = 8  # output rows per panel in q_linear's packed layout (see csrc/linear_q.cpp)


def pack_panels(
    codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ggml's row-major blocks -> q_linear's 8-row panels (csrc/linear_q.cpp explains the layout).

    codes uint8 [N, K/2] (Q4_1) or int8 [N, K] (Q8_0), scales (and Q4_1 mins) float32 [N, K/32].
    Returns codes [ceil(N/8), K/32 * 128 or 256], scales and mins [ceil(N/8), K/32, 8]; the last
    panel is padded with zero rows. Raises ValueError on arrays that are not such blocks.
    """
    if codes.dtype not in (torch.uint8, torch.int8) or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D uint8 (Q4_1) or int8 (Q8_0) tensor, got {codes.dtype} {tuple(codes.shape)}")
    q4 = codes.dtype == torch.uint8
    n, width = codes.shape
    per_block = 16 if q4 else 32
    if width % per_block:
        raise ValueError(f"codes width {width} is not a whole number of {per_block}-byte blocks (K must be a multiple of 32)")
    nb = width // per_block
    for name, t in (("scales", scales), ("mins", mins)):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (n, nb)):
            raise ValueError(f"{name} must be a float32 tensor [{n}, {nb}], got {t.dtype} {tuple(t.shape)}")
    if q4 != (mins is not None):
        raise ValueError("Q4_1 codes (uint8) need mins" if q4 else "Q8_0 codes (int8) take no mins")
    pad = -n % PANEL

    def panels(t: torch.Tensor) -> torch.Tensor:  # [N, ...] -> [G, 8, ...], zero rows appended
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t
        return t.reshape(-1, PANEL, *t.shape[1:])

    groups = 4 if q4 else 8  # 32-byte vectors per panel-block
    packed = panels(codes).reshape(-1, PANEL, nb, groups, 4).permute(0, 2, 3, 1, 4).reshape(-1, nb * groups * 32)
    side = [None if t is None else panels(t).transpose(1, 2).contiguous() for t in (scales, mins)]
    return packed.contiguous(), side[0], side[1]


def unpack_panels(
    codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of `pack_panels`: ggml's row-major blocks of the first `rows` rows."""
    groups = 4 if codes.dtype == torch.uint8 else 8
    nb = scales.shape[1]
    flat = codes.reshape(-1, nb, groups, PANEL, 4).permute(0, 3, 1, 2, 4).reshape(-1, nb * groups * 4)
    side = [None if t is None else t.transpose(1, 2).reshape(-1, nb)[:rows].contiguous() for t in (scales, mins)]
    return flat[:rows].contiguous(), side[0], side[1]


def q_linear(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` with W in 32-weight blocks (ggml Q4_1 or Q8_0 layout).

    q4: codes uint8 [N, K/2], scales and mins float32 [N, K/32]: w = scale * q + min, q in 0..15.
    q8: codes int8 [N, K], scales float32 [N, K/32], mins None: w = scale * q.
    x: float32 [n, K] with K a multiple of 32; bias float32 [N] or None. As in llama.cpp, x is
    quantized per 32-block to int8 (scale max|x| / 127) and the block dots are integer. Every
    output element is summed in one fixed order, so a row's result does not depend on n or the
    thread count. (This packs the blocks on every call; `QLinear` packs once, at load.)

    Raises ValueError on bad arguments and RuntimeError if the kernels are unavailable.
    """
    op = q_linear_op()
    if op is None:
        raise RuntimeError(f"fastdecode q_linear kernel unavailable: {_failure}")
    if x.dim() != 2 or codes.dim() != 2:
        raise ValueError(f"x [n, K] and codes [N, bytes] must be 2-D, got {tuple(x.shape)} and {tuple(codes.shape)}")
    if x.shape[1] % 32:
        raise ValueError(f"K = {x.shape[1]} must be a multiple of 32")
    packed = pack_panels(codes, scales, mins)
    try:
        return op(x, *packed, bias, codes.shape[0])
    except RuntimeError as exc:  # the C++ checks name the bad argument and what is allowed
        raise ValueError(str(exc).splitlines()[0]) from exc
