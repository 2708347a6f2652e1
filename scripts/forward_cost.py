"""Wall time of one n-token forward of the default model over a cache of a given length: what a
draft tree of n tokens costs against a one-token step, as the context grows.

For each context length and n: --reps forwards of n new tokens (a causal block, as the load-time
cost curve measures), after one warm-up; with --attention also the attention op alone (RoPE, KV
writes and attention of every layer, csrc/attention*.cpp) for the same n and context, with a
draft-tree-shaped mask; with --pieces also the 30 layers' four linears alone (the model's own
weights through `bf16_linear`) and the LM head alone (with its row ranking where a tree forward
uses it). The timed calls of one context take turns, one of each a round, so a machine whose speed
drifts slows them alike; --stat min reports each one's fastest round (for a noisy machine),
median its median. FASTDECODE_NO_AVX512=1 in the environment gives the AVX2 kernels on an AVX512
CPU, for comparison.

    python scripts/forward_cost.py [--contexts 256,1024] [--sizes 1,4,8,16,32] [--reps 12] [--attention] [--pieces]
    python scripts/forward_cost.py --contexts 400,1600 --sizes 1,9 --reps 100 --attention --pieces --stat min
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from fastdecode import LLM
from fastdecode.kernels import attention_op, bf16_kernel, bf16_linear_op, bf16_linear_topk_op


def rounds_ms(calls: dict[str, Callable[[], object]], reps: int, stat: str) -> dict[str, float]:
    """Each call once to warm up, then `reps` rounds of every call in turn; `stat` of each one's times (ms)."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(reps):
        for key, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    pick = min if stat == "min" else statistics.median
    return {key: pick(runs) * 1e3 for key, runs in times.items()}


def tree_mask(n: int, context: int) -> torch.Tensor | None:
    """A draft tree's mask for n new tokens: two chains of n / 2 under the root (None for n = 1)."""
    if n == 1:
        return None
    mask = torch.zeros(n, context + n, dtype=torch.bool)
    mask[:, :context] = True
    for i in range(n):
        start = 0 if i < n // 2 else n // 2
        mask[i, context + start : context + i + 1] = True
    return mask


def in_features(weight: torch.Tensor) -> int:
    """K of a linear's weight: [N, K] as loaded, or [N / 16, K / 2, 16, 2] packed for AMX (kernels.pack_amx)."""
    return weight.shape[-1] if weight.dim() == 2 else weight.shape[1] * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="256,1024")
    ap.add_argument("--sizes", default="1,4,8,16,32")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--stat", choices=("median", "min"), default="median")
    ap.add_argument("--attention", action="store_true", help="also time the attention op alone")
    ap.add_argument("--pieces", action="store_true", help="also time the layers' linears alone and the LM head alone")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    sizes = [int(n) for n in args.sizes.split(",")]
    if min(sizes) < 1 or args.reps < 1:
        ap.error(f"--sizes {args.sizes} and --reps {args.reps} must be >= 1")
    llm = LLM(dtype=args.dtype, threads=args.threads, max_model_len=max(contexts) + max(sizes) + 8)
    model, cfg = llm.model, llm.model.cfg
    linear, ranked = bf16_linear_op(), bf16_linear_topk_op()
    if args.pieces and (linear is None or args.dtype != "bfloat16"):
        ap.error("--pieces times the bf16 linears: it needs --dtype bfloat16 and the kernels")
    print(f"{args.dtype}, {args.threads} threads, bf16 kernel {bf16_kernel()}, {args.stat}s of {args.reps} (ms)")
    gen = torch.Generator().manual_seed(0)
    layer_linears = [(m.weight, m.bias) for b in model.blocks for m in (b.qkv, b.o, b.gate_up, b.down)]
    head = model.lm_head.weight
    for context in contexts:
        cache = model.new_cache()
        model(torch.randint(100, 40000, (context,), generator=gen), torch.arange(context), cache, last_only=True)
        cache.append(context)
        calls: dict[str, Callable[[], object]] = {}
        for n in sizes:
            tokens = torch.randint(100, 40000, (n,), generator=gen)
            positions = context + torch.arange(n)
            calls[f"forward {n}"] = lambda t=tokens, p=positions: model(t, p, cache)
            if args.attention:
                op, hd, heads, kv = attention_op(), cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
                qkv = torch.randn(n, (heads + 2 * kv) * hd, generator=gen)
                angles = torch.rand(n, hd // 2, generator=gen)
                rot = torch.stack([angles.cos(), angles.sin()], -1).contiguous()
                mask = tree_mask(n, context)
                calls[f"attention {n}"] = lambda q=qkv, r=rot, m=mask: [
                    op(q, cache.k, cache.v, layer, context, r, m, heads, kv) for layer in range(cfg.num_layers)]
            if args.pieces:
                xs = {k: torch.randn(n, k, generator=gen) for k in sorted({in_features(w) for w, _ in layer_linears})}
                calls[f"linears {n}"] = lambda xs=xs: [linear(xs[in_features(w)], w, b) for w, b in layer_linears]
                x = torch.randn(n, cfg.hidden_size, generator=gen)
                use_ranked = n > 1 and ranked is not None and head.dim() == 4  # as Transformer.forward does
                calls[f"LM head {n}"] = (lambda x=x: ranked(x, head, 8)) if use_ranked else (lambda x=x: linear(x, head, None))
        ms = rounds_ms(calls, args.reps, args.stat)
        for piece in ("forward", "attention", "linears", "LM head"):
            row = [(n, ms[f"{piece} {n}"]) for n in sizes if f"{piece} {n}" in ms]
            if row:
                base = row[0][1]
                label = f"{piece} of {cfg.num_layers} layers" if piece in ("attention", "linears") else piece
                print(f"context {context}, {label}: " + "  ".join(f"n={n} {t:.2f} ({t / base:.2f}x)" for n, t in row))


if __name__ == "__main__":
    main()
