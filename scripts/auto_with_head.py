"""Does a trained draft head pay inside `auto`? `ar`, `auto`, `head`, and `auto` with `head` as a
fourth member, on the same Spec-Bench prompts in one process: tau and decode tokens/s each.

    python scripts/auto_with_head.py --draft-head head.safetensors --limit 3

The head comes from `fastdecode train-head`. Outputs are checked against `ar`'s (greedy).
"""
from __future__ import annotations

import argparse

from fastdecode import LLM, SamplingParams
from fastdecode.bench.data import DEFAULT_HUMANEVAL, DEFAULT_SPEC_BENCH, load_prompts
from fastdecode.drafters import AUTO_MEMBERS, METHODS
from fastdecode.drafters.auto import AutoDrafter
from fastdecode.drafters.base import DrafterEnv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft-head", required=True)
    p.add_argument("--limit", type=int, default=3, help="prompts per category")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=DEFAULT_SPEC_BENCH)
    p.add_argument("--humaneval", default=DEFAULT_HUMANEVAL)
    args = p.parse_args()
    prompts, notes = load_prompts(args.data, args.humaneval, limit=args.limit)
    for note in notes:
        print(note)
    llm = LLM(threads=args.threads, draft_head=args.draft_head, prefix_cache=False)
    env = DrafterEnv(llm.config, llm.forward_cost, llm.model, llm.load_draft_model, llm.load_draft_head)
    drafters = {m: llm.new_drafter(m) for m in ("ar", "auto", "head")}
    drafters["auto+head"] = AutoDrafter({n: METHODS[n](env) for n in (*AUTO_MEMBERS, "head")}, env.cost)
    llm.drafter = drafters.__getitem__  # the four drafters above, by name
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    ids = [llm.apply_chat_template([{"role": "user", "content": q.turns[0]}]) for q in prompts]
    llm.generate(ids[:1], params, method="ar")  # warm-up: kernels, cost curve
    want: list[list[int]] = []
    for method in drafters:
        outs = [llm._run_to_end(i, params, method) for i in ids]
        tokens = sum(o.metrics.tokens for o in outs)
        steps = sum(o.metrics.steps for o in outs)
        decode = sum(o.metrics.decode_s for o in outs)
        got = [o.token_ids for o in outs]
        want = want or got
        exact = sum(a == b for a, b in zip(got, want))
        print(f"{method:10s} tau {tokens / steps:.2f}  decode {tokens / decode:6.1f} tok/s  exact {exact}/{len(got)}",
              flush=True)


if __name__ == "__main__":
    main()
