"""Benchmark fastdecode's kernels (bf16_linear, q_linear) against torch's F.linear.

Measures the median wall time (ms) of y = x @ W^T for x float32 [n, K] and
W [N, K], with 2 intra-op threads, for the decoder's weight shapes
(N, K) in {(960,576), (576,576), (3072,576), (576,1536), (49152,576)} and
n in {1, 2, 4, 8, 16, 32, 64}, comparing:

  bf16k  bf16_linear(x, W_bf16, None)              (fp32 x, bf16 W; dtype bfloat16)
  q8k    q_linear on Q8_0 blocks                   (fp32 x; dtype int8)
  q4k    q_linear on Q4_1 blocks                   (fp32 x; dtype int4)
  tbf16  F.linear(x_bf16, W_bf16)                  (torch's bf16 path)
  fp32   F.linear(x, W_fp32)                       (MKL sgemm on upcast weights)

It also reports the weight bandwidth of q4k (its bytes / time; at n=1 the op
only streams weights, so this is the number to compare with the machine's
memory bandwidth) and bf16k's and q4k's times relative to their own n=1 time.

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
from fastdecode.quant import QLinear, quantize

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
    w_fp32 = torch.randn(big_n, k)
    w_bf16 = w_fp32.to(torch.bfloat16)
    q8, q4 = QLinear(quantize(w_fp32, "q8_0"), None), QLinear(quantize(w_fp32, "q4_1"), None)  # packed once
    q4_bytes = q4.nbytes
    reps = max(5, reps // 8) if w_bf16.numel() * 2 > 16e6 else reps  # keep the LM head quick
    base_bf16 = base_q4 = None
    for n in BATCHES:
        x = torch.randn(n, k)
        x_bf16 = x.to(torch.bfloat16)
        bf16k = time_ms(lambda: bf16_linear(x, w_bf16, None), reps, stat)
        q8k = time_ms(lambda: q8.forward(x), reps, stat)
        q4k = time_ms(lambda: q4.forward(x), reps, stat)
        tbf16 = time_ms(lambda: F.linear(x_bf16, w_bf16), reps, stat)
        tfp32 = time_ms(lambda: F.linear(x, w_fp32), reps, stat)
        base_bf16 = bf16k if base_bf16 is None else base_bf16
        base_q4 = q4k if base_q4 is None else base_q4
        print(
            f"{big_n:>6} {k:>5} {n:>3} | {bf16k:7.3f} {q8k:7.3f} {q4k:7.3f} {tbf16:7.3f} {tfp32:7.3f} |"
            f" {q4_bytes / q4k / 1e6:6.1f} | {bf16k / base_bf16:5.2f} {q4k / base_q4:5.2f}"
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
    print(f"threads={args.threads} stat={args.stat} times in ms")
    print("     N     K   n |   bf16k     q8k     q4k   tbf16    fp32 | q4 GB/s | vs n=1: bf16k q4k")
    for big_n, k in SHAPES:
        bench_shape(big_n, k, args.reps, args.stat)


if __name__ == "__main__":
    main()
