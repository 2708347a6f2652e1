"""What limits `auto`'s tau: the members' candidates, or the size cut that keeps a few of them.

Wraps `AutoDrafter._merge` and `update` on one `LLM`: per step it records every candidate node the
members offered (before the cut) and the tree `auto` kept, then checks the tokens the target
emitted. Prints the share of steps whose first emitted token was among the members' depth-1
candidates and among the kept ones, and the tokens a step that verifying every candidate would
have accepted (the longest emitted prefix the candidate trie holds) against those the kept tree
accepted. Spec-Bench first turns, the first --limit prompts per category.

    python scripts/draft_coverage.py [--limit 2] [--temperature 0.7 --top-p 0.9] [--max-new-tokens 256]
"""
from __future__ import annotations

import argparse
from collections import Counter

import fastdecode.drafters.auto as auto_module
from auto_ab import add_run_arguments, prompts_and_params  # scripts/ is on the path when run as a script
from fastdecode import LLM
from fastdecode.drafters.auto import AutoDrafter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(ap, limit=2)
    args = ap.parse_args()
    if args.limit < 1:
        ap.error(f"--limit {args.limit} must be >= 1")
    counts: Counter[str] = Counter()
    merge, update = AutoDrafter._merge, AutoDrafter.update

    def recording_merge(self: AutoDrafter, context: list[int], budget: int):
        nodes = merge(self, context, budget)
        self._candidates = {(node.parent, node.token): i for i, node in enumerate(nodes)}
        return nodes

    def recording_update(self: AutoDrafter, step) -> None:
        kept_first = {token for token, parent in zip(step.tree.tokens, step.tree.parents) if parent < 0}
        parent, reachable = -1, 0  # the emitted prefix the candidates held
        for token in step.emitted:  # the bonus token too: a candidate holding it would have been accepted
            parent = self._candidates.get((parent, token), -1)
            if parent < 0:
                break
            reachable += 1
        counts.update(steps=1, candidates=len(self._candidates), kept=len(step.tree), accepted=len(step.emitted) - 1,
                      reachable=reachable, first_in_candidates=(-1, step.emitted[0]) in self._candidates,
                      first_kept=step.emitted[0] in kept_first)
        update(self, step)

    AutoDrafter._merge, AutoDrafter.update = recording_merge, recording_update
    auto_module.auto_core = lambda *settings: None  # the Python merge, which this wraps, not csrc/auto.cpp's
    llm = LLM(threads=args.threads)
    prompts, params = prompts_and_params(args)
    for prompt in prompts:
        llm.chat([[{"role": "user", "content": prompt.turns[0]}]], params, method="auto")
    s = counts["steps"]
    print(f"{len(prompts)} prompts, {s} steps, T {args.temperature}, top-p {args.top_p}: "
          f"{counts['candidates'] / s:.1f} candidate nodes a step, {counts['kept'] / s:.1f} kept")
    print(f"first token among the depth-1 candidates {counts['first_in_candidates'] / s:.3f}, "
          f"among the kept {counts['first_kept'] / s:.3f}")
    print(f"accepted a step: {counts['accepted'] / s:.2f} from the kept trees, "
          f"{counts['reachable'] / s:.2f} had every candidate been verified")


if __name__ == "__main__":
    main()
