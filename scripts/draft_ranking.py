"""How much of a sampled step's tau `auto` leaves in how it ranks its candidates and how many it drafts.

Every step verifies `auto`'s whole candidate pool (its `budget` best merged nodes) instead of the
tree it would draft; decoding is lossless, so the output is the same. Per node the script records
`auto`'s score and the target's probability of the node's token at its parent's row, processed as
verification processes it (`Sampler.probs`: temperature, top-p). A node's path probability (the
product along its path) is what it adds to a step's expected accepted tokens, so for any ranking
and size k a step's expected tau is 1 + the sum of the path probabilities of the k nodes ranked
first. Reported, per step on average:

- the expected tau of `auto`'s ranking at the size `auto` chose, and at fixed sizes, against the
  oracle ranking (by the true path probabilities) at the same sizes;
- a modeled speed, expected tokens / (1 + c * nodes) with c a node's cost in a forward as a share
  of a one-token forward (--node-cost), for `auto`'s ranking sized by its own scores, sized per
  step by the truth (the oracle size), and for the oracle ranking and size;
- the same for a logistic model of a node's probability over what `auto` keys on (member, depth,
  sibling rank, agreement, trigram seen) plus the context's bigram counts and the previous step's
  acceptance, fit on every other prompt (the true probabilities as soft labels) and scored on the
  rest.

`auto`'s statistics here learn from every pool node, not from its own smaller trees, so its
ranking is if anything better informed than in decoding. The per-node cost model leaves out the
drafting's own time (the same for every ranking).

    python scripts/draft_ranking.py --skip 12 --limit 6 [--draft-head head.safetensors] [--node-cost 0.03]
    python scripts/draft_ranking.py --load pools.pkl --node-cost 0.02   # re-score saved pools (--save)
"""
from __future__ import annotations

import argparse
import math
import pickle
from collections import defaultdict

import numpy as np
import torch

from auto_ab import add_run_arguments, prompts_and_params  # scripts/ is on the path when run as a script
from fastdecode import LLM

MEMBERS = ("suffix", "aded", "recycling", "head")
SIZES = (4, 6, 8, 12)


def node_features(keys: list[tuple], depth: int, rate: float, bigram: float, recycled: float,
                  prev: tuple[float, float, int]) -> list[float]:
    """A node's features: its keys' parts (auto.py's (member, depth, rank, agreement, seen)), auto's
    learned rate for it (its score over its parent's), the context's share of its parent token's
    successors that were its token, the probability `recycling`'s stored logits give it (0 when its
    token is not among the parent token's stored successors), the previous step's last row (best
    probability, the bonus token's) and accepted count."""
    f = [float(min(depth, 6) == d) for d in range(1, 7)]
    by_member = {k[0]: k for k in keys}
    for m in MEMBERS:
        key = by_member.get(m)
        rank = key[2] if key else -1
        f += [float(key is not None)] + [float(rank == r) for r in range(4)]
    agree = keys[0][3]
    f += [float(agree == a) for a in (1, 2, 3)]
    f += [math.log1p(keys[0][4]), math.log(max(rate, 1e-6)), bigram, recycled, float(recycled == 0.0)]
    best, bonus, accepted = prev
    f += [best, bonus, math.log(bonus + 1e-4), min(accepted, 6) / 6, 1.0]
    return f


