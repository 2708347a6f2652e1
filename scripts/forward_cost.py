"""Wall time of one n-token forward of the default model over a cache of a given length: what a
draft tree of n tokens costs against a one-token step, as the context grows.

For each context length and n: the median of --reps forwards of n new tokens (a causal block,
as the load-time cost curve measures), after one warm-up; and, with --attention, the time of
the attention op alone (RoPE, KV writes and attention of every layer, csrc/attention*.cpp) for
the same n and context, with a draft-tree-shaped mask. FASTDECODE_NO_AVX512=1 in the environment
gives the AVX2 kernels on an AVX512 CPU, for comparison.

    python scripts/forward_cost.py [--contexts 256,1024] [--sizes 1,4,8,16,32] [--reps 12] [--attention]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastdecode import LLM
from fastdecode.kernels import attention_op, bf16_kernel


def median_ms(fn, reps: int) -> float:
    fn()
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="256,1024")
    ap.add_argument("--sizes", default="1,4,8,16,32")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--attention", action="store_true", help="also time the attention op alone")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    sizes = [int(n) for n in args.sizes.split(",")]
    llm = LLM(dtype=args.dtype, threads=args.threads, max_model_len=max(contexts) + max(sizes) + 8)
    model, cfg = llm.model, llm.model.cfg
    print(f"{args.dtype}, {args.threads} threads, bf16 kernel {bf16_kernel()}, medians of {args.reps} (ms)")
    gen = torch.Generator().manual_seed(0)
    for context in contexts:
        cache = model.new_cache()
        model(torch.randint(100, 40000, (context,), generator=gen), torch.arange(context), cache, last_only=True)
        cache.append(context)
        rows = []
        for n in sizes:
            tokens = torch.randint(100, 40000, (n,), generator=gen)
            positions = context + torch.arange(n)
            rows.append((n, median_ms(lambda: model(tokens, positions, cache), args.reps)))
        base = rows[0][1]
        print(f"context {context}, forward: " + "  ".join(f"n={n} {ms:.2f} ({ms / base:.2f}x)" for n, ms in rows))
        if args.attention:
            op, hd = attention_op(), cfg.head_dim
            heads, kv = cfg.num_heads, cfg.num_kv_heads
            out = []
            for n in sizes:
                qkv = torch.randn(n, (heads + 2 * kv) * hd, generator=gen)
                angles = torch.rand(n, hd // 2, generator=gen)
                rot = torch.stack([angles.cos(), angles.sin()], -1).contiguous()
                mask = None
                if n > 1:  # a tree: two chains of n / 2 under the root
                    mask = torch.zeros(n, context + n, dtype=torch.bool)
                    mask[:, :context] = True
                    for i in range(n):
                        start = 0 if i < n // 2 else n // 2
                        mask[i, context + start : context + i + 1] = True
                layers = range(cfg.num_layers)
                out.append((n, median_ms(lambda: [op(qkv, cache.k, cache.v, layer, context, rot, mask, heads, kv)
                                                  for layer in layers], args.reps)))
            print(f"context {context}, attention of {cfg.num_layers} layers: " + "  ".join(f"n={n} {ms:.2f}" for n, ms in out))


if __name__ == "__main__":
    main()
