"""`auto`: the hybrid drafter. Every member drafter proposes a tree; the trees are merged into one
trie, each node scored by its estimated chance of being accepted, and the tree is cut to the size
that maximises expected tokens per unit of forward cost on this machine.

Scores come from observed acceptance, not from the members' own confidence: for every
(member, depth, sibling rank) we count how often a node whose parent was accepted was itself
accepted (a Beta prior keeps early estimates modest). A node's score is its parent's score times
the best conditional rate among the members that proposed it, so scores never grow down a path
and the top-k nodes always form a tree. The tree keeps the k best nodes maximising
(1 + sum of scores) / step_cost(k) (the 1 is the bonus token every step yields); k = 0 is plain
decoding.

step_cost(k) is the wall time of a whole step with k draft nodes over one with none, learned
while decoding (`StepCost`): the time from one propose() to the next covers the members'
proposals, the forward, verification and the members' updates, which a forward-only curve
measured at load misses (with 10 ms int4 forwards the members' Python work is ~15 % of a step,
and tree forwards cost more in place than in a warm, repeated measurement).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastdecode.drafters.base import DraftRequest, Drafter, StepResult
from fastdecode.tree import DraftTree

BASE_RATE = 1 / 3  # prior conditional acceptance of a depth-1 node nobody has seen yet
PRIOR_WEIGHT = 3.0  # the prior counts as this many trials
MAX_RANK = 3  # siblings beyond the 3rd share one statistic
MAX_TRIALS = 5000.0  # counts are rescaled past this, so the rates follow a changing workload


class StepCost:
    """A step's wall time as a + b * nodes, fitted by exponentially weighted least squares over the
    steps seen, relative to a + 0: `ratio(k) = 1 + slope * k`. Until the observed sizes vary enough
    to pin the slope, it leans on the prior (the load-time forward curve's slope over 8 nodes):
    the prior counts as PRIOR_STEPS observations spread over 0 and 8 nodes."""

    DECAY = 0.995  # per observation: the fit follows the last few hundred steps
    PRIOR_STEPS = 8.0
    PRIOR_SPAN = 8

    def __init__(self, prior: Callable[[int], float]) -> None:
        self.prior_slope = max((prior(self.PRIOR_SPAN + 1) - prior(1)) / self.PRIOR_SPAN, 0.0)
        self.sums = [0.0] * 5  # sum of w, w k, w k^2, w t, w k t

    def observe(self, nodes: int, seconds: float) -> None:
        for i in range(5):
            self.sums[i] *= self.DECAY
        for i, v in enumerate((1.0, nodes, nodes * nodes, seconds, nodes * seconds)):
            self.sums[i] += v

    def slope(self) -> float:
        """Relative cost of one more node: b / a, blended with the prior by how well the data pin it."""
        w, wk, wkk, wt, wkt = self.sums
        if w < 1.0:
            return self.prior_slope
        spread = wkk - wk * wk / w  # weighted sum of squared deviations of k
        b = (wkt - wk * wt / w) / spread if spread > 1e-9 else 0.0
        a = (wt - b * wk) / w
        if a <= 0:
            return self.prior_slope
        # the prior as PRIOR_STEPS observations half at 0, half at PRIOR_SPAN nodes: its spread
        prior_spread = self.PRIOR_STEPS * (self.PRIOR_SPAN / 2) ** 2
        return max((spread * b / a + prior_spread * self.prior_slope) / (spread + prior_spread), 0.0)

    def __call__(self, nodes: int) -> float:
        return 1.0 + self.slope() * nodes


@dataclass
class _Node:
    token: int
    parent: int  # merged index, -1 = root
    depth: int
    keys: list[tuple[str, int, int]] = field(default_factory=list)  # (member, depth, sibling rank)
    score: float = 0.0


class AutoDrafter:
    def __init__(self, members: dict[str, Drafter], cost: Callable[[int], float]) -> None:
        self.members = members
        self.step_cost = StepCost(cost)
        self.stats: dict[tuple[str, int, int], list[float]] = {}
        self._chosen: list[tuple[_Node, int]] = []  # the last tree's nodes with their tree-local parents
        self._last: tuple[int, float] | None = None  # (nodes, start time) of the step under way

    def begin(self, prompt_ids: list[int], request: DraftRequest | None = None) -> None:
        self._last = None  # the time since the last request's step is not a step
        for member in self.members.values():
            member.begin(prompt_ids, request)

    def end(self, output_ids: list[int]) -> None:
        for member in self.members.values():
            member.end(output_ids)

    def rate(self, key: tuple[str, int, int]) -> float:
        """Conditional acceptance of a node given its parent was accepted. The prior of depth d is
        the rate at depth d - 1, so deep nodes of a member that is usually right get tried."""
        name, depth, rank = key
        prior = BASE_RATE if depth <= 1 else self.rate((name, depth - 1, rank))
        hits, trials = self.stats.get(key, (0.0, 0.0))
        return (hits + PRIOR_WEIGHT * prior) / (trials + PRIOR_WEIGHT)

    def propose(self, context: list[int], budget: int) -> DraftTree:
        now = time.perf_counter()
        if self._last is not None:
            self.step_cost.observe(self._last[0], now - self._last[1])
        tree = self._propose(context, budget)
        self._last = (len(tree), now)
        return tree

    def _propose(self, context: list[int], budget: int) -> DraftTree:
        nodes = self._merge(context, budget)
        for node in nodes:  # parents come first
            best = max(self.rate(key) for key in node.keys)
            node.score = best * (1.0 if node.parent < 0 else nodes[node.parent].score)
        order = sorted(range(len(nodes)), key=lambda i: (-nodes[i].score, i))[:budget]
        keep = sorted(order[: self._best_size([nodes[i].score for i in order])])
        remap = {old: new for new, old in enumerate(keep)}
        parents = [remap[nodes[i].parent] if nodes[i].parent >= 0 else -1 for i in keep]
        self._chosen = [(nodes[i], parent) for i, parent in zip(keep, parents)]
        return DraftTree([nodes[i].token for i in keep], parents)

    def _merge(self, context: list[int], budget: int) -> list[_Node]:
        nodes: list[_Node] = []
        index: dict[tuple[int, int], int] = {}
        for name, member in self.members.items():
            tree = member.propose(context, budget)
            local: list[int] = []
            sibling_rank: dict[int, int] = {}
            for token, parent in zip(tree.tokens, tree.parents):
                merged_parent = -1 if parent < 0 else local[parent]
                rank = sibling_rank.get(parent, 0)
                sibling_rank[parent] = rank + 1
                idx = index.get((merged_parent, token))
                if idx is None:
                    depth = 1 if merged_parent < 0 else nodes[merged_parent].depth + 1
                    idx = index[(merged_parent, token)] = len(nodes)
                    nodes.append(_Node(token, merged_parent, depth))
                nodes[idx].keys.append((name, nodes[idx].depth, min(rank, MAX_RANK)))
                local.append(idx)
        return nodes

    def _best_size(self, scores: list[float]) -> int:
        """k maximising (1 + sum of the k best scores) / step_cost(k)."""
        best_k, best_value, expected = 0, 1.0, 1.0
        slope = self.step_cost.slope()
        for k, score in enumerate(scores, start=1):
            expected += score
            value = expected / (1.0 + slope * k)
            if value > best_value:
                best_k, best_value = k, value
        return best_k

    def update(self, step: StepResult) -> None:
        for member in self.members.values():
            member.update(step)
        accepted = set(step.accepted_rows)
        for i, (node, parent) in enumerate(self._chosen):
            if parent + 1 not in accepted:  # row of the parent; row 0 = root
                continue  # never had a chance
            hit = float(i + 1 in accepted)
            for key in node.keys:
                stat = self.stats.setdefault(key, [0.0, 0.0])
                stat[0] += hit
                stat[1] += 1.0
                if stat[1] > MAX_TRIALS:
                    stat[0] /= 2
                    stat[1] /= 2