def record(args: argparse.Namespace) -> list[list[dict]]:
    """Decode the prompts with `auto` verifying its whole pool; per request, per step: auto's size,
    and per node (parents first) its parent, auto's score, its features and its true probability."""
    prompts, params = prompts_and_params(args)
    llm = LLM(threads=args.threads, prefix_cache=False, draft_head=args.draft_head)
    drafter = llm.new_drafter("auto")
    drafter._core = None  # the Python path: its nodes carry their keys and scores (the same trees)
    llm.drafter = lambda method: drafter
    state: dict = {}
    choose, begin, propose, update = drafter.choose_size, drafter.begin, drafter.propose, drafter.update

    def choose_all(scores: list[float]) -> int:
        state["k"] = choose(scores)  # what auto would draft (and its step count moves on as it would)
        return len(scores)

    def begin_request(prompt_ids: list[int], request=None) -> None:
        state.update(sampler=request.sampler, seen=0, prev=(1.0, 1.0, 0))
        state["uni"], state["bi"] = defaultdict(int), defaultdict(int)
        begin(prompt_ids, request)

    def propose_pool(context: list[int], budget: int):
        uni, bi = state["uni"], state["bi"]
        for j in range(state["seen"], len(context)):  # the context's bigram counts, brought up to date
            if j >= 1:
                uni[context[j - 1]] += 1
                bi[context[j - 1], context[j]] += 1
        state["seen"] = len(context)
        return propose(context, budget)

    def update_recording(step) -> None:
        tree, sampler = step.tree, state["sampler"]
        probs = [sampler.probs(step.logits[r]) for r in range(len(tree) + 1)]
        rows = []
        chosen = drafter._chosen
        for (node, _), token, parent in zip(chosen, tree.tokens, tree.parents):
            before = step.root if parent < 0 else tree.tokens[parent]
            seen = state["uni"].get(before, 0)
            bigram = state["bi"].get((before, token), 0) / seen if seen else 0.0
            rate = node.score / (chosen[parent][0].score if parent >= 0 else 1.0)
            rows.append({"parent": parent, "score": node.score, "y": float(probs[parent + 1][token]),
                         "x": node_features(node.keys, node.depth, rate, bigram, recycled(before, token), state["prev"])})
        state["log"][-1].append({"k": state["k"], "rows": rows})
        last = probs[step.accepted_rows[-1]]
        state["prev"] = (float(last.max()), float(last[step.emitted[-1]]), len(step.emitted) - 1)
        update(step)

    table = drafter.members["recycling"]

    def recycled(before: int, token: int) -> float:
        successors, logits = table.successors[before], table.logits[before]
        hit = np.flatnonzero(successors == token)
        if not len(hit):
            return 0.0
        weights = np.exp((logits - logits.max()) / args.temperature)
        return float(weights[hit[0]] / weights.sum())

    drafter.choose_size, drafter.begin, drafter.propose, drafter.update = (choose_all, begin_request, propose_pool,
                                                                           update_recording)
    state["log"] = []
    for i, prompt in enumerate(prompts):
        state["log"].append([])
        llm._run_to_end(llm.apply_chat_template([{"role": "user", "content": prompt.turns[0]}]), params, "auto")
        print(f"prompt {i + 1}/{len(prompts)}: {len(state['log'][-1])} steps", flush=True)
    return state["log"]


def fit_logistic(x: np.ndarray, y: np.ndarray, iters: int = 3000, l2: float = 1e-3):
    """Logistic regression with soft labels (Adam on the cross-entropy), on standardized features."""
    mu, sd = x.mean(0), x.std(0) + 1e-9
    mu[-1], sd[-1] = 0.0, 1.0  # the bias column
    z = (x - mu) / sd
    w, m, v = np.zeros(x.shape[1]), np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for t in range(1, iters + 1):
        g = z.T @ (1 / (1 + np.exp(-z @ w)) - y) / len(y) + l2 * w
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        w -= 0.05 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return lambda x: 1 / (1 + np.exp(-((x - mu) / sd) @ w))


def paths(rows: list[dict], values) -> list[float]:
    """Path products of per-node values (parents come first)."""
    out: list[float] = []
    for r, value in zip(rows, values):
        out.append(value * (out[r["parent"]] if r["parent"] >= 0 else 1.0))
    return out


