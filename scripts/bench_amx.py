"""The AMX linear kernel against the vdpbf16ps one on the default model's shapes, in one process.

Streams the matrices of a whole bf16 forward (30 layers' qkv, o, gate_up and down, then the LM
head: 270 MB, random weights) through `bf16_linear` for n tokens, once as [N, K] (the vdpbf16ps
kernel, linear_bf16_512.cpp) and once packed by `pack_amx` (linear_bf16_amx.cpp), the two
interleaved round by round, and prints each one's median wall time and their ratio per n.
Needs a CPU with AMX-BF16 (`fastdecode.kernels.amx_bf16()`).

Usage: python scripts/bench_amx.py [--sizes 1,2,4,8,16,32,64] [--rounds 15] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastdecode import kernels

LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2-135M: qkv, o, gate_up, down
LAYERS, HEAD = 30, (49152, 576)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not kernels.amx_bf16():
        raise SystemExit("this CPU (or FASTDECODE_NO_AMX) gives no AMX-BF16: nothing to compare")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = LAYER * LAYERS + [HEAD]
    plain = [torch.randn(n, k).bfloat16() for n, k in shapes]
    packed = [kernels.pack_amx(w) for w in plain]
    op = kernels.bf16_linear_op()
    print(f"{len(shapes)} matrices ({sum(w.numel() for w in plain) * 2 / 1e6:.0f} MB), {args.threads} threads, "
          f"medians of {args.rounds} rounds (ms)")
    for n in (int(s) for s in args.sizes.split(",")):
        xs = {k: torch.randn(n, k) for k in {k for _, k in shapes}}
        times: dict[str, list[float]] = {"vdpbf16ps": [], "amx": []}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, weights in (("vdpbf16ps", plain), ("amx", packed)):
                start = time.perf_counter()
                for w, (_, k) in zip(weights, shapes):
                    op(xs[k], w, None)
                times[name].append(time.perf_counter() - start)
        a, b = (statistics.median(t[1:]) * 1e3 for t in times.values())
        print(f"n={n:<3} vdpbf16ps {a:7.2f}  amx {b:7.2f}  amx/vdpbf16ps {b / a:.2f}")


if __name__ == "__main__":
    main()
