"""Does a trained draft head, or a datastore, pay inside `auto`? On the same Spec-Bench prompts in
one process, interleaved per prompt (so the machine's drift hits all alike): `ar`, `head` alone
(with a head), `auto` bare (its members suffix, aded and recycling, no datastore) and `auto` as
`LLM(draft_head=..., datastore=...)` builds it. Tau and decode tokens/s each, overall and per
category.

    python scripts/auto_with_head.py --draft-head head.safetensors --limit 3
    python scripts/auto_with_head.py --datastore corpus.jsonl --limit 3

The head comes from `fastdecode train-head`, a corpus from `fastdecode write-corpus`. Outputs are
checked against `ar`'s (greedy, or sampled with one seed: every method emits `ar`'s tokens then).
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from fastdecode import LLM, SamplingParams
from fastdecode.bench.data import DEFAULT_HUMANEVAL, DEFAULT_SPEC_BENCH, load_prompts
from fastdecode.drafters import METHODS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft-head", default=None)
    p.add_argument("--datastore", default=None)
    p.add_argument("--limit", type=int, default=3, help="prompts per category")
    p.add_argument("--skip", type=int, default=0, help="prompts per category to pass over first (10: held out "
                                                        "from the benchmark's first 10)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.0, help="> 0 samples (same seed for every method)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=DEFAULT_SPEC_BENCH)
    p.add_argument("--humaneval", default=DEFAULT_HUMANEVAL)
    args = p.parse_args()
    prompts, notes = load_prompts(args.data, args.humaneval, limit=args.limit, skip=args.skip)
    for note in notes:
        print(note)
    if args.draft_head is None and args.datastore is None:
        p.error("give --draft-head, --datastore or both")
    llm = LLM(threads=args.threads, draft_head=args.draft_head, datastore=args.datastore, prefix_cache=False)
    env = llm.drafter_env()
    drafters = {m: llm.new_drafter(m) for m in ("ar", "head")[: 2 if args.draft_head else 1]}
    # as an LLM given neither
    drafters["auto (bare)"] = METHODS["auto"](replace(env, draft_head=lambda: None, datastore=lambda: None))
    drafters["auto"] = llm.new_drafter("auto")
    llm.drafter = drafters.__getitem__  # the drafters above, by name
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    ids = [llm.apply_chat_template([{"role": "user", "content": q.turns[0]}]) for q in prompts]
    llm.generate(ids[:1], params, method="ar")  # warm-up: kernels, cost curve
    names = list(drafters)
    totals = {m: [0, 0, 0.0] for m in names}  # tokens, steps, decode seconds
    per_cat: dict[str, dict[str, list[float]]] = {}
    exact = {m: 0 for m in names}
    for q, i in zip(prompts, ids):
        outs = {m: llm._run_to_end(i, params, m) for m in names}
        for m, o in outs.items():
            for acc in (totals[m], per_cat.setdefault(q.category, {n: [0, 0, 0.0] for n in names})[m]):
                acc[0] += o.metrics.tokens
                acc[1] += o.metrics.steps
                acc[2] += o.metrics.decode_s
            exact[m] += o.token_ids == outs["ar"].token_ids
    ar_speed = totals["ar"][0] / totals["ar"][2]
    for m in names:
        tokens, steps, decode = totals[m]
        print(f"{m:14s} tau {tokens / steps:.2f}  decode {tokens / decode:6.1f} tok/s  "
              f"{tokens / decode / ar_speed:.2f}x ar  exact {exact[m]}/{len(ids)}")
    print("decode tok/s per category: " + " | ".join(names))
    for cat, rows in per_cat.items():
        print(f"  {cat:16s}" + "".join(f"{rows[m][0] / rows[m][2]:9.1f}" for m in names))


if __name__ == "__main__":
    main()
