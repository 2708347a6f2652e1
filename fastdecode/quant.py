"""Block-quantized weights (dtypes `int4` and `int8`): ggml's Q4_1 and Q8_0 formats, in memory.

A weight [N, K] is cut into blocks of 32 consecutive input features per output row:
- Q4_1 (`int4`): 4-bit codes q in 0..15 and per-block scale d and min m, w = d * q + m
  (4.5 + 1 bits per weight here, with fp32 d and m);
- Q8_0 (`int8`): 8-bit codes q in -127..127 and a per-block scale d, w = d * q.

When the checkpoint is a GGUF file that already stores a matrix in the requested format, its
blocks are used as they are (the fp16 scales widened to fp32), so the model computes with exactly
the file's weights. Otherwise the fp32 weight is quantized here as ggml does (block min/max for
Q4_1, absolute max / 127 for Q8_0). The LM head
(the tied embedding of small models) is the most sensitive matrix: it is kept in Q8_0 for both
dtypes, as llama.cpp does. The matmuls run in `csrc/linear_q.cpp` (`kernels.q_linear`), which, like
llama.cpp, also rounds each activation block of 32 to int8 (scale max|x| / 127) so that the block
dots are integer; the norms, attention, KV cache and residual stream stay fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fastdecode.kernels import pack_panels, q_linear_op, unpack_panels

BLOCK = 32
QUANT_DTYPES = {"int4": "q4_1", "int8": "q8_0"}  # dtype name -> block format of the layer matrices
_GGUF_BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}  # fp16 d (+ fp16 m) + codes


@dataclass
class Blocks:
    """One matrix in block form: the arrays `q_linear` reads."""

    kind: str  # "q4_1" | "q8_0"
    codes: torch.Tensor  # uint8 [N, K/2] (q4_1) | int8 [N, K] (q8_0)
    scales: torch.Tensor  # float32 [N, K/32]
    mins: torch.Tensor | None  # float32 [N, K/32] (q4_1) | None

    def rows(self, fn) -> Blocks:
        """The same blocks with a row operation (a permutation, a slice) applied to every array."""
        return Blocks(self.kind, fn(self.codes), fn(self.scales), None if self.mins is None else fn(self.mins))

    def dequantize(self) -> torch.Tensor:
        """The fp32 matrix [N, K] these blocks stand for."""
        n = self.codes.shape[0]
        if self.kind == "q4_1":
            c = self.codes.view(n, -1, 16)
            q = torch.cat([c & 0x0F, c >> 4], dim=-1).float()  # [N, K/32, 32]: low nibbles first
            w = torch.addcmul(self.mins.unsqueeze(-1), q, self.scales.unsqueeze(-1))
        else:
            w = self.codes.view(n, -1, BLOCK).float() * self.scales.unsqueeze(-1)
        return w.reshape(n, -1)


def cat_blocks(parts: list[Blocks]) -> Blocks:
    """Stack matrices along their output rows (q|k|v, gate|up); all parts must share a format."""
    kinds = {p.kind for p in parts}
    if len(kinds) != 1:
        raise ValueError(f"cannot fuse matrices stored in different block formats {sorted(kinds)}")
    mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
    return Blocks(parts[0].kind, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), mins)


def quantize(w: torch.Tensor, kind: str) -> Blocks:
    """ggml's reference quantization of an fp32 matrix [N, K] (K a multiple of 32)."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"cannot quantize a matrix with {k} input features: it must be a multiple of {BLOCK}")
    b = w.float().reshape(n, k // BLOCK, BLOCK)
    if kind == "q8_0":
        d = b.abs().amax(-1) / 127
        q = torch.where(d.unsqueeze(-1) > 0, b / d.unsqueeze(-1), 0).round().clamp(-127, 127)
        return Blocks(kind, q.to(torch.int8).reshape(n, k), d.contiguous(), None)
    if kind == "q4_1":
        lo, hi = b.amin(-1), b.amax(-1)
        d = (hi - lo) / 15
        q = torch.where(d.unsqueeze(-1) > 0, (b - lo.unsqueeze(-1)) / d.unsqueeze(-1), 0).round().clamp(0, 15)
        q = q.to(torch.uint8)
        codes = q[..., :16] | (q[..., 16:] << 4)  # byte j: element j (low nibble), element j + 16 (high)
        return Blocks(kind, codes.reshape(n, k // 2).contiguous(), d.contiguous(), lo.contiguous())
    raise ValueError(f"unknown block format {kind!r}; supported: q4_1, q8_0")


def from_gguf(raw: np.ndarray, kind: str, rows: int) -> Blocks:
    """Blocks from a GGUF tensor's bytes (ggml block structs, row-major), `rows` output rows."""
    size = _GGUF_BLOCK_BYTES[kind]
    data = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1, size)
    scales = torch.from_numpy(data[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if kind == "q4_1":
        mins = torch.from_numpy(data[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        codes = torch.from_numpy(data[..., 4:].copy()).reshape(rows, -1)
        return Blocks(kind, codes, scales, mins)
    codes = torch.from_numpy(data[..., 2:].copy().view(np.int8)).reshape(rows, -1)
    return Blocks(kind, codes, scales, None)


class QLinear(nn.Module):
    """y = x dequant(W)^T (+ b) with W in blocks (x rounded to int8 per block inside; fp32 in and out).

    The blocks are kept in the kernel's 8-row panel layout (`kernels.pack_panels`), packed once here.
    """

    def __init__(self, blocks: Blocks, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.kind = blocks.kind
        self.rows = blocks.codes.shape[0]
        codes, scales, mins = pack_panels(
            blocks.codes.contiguous(), blocks.scales.float().contiguous(),
            None if blocks.mins is None else blocks.mins.float().contiguous(),
        )
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self._rows = torch.tensor(self.rows)
        self.op = q_linear_op()
        if self.op is None:
            raise RuntimeError("block-quantized dtypes need the fastdecode C++ kernels (AVX2/FMA CPU and a compiler)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x.contiguous(), self.codes, self.scales, self.mins, self.bias, self.rows)

    def blocks(self) -> Blocks:
        """The weights as ggml's row-major blocks."""
        return Blocks(self.kind, *unpack_panels(self.codes, self.scales, self.mins, self.rows))

    def spec(self) -> list[torch.Tensor | None]:
        """[codes, scales, mins, bias, rows]: how the fused layer kernel takes a linear (csrc/layer.cpp)."""
        return [self.codes, self.scales, self.mins, self.bias, self._rows]

    @property
    def nbytes(self) -> int:
        """Bytes one pass over this matrix reads."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins) if t is not None)
