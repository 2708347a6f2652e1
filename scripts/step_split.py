"""Where a decoding step's wall time goes, per phase and, for `auto`, per member.

Runs each method on Spec-Bench prompts (interleaved per prompt, each prompt once per method, so
`suffix`'s memory of earlier outputs never holds the answer it is asked for) and reports per
step: the drafter's proposal, the tree's inputs, the forward, the verification walk (draws) and
the rest of the commit (cache keep, the drafters' updates, stop checks); for `auto`, each
member's propose() and update() and `auto`'s own share. Timers wrap the engine's functions
and the drafters' methods; they add ~1 us a call.

    python scripts/step_split.py [--skip 12 --limit 1] [--methods ar,auto] [--temperature 0.7 --top-p 0.9]
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import fastdecode.engine as engine
from auto_ab import add_run_arguments, prompts_and_params  # scripts/ is on the path when run as a script
from fastdecode import LLM
from fastdecode.drafters import METHODS

TIMES: defaultdict[str, float] = defaultdict(float)


def timed(owner: object, attr: str, key: str, when=lambda kwargs: True) -> None:
    """Replace owner.attr by a wrapper adding its wall time to TIMES[key] (for calls whose keyword
    arguments pass `when`)."""
    fn = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if when(kwargs):
                TIMES[key] += time.perf_counter() - start

    setattr(owner, attr, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(ap, limit=1)
    ap.set_defaults(skip=12, temperature=0.7, top_p=0.9)  # held-out prompts, sampled
    ap.add_argument("--methods", default="ar,auto")
    ap.add_argument("--draft-head", default=None, help="a trained head (fastdecode train-head): `auto` takes it as a member")
    args = ap.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    prompts, params = prompts_and_params(args)
    llm = LLM(threads=args.threads, prefix_cache=False, draft_head=args.draft_head)
    ids = [llm.apply_chat_template([{"role": "user", "content": p.turns[0]}]) for p in prompts]
    warm = llm.apply_chat_template([{"role": "user", "content": "Say hello in three languages."}])  # warm-up only
    drafters = {m: llm.new_drafter(m) for m in methods}
    llm.drafter = drafters.__getitem__
    for name in ("propose", "tree_segment", "verify"):
        timed(engine, name, name)
    timed(llm.engine.model, "forward", "forward", lambda kw: not kw.get("last_only", False))  # a prefill is not a step
    timed(engine, "commit_step", "commit")
    for m, d in drafters.items():
        timed(d, "update", f"{m}.update")
        for member, md in getattr(d, "members", {}).items():
            timed(md, "propose", f"{m}.{member}.propose")
            timed(md, "update", f"{m}.{member}.update")
        llm._run_to_end(warm, params, m)
    totals = {m: defaultdict(float) for m in methods}
    for k, prompt in enumerate(ids):
        for m in methods[k % len(methods):] + methods[: k % len(methods)]:
            TIMES.clear()
            out = llm._run_to_end(prompt, params, m)
            t = totals[m]
            for key, v in TIMES.items():
                t[key] += v
            t["steps"] += out.metrics.steps
            t["tokens"] += out.metrics.tokens
            t["nodes"] += out.metrics.drafted
            t["decode_s"] += out.metrics.decode_s
    for m in methods:
        t = totals[m]
        steps = t.pop("steps")
        per = {key: v / steps * 1e3 for key, v in t.items() if key not in ("tokens", "nodes", "decode_s")}
        per["commit (rest)"] = per.pop("commit") - per.get("verify", 0.0) - per.get(f"{m}.update", 0.0)
        members = [key for key in per if key.count(".") == 2]
        if members:  # auto's own share: its propose / update less its members'
            per[f"{m} (own).propose"] = per["propose"] - sum(per[k] for k in members if k.endswith(".propose"))
            per[f"{m} (own).update"] = per[f"{m}.update"] - sum(per[k] for k in members if k.endswith(".update"))
        print(f"{m}: {len(ids)} prompts, tau {t['tokens'] / steps:.2f}, {t['nodes'] / steps:.2f} nodes a step, "
              f"{t['tokens'] / t['decode_s']:.1f} decode tok/s, {t['decode_s'] / steps * 1e3:.3f} ms a step")
        for key, ms in sorted(per.items()):
            print(f"  {key:28s} {ms:7.3f} ms a step")


if __name__ == "__main__":
    main()
