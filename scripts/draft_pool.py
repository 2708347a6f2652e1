"""How much of tau is in `auto`'s candidates, and how much its choice among them loses. Runs `auto`
over Spec-Bench prompts and records, every step, all the nodes its members proposed (the merged
pool, before `auto` keeps its best) with `auto`'s score for each. Once a request is done its
output labels every recorded node: right iff its path is the output's continuation at that step
(greedy: what the target would have accepted; sampled: what the seeded draw emitted, which a
deterministic draft equals iff it would have been accepted). Then, per step, replayed:

- kept K: tau had `auto` drafted its K best-scored nodes (scores as recorded; K = 6 is its default budget);
- oracle: tau had it drafted just the right path in the pool (at most as many nodes as the path is
  deep): no choice among these candidates can do better.

It also prints, for the nodes whose parent was right (the root's children always), how often they
were right by `auto`'s conditional rate for them and by whether the request's context already held
their last three tokens (`AutoDrafter.trigram_counts`, what `auto`'s `seen` key counts); with
--no-seen `auto` scores without that key, as before it had it.

    python scripts/draft_pool.py --skip 10 --limit 6                    # prompts 10-15 per category
    python scripts/draft_pool.py --skip 10 --limit 6 --member-budget 24 # members propose 24 nodes each
    python scripts/draft_pool.py --skip 10 --limit 2 --member-budget 24 --temperature 0.7 --top-p 0.9 --no-seen

Replays hold the members' later proposals fixed, so they are estimates; "measured tau" is the run's own.
"""
from __future__ import annotations

import argparse

from fastdecode import LLM, SamplingParams
from fastdecode.bench.data import DEFAULT_HUMANEVAL, DEFAULT_SPEC_BENCH, load_prompts
from fastdecode.drafters.auto import AutoDrafter


class Recording(AutoDrafter):
    """`auto` whose members propose `member_budget` nodes each; every step's pool is recorded as
    (context length, [(path, score, parent index, conditional rate, trigram count)])."""

    def __init__(self, members: dict, cost, member_budget: int | None) -> None:
        super().__init__(members, cost, native=False)  # the Python merge, which this wraps
        self.member_budget, self.steps = member_budget, []

    def _merge(self, context, budget):
        self._nodes = super()._merge(context, self.member_budget or budget)
        return self._nodes

    def _propose(self, context, budget):
        tree = super()._propose(context, budget)  # scores the merged nodes
        paths: list[tuple[int, ...]] = []
        for node in self._nodes:
            paths.append((paths[node.parent] if node.parent >= 0 else ()) + (node.token,))
        counts = self.trigram_counts(context, [node.token for node in self._nodes], [node.parent for node in self._nodes])
        self.steps.append((len(context), [
            (path, node.score, node.parent, max(self.rate(key) for key in node.keys), count)
            for path, node, count in zip(paths, self._nodes, counts)]))
        return tree


RATE_BINS = (0.1, 0.3, 0.6)  # the seen table's rows: below 0.1, 0.1-0.3, 0.3-0.6, 0.6 and above


def replay(steps: list, sequence: list[int], budgets: list[int], seen: dict) -> tuple[list[int], int]:
    """Per budget K, the tokens the steps would emit keeping their K best nodes; and the oracle's.
    Adds to seen[(rate bin, trigram in the context)] = [right, nodes] over nodes whose parent was right."""
    kept, oracle = [0] * len(budgets), 0
    for length, pool in steps:
        right = [len(path) if tuple(sequence[length : length + len(path)]) == path else 0 for path, *_ in pool]
        oracle += 1 + max(right, default=0)
        ranked = sorted(range(len(pool)), key=lambda i: (-pool[i][1], i))
        for j, k in enumerate(budgets):
            kept[j] += 1 + max((right[i] for i in ranked[:k]), default=0)
        for i, (_, _, parent, rate, count) in enumerate(pool):
            if parent < 0 or right[parent]:
                cell = seen.setdefault((sum(rate >= b for b in RATE_BINS), count > 0), [0, 0])
                cell[0] += right[i] > 0
                cell[1] += 1
    return kept, oracle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip", type=int, default=10, help="prompts skipped per category (default: past the benchmark's 10)")
    p.add_argument("--limit", type=int, default=6, help="prompts per category after the skipped ones")
    p.add_argument("--member-budget", type=int, default=None, help="nodes each member proposes (default: the draft budget)")
    p.add_argument("--budgets", default="6,8,10,12", help="K values to replay")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-seen", action="store_true", help="auto without its seen key (as before 0b0c36b)")
    p.add_argument("--data", default=DEFAULT_SPEC_BENCH)
    p.add_argument("--humaneval", default=DEFAULT_HUMANEVAL)
    args = p.parse_args()
    if args.skip < 0 or args.limit < 1:
        p.error(f"--skip {args.skip} must be >= 0 and --limit {args.limit} >= 1")
    if args.member_budget is not None and args.member_budget < 1:
        p.error(f"--member-budget {args.member_budget} must be >= 1")
    try:
        budgets = [int(k) for k in args.budgets.split(",")]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 1:
        p.error(f"--budgets {args.budgets!r} must be comma-separated integers >= 1")
    prompts, notes = load_prompts(args.data, args.humaneval, limit=args.skip + args.limit)
    for note in notes:
        print(note)
    by_category: dict[str, list] = {}
    for prompt in prompts:
        by_category.setdefault(prompt.category, []).append(prompt)
    chosen = [q for group in by_category.values() for q in group[args.skip :]]
    llm = LLM(threads=args.threads)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    auto = Recording(llm.new_drafter("auto").members, llm.forward_cost, args.member_budget)
    auto.use_seen = not args.no_seen
    tokens = steps = recorded = oracle = 0
    seen: dict[tuple[int, bool], list[int]] = {}
    kept = [0] * len(budgets)
    for prompt in chosen:
        ids = llm.apply_chat_template([{"role": "user", "content": prompt.turns[0]}])
        auto.steps = []
        for out, _ in llm.engine.run("", ids, params, auto, llm.budget("auto")):
            pass
        tokens, steps = tokens + out.metrics.tokens - 1, steps + out.metrics.steps
        k, o = replay(auto.steps, ids + out.token_ids, budgets, seen)
        kept, oracle, recorded = [a + b for a, b in zip(kept, k)], oracle + o, recorded + len(auto.steps)
    print(f"{len(chosen)} prompts, {steps} steps, member budget {args.member_budget or llm.budget('auto')}, "
          f"temperature {args.temperature}: measured tau {tokens / steps:.3f}")
    print("  replayed tau, kept K: " + ", ".join(f"K={k} {v / recorded:.3f}" for k, v in zip(budgets, kept)))
    print(f"  oracle tau of the pool: {oracle / recorded:.3f}")
    labels = ["below 0.1", "0.1-0.3", "0.3-0.6", "0.6 and above"]
    print(f"  right share of nodes whose parent was right, by auto's rate{' (no seen key)' if args.no_seen else ''}:"
          " trigram not in the context | in it")
    for b, label in enumerate(labels):
        cells = [seen.get((b, held), [0, 0]) for held in (False, True)]
        print(f"    {label:>13}: " + " | ".join(f"{r / n:.3f} ({n})" if n else "- (0)" for r, n in cells))


if __name__ == "__main__":
    main()
