"""Profile one decode step of the default model: where the time goes and what bounds it.

Measures, with 2 threads (or --threads): the wall time of a 1-token decode forward at a given
context length, split by torch.profiler into the fused decoder-layer calls (csrc/layer.cpp, which
hold the layers' matmuls and attention), the other matmuls (the LM head), norms/elementwise,
KV-cache writes and the rest; the time of the sampling step (argmax / sample) separately; Python
overhead = wall time - time inside ATen ops. Then the bytes of weights and KV cache read per
step, the machine's measured read bandwidth, and the bandwidth bound in forwards/s.

    python scripts/profile_step.py [--dtype bfloat16] [--threads 2] [--context 256] [--steps 20]
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from fastdecode import LLM, SamplingParams
from fastdecode.roofline import kv_bytes, read_bandwidth_gbs, weight_bytes
from fastdecode.sampling import Sampler

CATEGORIES = [
    ("decoder layers (fused call)", ("fastdecode_kernels::layer",)),  # csrc/layer.cpp: `layers` (all of them) or `layer`
    ("matmul", ("linear", "mm", "addmm", "bf16_linear", "q_linear", "matmul")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax", "bmm")),
    ("kv cache write", ("copy_", "index_select", "index_put", "slice")),
    ("norms / rope / elementwise", ("rms_norm", "mul", "add", "cat", "neg", "silu", "rsqrt", "mean", "pow", "sub")),
]


def category(name: str) -> str:
    for label, keys in CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "other ops"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=0, help="also print the N most expensive ops")
    args = ap.parse_args()
    llm = LLM(dtype=args.dtype, threads=args.threads, max_model_len=max(2048, args.context + args.steps + 8))
    model, cache = llm.model, llm.engine.cache
    cache.truncate(0)
    prompt = torch.randint(100, 40000, (args.context,))
    model(prompt, torch.arange(args.context), cache, last_only=True)
    cache.append(args.context)
    token = torch.tensor([42])

    def step() -> torch.Tensor:
        logits = model(token, torch.tensor([cache.length]), cache)
        cache.append(1)
        return logits

    for _ in range(3):
        step()
    walls = []
    for _ in range(args.steps):  # unprofiled: the profiler's own cost must not count as overhead
        start = time.perf_counter()
        logits = step()
        walls.append(time.perf_counter() - start)
    wall = sum(walls) / len(walls)  # a mean, to compare with the profiler's per-step means
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    by_cat: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        by_cat[category(evt.key)] += evt.self_cpu_time_total / 1e6 / args.steps
    in_ops = sum(by_cat.values())
    if args.top:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    sampler = Sampler(SamplingParams(temperature=0), [], llm.config.vocab_size)
    start = time.perf_counter()
    for _ in range(50):
        sampler.sample(logits[0])
    sample_s = (time.perf_counter() - start) / 50

    wbytes, kvbytes = weight_bytes(model), kv_bytes(model, cache.length)
    bw = read_bandwidth_gbs()
    bound = bw * 1e9 / (wbytes + kvbytes)
    print(f"decode step, {args.dtype}, {args.threads} threads, context {args.context}: mean wall {wall * 1e3:.2f} ms "
          f"({1 / wall:.1f} forwards/s)")
    for label, secs in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {label:28s} {secs * 1e3:7.2f} ms  {100 * secs / wall:5.1f} %")
    print(f"  {'python overhead (wall - ops)':28s} {(wall - in_ops) * 1e3:7.2f} ms  {100 * (wall - in_ops) / wall:5.1f} %")
    print(f"  {'sampling (greedy, per token)':28s} {sample_s * 1e3:7.2f} ms  (outside the forward)")
    print(f"bytes read per step: weights {wbytes / 1e6:.1f} MB + KV cache {kvbytes / 1e6:.1f} MB")
    print(f"measured read bandwidth {bw:.1f} GB/s -> bound {bound:.1f} forwards/s; this step reaches "
          f"{100 * (1 / wall) / bound:.0f} % of it")


if __name__ == "__main__":
    main()
