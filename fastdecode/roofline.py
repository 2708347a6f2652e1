"""The memory roofline of a decode forward: bytes it must read, the machine's read bandwidth, the bound.

At batch size 1 every forward streams all matrix weights once, so forwards/s <= bandwidth / bytes.
AR makes one token per forward; a speculative method makes tau, so its bound is tau x that.
"""
from __future__ import annotations

import time

import torch

from fastdecode.model import Linear, RMSNorm, Transformer
from fastdecode.quant import QLinear


def weight_bytes(model: Transformer) -> int:
    """Bytes of weights one forward reads: every matrix, bias and norm (not the embedding table,
    of which a forward reads only its tokens' rows, unless the LM head is that table)."""
    total = 0
    for module in model.modules():
        if isinstance(module, QLinear):
            total += module.nbytes
        elif isinstance(module, (Linear, RMSNorm)):
            total += module.weight.numel() * module.weight.element_size()
        bias = getattr(module, "bias", None)
        if isinstance(module, (Linear, QLinear)) and bias is not None:
            total += bias.numel() * bias.element_size()
    return total


def kv_bytes(model: Transformer, context: int) -> int:
    """Bytes of K and V cache one forward reads at a given context length (fp32 cache)."""
    cfg = model.cfg
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * 4


def read_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Median GB/s of summing a large fp32 tensor with torch's threads (a streaming read, like weight loads)."""
    data = torch.ones(mb * 2**20 // 4)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / sorted(times)[len(times) // 2] / 1e9


def roofline(model: Transformer) -> dict[str, float]:
    """Weight bytes per forward, measured bandwidth, and the bound in forwards/s; and the read
    bandwidth over a buffer the size of the weights. The first probe's 512 MB exceed the caches;
    on a machine with a large last-level cache (this project's AMX VMs report a 300 MiB L3,
    shared with other tenants) part of a forward's weights may stay in it, and `ar` has run at 121 % of the
    first bound (README, "The machine's memory state moves the ratio"). The second probe says what
    the weights' own size reads at in that state of the machine."""
    nbytes = weight_bytes(model)
    bandwidth = read_bandwidth_gbs()
    sized = read_bandwidth_gbs(mb=max(1, -(-nbytes // 2**20)))
    return {"weight_bytes": nbytes, "bandwidth_gbs": bandwidth, "bound_forwards_per_s": bandwidth * 1e9 / nbytes,
            "weight_sized_bandwidth_gbs": sized}
