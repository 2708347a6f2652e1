"""Llama-family forward pass: explicit positions, a KV cache owned by the caller, any attention mask.

`Transformer.forward(tokens, positions, cache, mask)` runs n new tokens at arbitrary positions
(a draft tree puts siblings at the same position) under an arbitrary boolean mask over
cached + new slots. Weights are stored fused (q|k|v and gate|up) so one step is a few large
matmuls per layer rather than many small ones.
"""
from __future__ import annotations

import ctypes
import math
import mmap
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastdecode.config import ModelConfig
from fastdecode.kernels import (amx_bf16, attention_isa, attention_op, bf16_linear_op, bf16_linear_topk_op, layer_ops,
                                pack_amx)
from fastdecode.kv_cache import KVCache
from fastdecode.quant import QUANT_DTYPES, Blocks, QLinear, cat_blocks, quantize
from fastdecode.sampling import TOP_K


# how each dtype stores the matrices while loading (block formats are applied after)
# (the keys are the dtype names the API accepts, in the order help and errors list them)
MATRIX_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.float32, "int4": torch.float32}


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies, with linear or llama3-style scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(is_mid, mid, inv_freq)
    elif kind != "default":
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")
    return inv_freq


def rope_table(cfg: ModelConfig, max_len: int) -> torch.Tensor:
    """`[max_len, head_dim // 2]` complex64 rotations cos + i sin for every position."""
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(cfg))
    return torch.complex(angles.cos(), angles.sin())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = layer_ops()  # the fused layer's own norm, so every path gives the same bits
        if ops is not None and x.dim() == 2 and x.dtype == torch.float32:
            return ops.rms_norm(x.contiguous(), self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] (the fused layer's own code when it is built)."""
    ops = layer_ops()
    if ops is not None and gate_up.dim() == 2 and gate_up.dtype == torch.float32:
        return ops.silu_mul(gate_up.contiguous())
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Linear(nn.Module):
    """y = x W^T (+ b) with fp32 activations and W stored as float32 or bfloat16.

    bf16 weights go through the hand-written kernels when they are available: on CPUs without
    native bf16 math torch's bf16 GEMM costs ~n times its 1-row time for n rows (see kernels.py).
    On CPUs with AMX the weight is `pack_amx`'s [N / 16, K / 2, 16, 2] after `build_model`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32:
            return F.linear(x, self.weight, self.bias)
        op = bf16_linear_op()
        if op is not None:
            return op(x, self.weight, self.bias)
        y = F.linear(x.to(self.weight.dtype), self.weight).float()  # slow where the CPU lacks bf16 math
        return y if self.bias is None else y + self.bias

    def spec(self) -> list[torch.Tensor | None]:
        """[weight, scales, mins, bias, rows]: how the fused layer kernel takes a linear (csrc/layer.cpp)."""
        return [self.weight, None, None, self.bias, None]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv = Linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias)
        self.o = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self._specs: list[list[torch.Tensor | None]] | None = None  # the linears as layer() takes them
        self._native: tuple[Any, ...] | None = None  # native_weights(), built once

    def forward(
        self,
        x: torch.Tensor,  # [n, hidden]
        rot: torch.Tensor,  # [n, head_dim // 2] complex
        cache: KVCache,
        layer: int,
        mask: torch.Tensor | None,  # [n, cache.length + n] bool, or None for causal
        attention: Callable[..., torch.Tensor] | None = None,  # the kernel, given rot_real
        rot_real: torch.Tensor | None = None,  # [n, head_dim // 2, 2] (cos, sin)
    ) -> torch.Tensor:
        n, hd = x.shape[0], self.head_dim
        ops = layer_ops()
        if attention is not None and ops is not None:  # the whole layer in one native call
            return self.native(ops, x, cache, layer, rot_real, mask)
        qkv = self.qkv(self.attn_norm(x))
        if attention is not None:
            attn = attention(qkv, cache.k, cache.v, layer, cache.length, rot_real, mask, self.n_heads, self.n_kv)
            x = x + self.o(attn)
        else:
            x = x + self.o(self._attention_torch(qkv.view(n, self.n_heads + 2 * self.n_kv, hd), rot, cache, layer, mask))
        return x + self.down(silu_mul(self.gate_up(self.mlp_norm(x))))

    def native(self, ops: Any, x: torch.Tensor, cache: KVCache, layer: int, rot_real: torch.Tensor | None,
               mask: torch.Tensor | None) -> torch.Tensor:
        """The layer in one native call (csrc/layer.cpp), given the kernels' op namespace."""
        return ops.layer(x, *self.native_weights(), cache.k, cache.v, layer, cache.length, rot_real, mask,
                         self.n_heads, self.n_kv)

    def native_weights(self) -> tuple[Any, ...]:
        """(attn_norm, mlp_norm, eps, qkv, o, gate_up, down): the weights as `layer` takes them."""
        if self._native is None:
            self._native = (self.attn_norm.weight, self.mlp_norm.weight, self.attn_norm.eps, *self.specs())
        return self._native

    def specs(self) -> list[list[torch.Tensor | None]]:
        """The four linears as the fused layer kernels take them (built once)."""
        if self._specs is None:
            self._specs = [m.spec() for m in (self.qkv, self.o, self.gate_up, self.down)]
        return self._specs

    def _attention_torch(
        self, qkv: torch.Tensor, rot: torch.Tensor, cache: KVCache, layer: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The same as the kernel with torch ops (long prefills, or no kernel): -> [n, heads * hd]."""
        n, hd = qkv.shape[0], self.head_dim
        qk = _rope(qkv[:, : self.n_heads + self.n_kv], rot)  # [n, heads + kv_heads, hd]
        q = qk[:, : self.n_heads].transpose(0, 1)  # [heads, n, hd]
        k = qk[:, self.n_heads :].transpose(0, 1)  # [kv_heads, n, hd]
        v = qkv[:, self.n_heads + self.n_kv :].transpose(0, 1)
        keys, values = cache.write(layer, k, v)  # [kv_heads, length + n, hd]
        keys, values = keys.float(), values.float()  # (a bf16 cache: widened exactly)
        causal = mask is None and n > 1 and keys.shape[1] == n
        if mask is None and n > 1 and not causal:
            mask = causal_mask(keys.shape[1] - n, n)
        attn = F.scaled_dot_product_attention(
            q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
            attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_heads,
        )  # [1, heads, n, hd]
        return attn[0].transpose(0, 1).reshape(n, self.n_heads * hd)


    def forward_segments(self, x: torch.Tensor, segments: list["_Prepared"], layer: int) -> torch.Tensor:
        """`forward` for several sequences at once: x is their rows concatenated; the linears run
        once over all rows, attention once per segment against its own cache."""
        qkv = _linear_rows(self.qkv, self.attn_norm(x), segments)
        parts = []
        for seg in segments:
            rows, cache = qkv[seg.rows], seg.segment.cache
            if seg.kernel is not None:
                parts.append(seg.kernel(
                    rows, cache.k, cache.v, layer, cache.length, seg.rot_real, seg.mask, self.n_heads, self.n_kv
                ))
            else:
                view = rows.view(rows.shape[0], self.n_heads + 2 * self.n_kv, self.head_dim)
                parts.append(self._attention_torch(view, seg.rot, cache, layer, seg.mask))
        x = x + _linear_rows(self.o, torch.cat(parts) if len(parts) > 1 else parts[0], segments)
        return x + _linear_rows(self.down, silu_mul(_linear_rows(self.gate_up, self.mlp_norm(x), segments)), segments)


@dataclass
class Segment:
    """One sequence's part of a batched forward: the same arguments `Transformer.forward` takes."""

    tokens: torch.Tensor  # [n] int64
    positions: torch.Tensor  # [n] int64
    cache: KVCache
    mask: torch.Tensor | None = None  # [n, cache.length + n] bool; None = causal
    last_only: bool = False


@dataclass
class _Prepared:
    """A segment with its row range in the batch and its attention inputs."""

    segment: Segment
    rows: slice
    rot: torch.Tensor  # [n, head_dim // 2] complex
    rot_real: torch.Tensor | None
    mask: torch.Tensor | None
    kernel: Callable[..., torch.Tensor] | None


def row_independent(linear: nn.Module) -> bool:
    """True when a row's output does not depend on the other rows of the matmul, bit for bit: our
    kernels (bf16 with AVX2, int8/int4). torch's fp32 GEMM picks its blocking from the shape."""
    if isinstance(linear, QLinear):
        return True
    return linear.weight.dtype == torch.bfloat16 and bf16_linear_op() is not None


def _linear_rows(linear: nn.Module, x: torch.Tensor, segments: list[_Prepared]) -> torch.Tensor:
    """`linear(x)` over a batch's rows: one matmul when that is exact, else one per segment (so each
    segment gets exactly the numbers its own forward would)."""
    if len(segments) == 1 or row_independent(linear):
        return linear(x)
    return torch.cat([linear(x[seg.rows]) for seg in segments])


def _rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """RoPE on `x [n, heads, hd]` whose q/k features are stored as interleaved pairs (see
    `_interleave_rope_rows`): one complex multiply instead of rotate-half's five ops."""
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # [n, heads, hd // 2]
    return torch.view_as_real(pairs * rot.unsqueeze(1)).flatten(-2)


def causal_mask(cached: int, n: int) -> torch.Tensor:
    """`[n, cached + n]` bool mask: every new token sees the cache and the new tokens before it."""
    mask = torch.ones(n, cached + n, dtype=torch.bool)
    mask[:, cached:] = torch.ones(n, n, dtype=torch.bool).tril_()
    return mask


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        # no random init (the loaded weights replace it): on the meta device (build_model) its normal_
        # went through torch's Python decompositions, whose first use cost ~0.6-1.3 s a process
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_len = max_len
        self._stacks: dict[tuple[int, ...], tuple[Any, ...]] = {}  # _stacked(), per layer set
        with torch.device("cpu"):  # real numbers even when built on the meta device (build_model)
            self.register_buffer("rope", rope_table(cfg, max_len), persistent=False)
        # the last `forward`'s final hidden states, before the norm, every row (the `head` drafter
        # reads them); None after a batched forward
        self.hidden: torch.Tensor | None = None
        # the last forward's rows' TOP_K largest logits (indices, values; sampling.top_rows) when
        # the AMX LM head ranked them as it wrote them (a tree's forward), else None
        self.row_top: tuple[np.ndarray, np.ndarray] | None = None
        self.kv_dtype = torch.float32  # build_model: bfloat16 where the matrices are not fp32 (kv_cache_dtype)

    @property
    def exact_rows(self) -> bool:
        """True when a row's numbers depend only on its token, its position and the cache, never on
        the other rows of the forward (native attention, and linears that are row-independent: see
        `row_independent`). Then a prompt may be prefilled in pieces, or after a cached prefix, and
        every later number is bit-identical to a whole prefill."""
        b = self.blocks[0]
        return attention_op() is not None and all(row_independent(m) for m in (b.qkv, b.o, b.gate_up, b.down))

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim, self.max_len, self.kv_dtype)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # [n] int64
        positions: torch.Tensor,  # [n] int64
        cache: KVCache,
        mask: torch.Tensor | None = None,  # [n, cache.length + n] bool; None = causal
        last_only: bool = False,
        layers: Sequence[int] | None = None,  # run only these layers (self-drafting); None = all
    ) -> torch.Tensor:
        """Run n new tokens; their K/V are left pending in `cache` (in the layers that ran).
        Returns fp32 logits [n or 1, vocab]."""
        n = tokens.shape[0]
        cache.check_room(n)
        if mask is not None and tuple(mask.shape) != (n, cache.length + n):
            raise ValueError(f"mask shape {tuple(mask.shape)} must be (new tokens, cached + new) = {(n, cache.length + n)}")
        rot = self.rope[positions]
        kernel = attention_op()  # any n: a row's numbers do not depend on the rows beside it
        rot_real = torch.view_as_real(rot) if kernel is not None else None
        if kernel is not None and mask is not None:
            mask = mask.to(torch.bool).contiguous()
        x = self.embed(tokens).float()
        blocks = list(self.blocks)  # ModuleList indexing costs ~3 us a layer
        order = range(len(blocks)) if layers is None else layers
        ops = layer_ops()
        if kernel is not None and ops is not None:  # Block.forward's native path, every layer in one call
            b = blocks[0]
            x = ops.layers(x, *self._stacked(order), cache.k, cache.v, cache.length, rot_real, mask, b.n_heads, b.n_kv)
        else:
            for layer in order:
                x = blocks[layer](x, rot, cache, layer, mask, kernel, rot_real)
        self.hidden = x
        self.row_top = None
        if last_only:
            x = x[-1:]
        x = self.norm(x)
        op = bf16_linear_topk_op()
        weight = getattr(self.lm_head, "weight", None)  # a QLinear (int8 / int4) has codes instead
        if x.shape[0] > 1 and op is not None and weight is not None and weight.dim() == 4:  # AMX-packed: ranked as written
            logits, top, values = op(x, weight, min(TOP_K, self.cfg.vocab_size))
            self.row_top = (top.numpy(), values.numpy())
            return logits
        return self.lm_head(x).float()

    def _stacked(self, order: Sequence[int]) -> tuple[Any, ...]:
        """(attn norms, mlp norms, eps, the linears' entries flat, layer ids): the layers `order`
        as the native `layers` op takes them, built once per layer set."""
        key = tuple(order)
        stacked = self._stacks.get(key)
        if stacked is None:
            weights = [self.blocks[i].native_weights() for i in key]  # (attn_norm, mlp_norm, eps, 4 specs)
            linears = [entry for w in weights for spec in w[3:] for entry in spec]
            eps = weights[0][2] if weights else 1e-6
            stacked = self._stacks[key] = ([w[0] for w in weights], [w[1] for w in weights], eps, linears, list(key))
        return stacked

    @torch.inference_mode()
    def forward_batch(self, segments: list[Segment]) -> list[torch.Tensor]:
        """`forward` for several sequences in one pass (continuous batching): the matmuls run once
        over every segment's rows, attention per segment. Each segment's logits (fp32 `[n or 1,
        vocab]`) equal, bit for bit, what `forward` gives it alone when the linear kernels are
        independent of the row count (bf16, int8, int4; see tests/test_server_batch.py)."""
        if not segments:
            return []
        if len(segments) == 1:  # alone: `forward` itself (one native call per layer when short)
            seg = segments[0]
            return [self.forward(seg.tokens, seg.positions, seg.cache, seg.mask, seg.last_only)]
        self.hidden = None
        prepared, start = [], 0
        for seg in segments:
            prepared.append(self._prepare(seg, start))
            start += seg.tokens.shape[0]
        x = self.embed(torch.cat([s.tokens for s in segments])).float()
        ops = layer_ops()
        if ops is not None and self.exact_rows:  # every layer in one native call for all segments
            # (bit-identical to each one alone)
            caches = [p.segment.cache for p in prepared]
            ks, vs, lengths = [c.k for c in caches], [c.v for c in caches], [c.length for c in caches]
            rots, masks = [p.rot_real for p in prepared], [p.mask for p in prepared]
            starts = [p.rows.start for p in prepared] + [start]
            for layer, block in enumerate(self.blocks):
                x = ops.layer_batch(x, *block.native_weights(), ks, vs, layer, lengths, rots, masks, starts,
                                    block.n_heads, block.n_kv)
        else:
            for layer, block in enumerate(self.blocks):
                x = block.forward_segments(x, prepared, layer)
        out, start = [], 0  # the rows each segment wants logits for, in the batch's new order
        for p in prepared:
            n = 1 if p.segment.last_only else p.rows.stop - p.rows.start
            out.append(replace(p, rows=slice(start, start + n)))
            start += n
        picked = torch.cat([x[p.rows.stop - 1 : p.rows.stop] if p.segment.last_only else x[p.rows] for p in prepared])
        logits = _linear_rows(self.lm_head, self.norm(picked), out).float()
        return [logits[p.rows] for p in out]

    def _prepare(self, seg: Segment, start: int) -> _Prepared:
        n, cache, mask = seg.tokens.shape[0], seg.cache, seg.mask
        if n == 0:
            raise ValueError("a segment needs at least one token")
        cache.check_room(n)
        if mask is not None and tuple(mask.shape) != (n, cache.length + n):
            raise ValueError(f"mask shape {tuple(mask.shape)} must be (new tokens, cached + new) = {(n, cache.length + n)}")
        rot = self.rope[seg.positions]
        kernel = attention_op()  # any n: a row's numbers do not depend on the rows beside it
        rot_real = torch.view_as_real(rot) if kernel is not None else None
        if kernel is not None and mask is not None:
            mask = mask.to(torch.bool).contiguous()
        return _Prepared(seg, slice(start, start + n), rot, rot_real, mask, kernel)

    def load_hf_state(self, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Load Hugging Face-named tensors, fusing q/k/v and gate/up, cast to `dtype`."""
        try:
            fused = fuse_hf_state(state, self.cfg)
        except KeyError as exc:
            raise ValueError(f"checkpoint lacks tensor {exc.args[0]!r} for a {self.cfg.architecture} model") from exc
        # matrices are stored in `dtype`; norms, biases and all activations stay fp32
        fused = {k: v.to(dtype if v.dim() == 2 else torch.float32) for k, v in fused.items()}
        self.load_state_dict(fused, strict=False, assign=True)
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight


def fused_parts(cfg: ModelConfig) -> dict[str, list[tuple[str, int | None]]]:
    """For each of this module's matrices: its Hugging Face source tensors, in row order, each
    with the head count whose RoPE rows get interleaved (q and k), or None."""
    parts: dict[str, list[tuple[str, int | None]]] = {}
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    parts["lm_head.weight"] = [(head, None)]
    for i in range(cfg.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        for kind in ("weight", "bias") if cfg.attention_bias else ("weight",):
            parts[f"blocks.{i}.qkv.{kind}"] = [
                (a + f"q_proj.{kind}", cfg.num_heads), (a + f"k_proj.{kind}", cfg.num_kv_heads), (a + f"v_proj.{kind}", None),
            ]
        parts[f"blocks.{i}.o.weight"] = [(a + "o_proj.weight", None)]
        parts[f"blocks.{i}.gate_up.weight"] = [(m + "gate_proj.weight", None), (m + "up_proj.weight", None)]
        parts[f"blocks.{i}.down.weight"] = [(m + "down_proj.weight", None)]
    return parts


def fuse_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map Hugging Face parameter names onto this module's fused layout."""
    out = {"embed.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    for name, parts in fused_parts(cfg).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # the head is the embedding itself
        rows = [state[src] if heads is None else _interleave_rope_rows(state[src], heads) for src, heads in parts]
        out[name] = rows[0] if len(rows) == 1 else torch.cat(rows)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[f"blocks.{i}.attn_norm.weight"] = state[p + "input_layernorm.weight"]
        out[f"blocks.{i}.mlp_norm.weight"] = state[p + "post_attention_layernorm.weight"]
    return out


def _interleave_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's output rows from rotate-half halves (x0..x31, y0..y31) to pairs
    (x0, y0, x1, y1, ...). q and k get the same order, so q.k and the model are unchanged."""
    half = w.shape[0] // heads // 2
    return w.unflatten(0, (heads, 2, half)).transpose(1, 2).reshape(w.shape)


def build_model(
    cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: str, max_len: int, blocks: dict[str, Blocks] | None = None
) -> Transformer:
    """Build on the meta device (no throwaway init), then assign the checkpoint's tensors.

    dtype: "float32" | "bfloat16" (matrices stored so) | "int4" | "int8" (matrices in blocks, see
    quant.py; `blocks` holds the checkpoint's own block-quantized matrices by Hugging Face name).
    """
    if dtype not in MATRIX_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; supported: {', '.join(MATRIX_DTYPES)}")
    with torch.device("meta"):
        model = Transformer(cfg, max_len)
    model.load_hf_state(state, MATRIX_DTYPES[dtype])
    model.kv_dtype = kv_cache_dtype(dtype, cfg.head_dim)
    if dtype in QUANT_DTYPES:
        _quantize_linears(model, QUANT_DTYPES[dtype], blocks or {})
    elif dtype == "bfloat16" and amx_bf16():
        pack_linears_amx(model)
    into_huge_pages(model)
    return model.eval()


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page


def into_huge_pages(model: nn.Module) -> None:
    """Move every parameter and buffer into one anonymous mapping advised for transparent huge
    pages (`madvise(MADV_HUGEPAGE)`; Linux grants them where THP is `always` or `madvise`, the
    usual default). Each forward streams all the weights (~320 MB for SmolLM2 in bf16): on 4 KB
    pages that is ~80,000 TLB misses a forward, on 2 MB pages ~160. Alternated in one process on
    the AMX Xeon (2 threads, 512 cached): a one-token forward 14.3 -> 13.2-13.7 ms, 11 tokens
    16.5-16.9 -> 16.0-16.2 ms. Storages shared by several tensors stay shared (same offsets and
    strides); nothing happens where Python's mmap has no MADV_HUGEPAGE, and a kernel that refuses
    the advice leaves the mapping on ordinary pages."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return
    named = [(module, kind, name, t, t.untyped_storage()) for module in model.modules()
             for kind, table in (("param", module._parameters), ("buffer", module._buffers))
             for name, t in table.items() if t is not None and t.device.type == "cpu"]
    offsets: dict[int, int] = {}  # storage address -> its offset in the arena
    total = 0
    for *_, storage in named:
        if storage.data_ptr() not in offsets:
            offsets[storage.data_ptr()] = total
            total += -(-storage.nbytes() // 64) * 64
    if total == 0:
        return
    size = -(-total // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # room to start on a huge page boundary
    arena = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(arena)) % HUGE_PAGE
    try:
        arena.madvise(mmap.MADV_HUGEPAGE, start, size - start)
    except OSError:  # a kernel without transparent huge pages (EINVAL): ordinary pages, still one mapping
        pass
    raw = torch.frombuffer(arena, dtype=torch.uint8)[start:]  # the tensors keep the mapping alive
    moved: dict[int, torch.Tensor] = {}  # storage address -> its bytes in the arena
    new_of: dict[int, torch.Tensor] = {}  # id(tensor) -> its copy (a tied one is listed under two modules)
    for module, kind, name, t, storage in named:
        key = storage.data_ptr()
        if key not in moved:
            moved[key] = raw[offsets[key] : offsets[key] + storage.nbytes()]
            moved[key].copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        if id(t) not in new_of:
            flat = moved[key].view(t.dtype)  # as_strided's offset counts from the arena's start
            new_of[id(t)] = flat.as_strided(t.shape, t.stride(), flat.storage_offset() + t.storage_offset())
            if kind == "param":
                t.data = new_of[id(t)]  # the same Parameter object: tied weights stay one object
        if kind == "buffer":
            module._buffers[name] = new_of[id(t)]


def pack_linears_amx(model: nn.Module) -> None:
    """Pack each bf16 matrix the AMX kernel can take (N % 16 == 0, K % 32 == 0; the others keep the
    vdpbf16ps kernel) for good, so every forward, one token or a tree, runs the same kernel on it.
    A tied LM head gets its own packed copy (the embedding rows stay as they are for lookups)."""
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.dtype == torch.bfloat16:
            n, k = module.weight.shape
            if n % 16 == 0 and k % 32 == 0:
                module.weight = nn.Parameter(pack_amx(module.weight.detach()), requires_grad=False)


def kv_cache_dtype(dtype: str, head_dim: int) -> torch.dtype:
    """The KV cache's storage: bfloat16 for the bf16 / int8 / int4 models where the AVX512 attention
    core runs on a CPU with AVX512-BF16 (it rounds new entries once, and takes the scores of
    bf16-rounded queries and the values' sums weighted by bf16-rounded softmax numerators by
    vdpbf16ps, keys and values stored in its own layouts: kv_cache.py), else float32. A one-token
    step reads the whole cache (~47 MB in fp32 for SmolLM2 at 1,024 tokens), and a tree re-reads it
    per 4-token tile; bf16 halves that, and vdpbf16ps halves the FMAs. float32 keeps an fp32
    cache: it is the reference the other dtypes and transformers are compared with."""
    if dtype == "float32" or attention_isa() != "avx512bf16" or head_dim not in (16, 32, 64, 128):
        return torch.float32
    return torch.bfloat16


def _quantize_linears(model: Transformer, kind: str, blocks: dict[str, Blocks]) -> None:
    """Swap every Linear for a QLinear: the checkpoint's own blocks where they are stored in the
    wanted format, else quantized here. The LM head is always Q8_0 (see quant.py)."""
    parts = fused_parts(model.cfg)
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        want = "q8_0" if name == "lm_head" else kind
        sources = parts[name + ".weight"]
        if all(src in blocks and blocks[src].kind == want for src, _ in sources):
            q = cat_blocks([
                blocks[src] if heads is None else blocks[src].rows(lambda t, h=heads: _interleave_rope_rows(t, h))
                for src, heads in sources
            ])
        else:
            q = quantize(module.weight.detach(), want)
        model.set_submodule(name, QLinear(q, None if module.bias is None else module.bias.detach()))
