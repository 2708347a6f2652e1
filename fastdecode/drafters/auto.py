"""`auto`: the hybrid drafter. Every member drafter proposes a tree; the trees are merged into one
trie, each node scored by its estimated chance of being accepted, and the tree is cut to the size
that maximises expected tokens per unit of forward cost on this machine.

Scores come from observed acceptance, not from the members' own confidence: for every
(member, depth, sibling rank) we count how often a node whose parent was accepted was itself
accepted (a Beta prior keeps early estimates modest). A node's score is its parent's score times
the best conditional rate among the members that proposed it, so scores never grow down a path
and the top-k nodes always form a tree. With `cost(n)` the measured time of an n-token forward
over a 1-token one, the tree keeps the k best nodes maximising (1 + sum of scores) / cost(k + 1)
(the 1 is the bonus token every step yields); k = 0 is plain decoding.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fastdecode.drafters.base import Drafter, StepResult
from fastdecode.tree import DraftTree

BASE_RATE = 1 / 3  # prior conditional acceptance of a depth-1 node nobody has seen yet
PRIOR_WEIGHT = 3.0  # the prior counts as this many trials
MAX_RANK = 3  # siblings beyond the 3rd share one statistic
MAX_TRIALS = 5000.0  # counts are rescaled past this, so the rates follow a changing workload


@dataclass
class _Node:
    token: int
    parent: int  # merged index, -1 = root
    depth: int
    keys: list[tuple[str, int, int]] = field(default_factory=list)  # (member, depth, sibling rank)
    score: float = 0.0


class AutoDrafter:
    def __init__(self, members: dict[str, Drafter], cost: Callable[[int], float]) -> None:
        self.members, self.cost = members, cost
        self.stats: dict[tuple[str, int, int], list[float]] = {}
        self._chosen: list[tuple[_Node, int]] = []  # the last tree's nodes with their tree-local parents

    def begin(self, prompt_ids: list[int]) -> None:
        for member in self.members.values():
            member.begin(prompt_ids)

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
        """k maximising (1 + sum of the k best scores) / cost(k + 1)."""
        best_k, best_value, expected = 0, 1.0 / self.cost(1), 1.0
        for k, score in enumerate(scores, start=1):
            expected += score
            value = expected / self.cost(k + 1)
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
