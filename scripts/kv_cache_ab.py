"""A bf16 KV cache against an fp32 one, interleaved per prompt in one process: the engine's cache is
swapped before each run, so `ar` and `auto` run over each (each with its own drafters). Decode
tokens/s, tau, and whether every method equals `ar` over the same cache (it must) and the two
caches' `ar` outputs agree (rounding the cache changes greedy text in places, as any numerics do).

    python scripts/kv_cache_ab.py --limit 2
"""
from __future__ import annotations

import argparse

import torch

from fastdecode import LLM, SamplingParams
from fastdecode.bench.data import load_prompts
from fastdecode.kv_cache import KVCache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=2, help="prompts per category")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    args = p.parse_args()
    prompts, _ = load_prompts(limit=args.limit)
    llm = LLM(threads=2, prefix_cache=False)
    cfg, model = llm.config, llm.model
    caches = {name: KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, model.max_len, dtype)
              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    methods = ("ar", "auto")
    drafters = {(c, m): llm.new_drafter(m) for c in caches for m in methods}
    current = [""]
    llm.drafter = lambda method: drafters[(current[0], method)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=0)
    ids = [llm.apply_chat_template([{"role": "user", "content": q.turns[0]}]) for q in prompts]
    for c in caches:  # warm-up: kernels, cost curve
        current[0], llm.engine.cache = c, caches[c]
        llm.generate(ids[:1], params, method="ar")
    totals = {key: [0, 0, 0.0] for key in drafters}
    exact = {key: 0 for key in drafters}
    ar_agree = 0
    for i in ids:
        outs = {}
        for c in caches:
            current[0], llm.engine.cache = c, caches[c]
            for m in methods:
                o = llm._run_to_end(i, params, m)
                outs[(c, m)] = o.token_ids
                t = totals[(c, m)]
                t[0] += o.metrics.tokens
                t[1] += o.metrics.steps
                t[2] += o.metrics.decode_s
        for key in drafters:
            exact[key] += outs[key] == outs[(key[0], "ar")]
        ar_agree += outs[("fp32", "ar")] == outs[("bf16", "ar")]
    print(f"the two caches' ar outputs are equal on {ar_agree}/{len(ids)} prompts")
    base = totals[("fp32", "ar")][0] / totals[("fp32", "ar")][2]
    for (c, m), (tokens, steps, decode) in totals.items():
        own = totals[(c, "ar")][0] / totals[(c, "ar")][2]
        print(f"{c} cache  {m:5s} tau {tokens / steps:.2f}  decode {tokens / decode:6.1f} tok/s  "
              f"{tokens / decode / base:.3f}x fp32 ar  {tokens / decode / own:.3f}x its own ar  "
              f"exact {exact[(c, m)]}/{len(ids)}")


if __name__ == "__main__":
    main()
