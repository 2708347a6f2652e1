"""Interleaved A/B of drafter settings: each arm is its own drafter (one `LLM`), the arms take turns
on every prompt (order alternating), every arm's tokens must equal the first arm's, and decode
tokens/s, tau and the step time are printed per arm and per category.

An arm is `key=value` pairs joined by `;`: method (default auto), budget (default LLM.budget),
suffix_min_score and suffix_depth (auto's suffix member, or `suffix` itself), refit
(StepCost.REFIT_EVERY of auto), drop (auto's members to leave out, joined by `,`), cap (nodes a
member of auto may propose at most, `member:n` joined by `,`), probe (auto's probe_every: 0 never
drafts half its size to see far sizes' costs), seen (0: auto's statistics not keyed by whether the
context holds a node's trigram), native (0: auto's merge and statistics in Python, not
csrc/auto.cpp). `--skip 10`
runs prompts the benchmark's first 10 a category leave out. For example, the A/B behind the AMX
budget of `auto`:

    python scripts/auto_ab.py --limit 3 "budget=12" "budget=24;suffix_min_score=0.1;suffix_depth=32"
    python scripts/auto_ab.py --limit 3 --temperature 0.7 --top-p 0.9 "budget=12" "budget=24"
"""
from __future__ import annotations

import argparse
from collections import defaultdict

from fastdecode import LLM, SamplingParams
from fastdecode.bench.data import DEFAULT_HUMANEVAL, DEFAULT_SPEC_BENCH, load_prompts
from fastdecode.drafters.suffix import SuffixTrie

KEYS = ("method", "budget", "suffix_min_score", "suffix_depth", "refit", "drop", "cap", "probe", "seen", "native")


def parse_arm(text: str) -> dict[str, str]:
    arm = dict(part.split("=", 1) for part in text.split(";") if part)
    unknown = sorted(set(arm) - set(KEYS))
    if unknown:
        raise SystemExit(f"unknown arm settings {unknown} in {text!r}; allowed: {', '.join(KEYS)}")
    return arm


def build(llm: LLM, arm: dict[str, str]):
    method = arm.get("method", "auto")
    drafter = llm.new_drafter(method)
    suffix = drafter.members.get("suffix") if method == "auto" else drafter if method == "suffix" else None
    if suffix is not None:
        if "suffix_min_score" in arm:
            suffix.min_score = float(arm["suffix_min_score"])
        if "suffix_depth" in arm:  # the tries hold the longest pattern plus the deepest draft
            suffix.max_draft_depth = int(arm["suffix_depth"])
            suffix.max_depth = suffix.max_pattern + suffix.max_draft_depth
            suffix.global_trie = SuffixTrie(suffix.max_depth)
    if "drop" in arm:
        if method != "auto":
            raise SystemExit(f"drop is auto's setting, not {method!r}'s")
        for name in arm["drop"].split(","):
            if name not in drafter.members:
                raise SystemExit(f"drop={name!r}: auto's members are {', '.join(drafter.members)}")
            del drafter.members[name]
    if "cap" in arm:
        if method != "auto":
            raise SystemExit(f"cap is auto's setting, not {method!r}'s")
        for part in arm["cap"].split(","):
            name, _, n = part.partition(":")
            if name not in drafter.members or not n.isdigit() or int(n) < 1:
                raise SystemExit(f"cap={part!r}: want member:n with n >= 1; auto's members are {', '.join(drafter.members)}")
            member, cap = drafter.members[name], int(n)
            member.propose = lambda context, budget, propose=member.propose, cap=cap: propose(context, min(budget, cap))
    if "refit" in arm:
        if method != "auto":
            raise SystemExit(f"refit is auto's setting, not {method!r}'s")
        drafter.step_cost.REFIT_EVERY = int(arm["refit"])
    if "probe" in arm:
        if method != "auto" or not arm["probe"].isdigit():
            raise SystemExit(f"probe={arm['probe']!r}: auto's steps between half-size probes (0: none), not {method!r}'s")
        drafter.probe_every = int(arm["probe"])
    if "seen" in arm:
        if method != "auto" or arm["seen"] not in ("0", "1"):
            raise SystemExit(f"seen={arm['seen']!r}: auto's switch, 0 or 1, not {method!r}'s")
        drafter.use_seen = arm["seen"] == "1"
    if "native" in arm:
        if method != "auto" or arm["native"] not in ("0", "1"):
            raise SystemExit(f"native={arm['native']!r}: auto's switch, 0 or 1, not {method!r}'s")
        if arm["native"] == "0":
            drafter._core = None  # the Python merge and statistics (fresh: no step has run yet)
    return method, drafter, int(arm.get("budget", llm.budget(method)))


def add_run_arguments(ap: argparse.ArgumentParser, limit: int) -> None:
    """The prompt set and sampling options this script shares with draft_coverage.py."""
    ap.add_argument("--limit", type=int, default=limit, help="prompts per category")
    ap.add_argument("--skip", type=int, default=0,
                    help="prompts per category to pass over first (e.g. 10: held out from the benchmark's first 10)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=DEFAULT_SPEC_BENCH)
    ap.add_argument("--humaneval", default=DEFAULT_HUMANEVAL)


def prompts_and_params(args: argparse.Namespace) -> tuple[list, SamplingParams]:
    """--limit Spec-Bench prompts per category (plus HumanEval) after the first --skip, and the
    sampling settings, seed 0."""
    prompts, _ = load_prompts(args.data, args.humaneval, limit=args.limit, skip=args.skip)
    return prompts, SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                   seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arms", nargs="+")
    add_run_arguments(ap, limit=3)
    ap.add_argument("--draft-head", default=None, help="a trained head (fastdecode train-head): `auto` takes it as a "
                                                       "member (drop=head leaves it out)")
    args = ap.parse_args()
    llm = LLM(threads=args.threads, draft_head=args.draft_head)
    arms = [(text, *build(llm, parse_arm(text))) for text in args.arms]
    prompts, params = prompts_and_params(args)
    stats = {text: defaultdict(lambda: [0.0, 0, 0, 0]) for text, *_ in arms}  # category: seconds, tokens, steps, nodes
    for i, prompt in enumerate(prompts):
        first = None
        for text, method, drafter, budget in arms if i % 2 == 0 else arms[::-1]:
            llm._drafters[method], llm.draft_budget = drafter, budget
            conversation, tokens = [], []
            for turn in prompt.turns:
                conversation.append({"role": "user", "content": turn})
                out = llm.chat([conversation], params, method=method)[0]
                conversation.append({"role": "assistant", "content": out.text})
                tokens.append(out.token_ids)
                s = stats[text][prompt.category]
                s[0], s[1], s[2] = s[0] + out.metrics.decode_s, s[1] + out.metrics.tokens - 1, s[2] + out.metrics.steps
                s[3] += out.metrics.drafted
            first = first or tokens
            if tokens != first:
                raise SystemExit(f"arm {text!r} differs from the others on prompt {prompt.prompt_id}")
    for text, *_ in arms:
        cats = stats[text]
        seconds, tokens, steps, nodes = (sum(c[j] for c in cats.values()) for j in range(4))
        per = " ".join(f"{k[:5]} {c[1] / c[0]:.0f}/{c[1] / c[2]:.2f}" for k, c in cats.items())
        print(f"{text:50s} tok/s {tokens / seconds:6.1f} tau {tokens / steps:.2f} step {seconds / steps * 1e3:.2f} ms "
              f"nodes {nodes / steps:.2f} | {per}")


if __name__ == "__main__":
    main()