def evaluate(requests: list[list[dict]], model, node_cost: float) -> None:
    sums: defaultdict[str, float] = defaultdict(float)
    steps = 0
    for request in requests:
        for step in request:
            rows, n = step["rows"], len(step["rows"])
            true = paths(rows, [r["y"] for r in rows])
            rankings = {"auto": [r["score"] for r in rows], "oracle": true}
            if model is not None:
                rankings["model"] = paths(rows, model(np.array([r["x"] for r in rows])))
            steps += 1
            for name, score in rankings.items():
                order = sorted(range(n), key=lambda i: -score[i])
                gained = np.cumsum([0.0] + [true[i] for i in order])
                guessed = np.cumsum([0.0] + [score[i] for i in order])
                cost = 1 + node_cost * np.arange(n + 1)
                if name in ("auto", "oracle"):  # both at the size auto chose
                    sums[f"{name} at auto size"] += gained[step["k"]]
                if name == "auto":
                    sums["nodes auto at its size"] += step["k"]
                for k in SIZES:
                    sums[f"{name} {k}"] += gained[min(k, n)]
                for sizer, k in (("own", int(np.argmax((1 + guessed) / cost))),
                                 ("oracle size", int(np.argmax((1 + gained) / cost)))):
                    sums[f"{name} {sizer} tokens"] += 1 + gained[k]
                    sums[f"{name} {sizer} cost"] += 1 + node_cost * k
                    sums[f"{name} {sizer} nodes"] += k
    print(f"  {steps} steps; auto drafted {sums['nodes auto at its size'] / steps:.2f} nodes a step: expected tau "
          f"{1 + sums['auto at auto size'] / steps:.3f}, the oracle's ranking at those sizes "
          f"{1 + sums['oracle at auto size'] / steps:.3f}")
    names = [name for name in ("auto", "model", "oracle") if f"{name} 4" in sums]
    print("  expected tau at a fixed size: " + "; ".join(
        f"{k} nodes " + ", ".join(f"{name} {1 + sums[f'{name} {k}'] / steps:.3f}" for name in names) for k in SIZES))
    print(f"  modeled speed (tokens / (1 + {node_cost} x nodes)), sized by the ranking's own scores | per step by the truth:")
    for name in names:
        cells = []
        for sizer in ("own", "oracle size"):
            tokens, cost, nodes = (sums[f"{name} {sizer} {part}"] for part in ("tokens", "cost", "nodes"))
            cells.append(f"{tokens / cost:.3f} (tau {tokens / steps:.3f}, {nodes / steps:.2f} nodes)")
        print(f"    {name:7s} " + " | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(ap, limit=6)
    ap.set_defaults(skip=12, temperature=0.7, top_p=0.9)  # held-out prompts, sampled
    ap.add_argument("--draft-head", default=None, help="a trained head (fastdecode train-head): `auto` takes it as a member")
    ap.add_argument("--node-cost", type=float, default=0.03,
                    help="a tree node's cost in a forward, as a share of a one-token forward (the modeled speed)")
    ap.add_argument("--save", default=None, help="write the recorded pools to this file (pickle)")
    ap.add_argument("--load", default=None, help="score pools saved by --save instead of decoding")
    args = ap.parse_args()
    if args.temperature <= 0:
        ap.error("--temperature must be > 0: the script measures sampled acceptance")
    if args.load:
        with open(args.load, "rb") as f:
            requests = pickle.load(f)
    else:
        requests = record(args)
    if args.save:
        with open(args.save, "wb") as f:
            pickle.dump(requests, f)
    train, test = requests[::2], requests[1::2]
    rows = [r for request in train for step in request for r in step["rows"]]
    model = fit_logistic(np.array([r["x"] for r in rows]), np.array([r["y"] for r in rows])) if rows else None
    print(f"fit on {len(train)} prompts ({len(rows)} nodes); scored on the other {len(test)}:")
    evaluate(test, model, args.node_cost)
    print("all prompts, auto and the oracle:")
    evaluate(requests, None, args.node_cost)


if __name__ == "__main__":
    main()
