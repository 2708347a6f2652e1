"""Benchmark fastdecode.kernels.bf16_linear against torch's F.linear.

Measures the median wall time (ms) of y = x @ W^T for x float32 [n, K] and
W [N, K], with 2 intra-op threads, for the decoder's weight shapes
(N, K) in {(960,576), (576,576), (3072,576), (576,1536), (49152,576)} and
n in {1, 2, 4, 8, 16, 32, 64}, comparing:

  ours  bf16_linear(x, W_bf16, None)               (fp32 x, bf16 W)
  bf16  F.linear(x_bf16, W_bf16)                   (torch's bf16 path)
  fp32  F.linear(x, W_fp32)                        (MKL sgemm on upcast weights)

It also reports the weight bandwidth of `ours` (bf16 weight bytes / time; at
n=1 this op only streams weights, so this is the number to compare with the
machine's memory bandwidth) and ours' time relative to its own n=1 time.

Usage: python scripts/bench_kernels.py [--reps R] [--threads T] [--stat median|min]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from fastdecode.kernels import bf16_linear, bf16_linear_available

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]
BATCHES = [1, 2, 4, 8, 16, 32, 64]


def time_ms(fn: Callable[[], torch.Tensor], reps: int, stat: str) -> float:
    """Median (or min) wall time of fn in ms, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * (statistics.median(times) if stat == "median" else min(times))


def bench_shape(big_n: int, k: int, reps: int, stat: str) -> None:
    """Print one table block for weight shape [big_n, k]."""
    w_bf16 = torch.randn(big_n, k).to(torch.bfloat16)
    w_fp32 = w_bf16.float()
    weight_bytes = w_bf16.numel() * 2
    reps = max(5, reps // 8) if weight_bytes > 16e6 else reps  # keep the LM head quick
    base = None
    for n in BATCHES:
        x = torch.randn(n, k)
        x_bf16 = x.to(torch.bfloat16)
        ours = time_ms(lambda: bf16_linear(x, w_bf16, None), reps, stat)
        tbf16 = time_ms(lambda: F.linear(x_bf16, w_bf16), reps, stat)
        tfp32 = time_ms(lambda: F.linear(x, w_fp32), reps, stat)
        base = ours if base is None else base
        gbs = weight_bytes / ours / 1e6
        print(
            f"{big_n:>6} {k:>5} {n:>3} | {ours:8.3f} {tbf16:8.3f} {tfp32:8.3f} |"
            f" {tbf16 / ours:6.1f}x {tfp32 / ours:6.1f}x | {gbs:6.1f} | {ours / base:5.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stat", choices=["median", "min"], default="median")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not bf16_linear_available():
        raise SystemExit("bf16_linear kernel unavailable (see warning above)")
    print(f"threads={args.threads} stat={args.stat} times in ms; speedups are vs ours")
    print("     N     K   n |     ours     bf16     fp32 |  /bf16  /fp32 | W GB/s | vs n=1")
    for big_n, k in SHAPES:
        bench_shape(big_n, k, args.reps, args.stat)


if __name__ == "__main__":
    main()
