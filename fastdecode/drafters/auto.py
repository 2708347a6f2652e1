"""`auto`: the hybrid drafter. Every member drafter proposes a tree; the trees are merged into one
trie, each node scored by its estimated chance of being accepted, and the tree is cut to the size
that maximises expected tokens per unit of forward cost on this machine.

Scores come from observed acceptance, not from the members' own confidence: for every
(member, depth, sibling rank, agreement, seen) we count how often a node whose parent was
accepted was itself accepted (a Beta prior keeps early estimates modest). Agreement is how many
members proposed the node: it predicts acceptance more than any member does. Sampled (T 0.7,
top-p 0.9, 7 Spec-Bench prompts), the depth-1 first guess of `aded` was accepted 7.5 % of the
time when it alone proposed it, 34 % with a second member and 100 % (45 of 45) with all three,
against the 49 % a statistic pooled over agreement gave it; pooled, a step's expected accepted
tokens were 2.98 where 1.09 came, with agreement 1.97 and 1.97. Seen is how often (0, 1, 2 or
more) the request's context already holds the node's last three tokens (its parent's two and its
own): within one rate such nodes are far likelier right (recorded sampled pools: 3 % against 45 %
for nodes `auto` rated below 0.1, 47 % against 81 % above 0.6; README). A node's score is its
parent's score times the best conditional rate among the members that proposed it, so scores
never grow down a path and the top-k nodes always form a tree. The tree keeps the k best nodes
maximising (1 + sum of scores) / step_cost(k) (the 1 is the bonus token every step yields); k = 0
is plain decoding.

step_cost(k) is the wall time of a whole step with k draft nodes, learned while decoding
(`StepCost`): the time from one propose() to the next covers the members' proposals, the
forward, verification and the members' updates, which a forward-only curve measured at load
misses. It is learned per size, not as a line: with the bf16 weights prefetched into L2, a tree
of up to ~6 nodes costs little more than a one-token step and every node past it ~8 % of one
(the multiply-adds stop hiding under the weight stream), a knee no slope fits. So every
EXPLORE_EVERY-th step drafts one or two nodes more or fewer than the best size, and the cost of
each size is fitted to the time differences of consecutive steps; every PROBE_EVERY-th step
drafts half the best size, so the fit also sees sizes far apart.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fastdecode.drafters.base import DraftRequest, Drafter, StepResult
from fastdecode.kernels import auto_core
from fastdecode.tree import DraftTree

BASE_RATE = 1 / 3  # prior conditional acceptance of a depth-1 node nobody has seen yet
PRIOR_WEIGHT = 3.0  # the prior counts as this many trials
MAX_RANK = 3  # siblings beyond the 3rd share one statistic
MAX_AGREE = 3  # nodes proposed by 3 or more members share one statistic
MAX_SEEN = 2  # nodes whose trigram the context holds twice or more share one statistic
MAX_TRIALS = 5000.0  # counts are rescaled past this, so the rates follow a changing workload
EXPLORE_EVERY = 8  # every 8th step tries a size next to the best, so StepCost sees them
EXPLORE_OFFSETS = (-1, 1, -2, 2)  # taken in turn, clipped to the nodes at hand
# Every PROBE_EVERY-th step (PROBE_PHASE steps into each period, never an exploring step) drafts
# half the best size: two pairs of far-apart sizes (half after full, full after half) for
# StepCost. Exploring only next to the chosen size, `auto` could settle on 20-24 nodes early, on
# the load-time curve's too cheap slope, and take thousands of steps to come back (see README).
PROBE_EVERY = 64
PROBE_PHASE = 4


class StepCost:
    """Relative wall time of a step per draft size k, learned while decoding.

    A step's time depends on the context length (attention) as much as on k, so sizes are not
    compared across requests or far-apart steps: two consecutive steps of sizes a != b give one
    observation of log t(b) - log t(a), their contexts being nearly the same. The log costs are
    the prior curve's (the load-time forward curve, k nodes costing prior(k + 1)) plus a
    correction g(k) fitted to those differences by least squares, with g kept smooth across
    adjacent sizes (weight SMOOTH), so a size never seen next to another follows the prior's shape
    from its neighbours. The result is made non-decreasing in k (pool adjacent violators): a
    larger tree never costs less. Old pairs fade (DECAY per pair); the fit is redone every
    REFIT_EVERY pairs."""

    DECAY = 0.995  # per observed pair: the fit follows the last few hundred
    SMOOTH = 1.0
    RIDGE = 1e-3  # pins the level of g, which the differences leave free
    # pairs between two fits: a fit (a linear solve, ~0.13 ms a step just after a forward, for a
    # 24-node budget) each step cost ~0.8 % of it, while 8 pairs move a fit over the last few
    # hundred by little
    REFIT_EVERY = 8

    def __init__(self, prior: Callable[[int], float], max_nodes: int = 64) -> None:
        self.prior = np.log(np.maximum([prior(k + 1) for k in range(max_nodes + 1)], 1e-6))
        self.gram = np.zeros((max_nodes + 1, max_nodes + 1))  # sum over pairs of (e_b - e_a)(e_b - e_a)^T
        self.rhs = np.zeros(max_nodes + 1)  # sum over pairs of (e_b - e_a) * observed log ratio
        self.last: tuple[int, float] | None = None  # the previous step of this request: (nodes, seconds)
        self._solved: dict[int, list[float]] = {}
        self._unfitted = 0  # pairs observed since the fits in _solved
        self._penalty: dict[int, np.ndarray] = {}  # per system size: SMOOTH * D^T D + RIDGE * I

    def new_request(self) -> None:
        self.last = None

    def observe(self, nodes: int, seconds: float) -> None:
        if nodes >= len(self.rhs) or seconds <= 0:  # not recorded: nor paired with the step after it
            self.last = None
            return
        last, self.last = self.last, (nodes, seconds)
        if last is None or last[0] == nodes:
            return
        a, b, diff = last[0], nodes, math.log(seconds / last[1])
        self.gram *= self.DECAY
        self.rhs *= self.DECAY
        self.gram[a, a] += 1.0
        self.gram[b, b] += 1.0
        self.gram[a, b] -= 1.0
        self.gram[b, a] -= 1.0
        self.rhs[b] += diff
        self.rhs[a] -= diff
        self._unfitted += 1
        if self._unfitted >= self.REFIT_EVERY:
            self._solved.clear()
            self._unfitted = 0

    def costs(self, n: int) -> list[float]:
        """Relative cost of a step with k nodes, k = 0..n (cost 1 at k = 0)."""
        n = min(n, len(self.rhs) - 1)
        if n not in self._solved:
            m = n + 1
            gram, prior = self.gram[:m, :m], self.prior[:m]
            if m not in self._penalty:
                step = np.diff(np.eye(m), axis=0)  # rows e_{k+1} - e_k: g's differences between adjacent sizes
                self._penalty[m] = self.SMOOTH * (step.T @ step) + self.RIDGE * np.eye(m)
            g = np.linalg.solve(gram + self._penalty[m], self.rhs[:m] - gram @ prior)
            logs = _pooled_non_decreasing(prior + g)
            self._solved[n] = np.exp(logs - logs[0]).tolist()
        return self._solved[n]


def _pooled_non_decreasing(values: np.ndarray) -> np.ndarray:
    """The closest non-decreasing sequence in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values.tolist():
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, c2), (m1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return np.array([mean for mean, count in blocks for _ in range(int(count))])


@dataclass(slots=True)
class _Node:
    token: int
    parent: int  # merged index, -1 = root
    depth: int
    keys: list[tuple[str, int, int, int, int]]  # (member, depth, sibling rank, agreement, seen)
    score: float = 0.0


class AutoDrafter:
    def __init__(self, members: dict[str, Drafter], cost: Callable[[int], float], native: bool | None = None) -> None:
        """native: the merge, scores and statistics in csrc/auto.cpp (None: when the kernels are
        built; True raises without them). Scripts that wrap _merge or _propose pass False."""
        self.members = members
        self.step_cost = StepCost(cost)
        self._core = None if native is False else auto_core(BASE_RATE, PRIOR_WEIGHT, MAX_TRIALS, MAX_RANK, MAX_AGREE,
                                                             MAX_SEEN)
        if native and self._core is None:
            raise ValueError("native=True needs the fastdecode kernels, which are unavailable here")
        self._member_ids: dict[str, int] = {}  # the native core's member numbers
        self._core_length = 0  # context tokens the native core has counted
        self._stats: dict[tuple[str, int, int, int, int], list[float]] = {}  # Python's statistics (not native)
        self._rates: dict[tuple[str, int, int, int, int], float] = {}  # rate(), until the next update
        self._chosen: list[tuple[_Node, int]] = []  # the last tree's nodes with their tree-local parents
        self._last: tuple[int, float] | None = None  # (nodes, start time) of the step under way
        self._steps = 0
        self.probe_every = PROBE_EVERY  # 0: never probe (A/B scripts)
        self._use_seen = True
        self._trigrams: dict[tuple[int, int, int], int] = {}  # the request's context: trigram -> count
        self._scanned = 0  # context tokens whose trigrams are counted

    def begin(self, prompt_ids: list[int], request: DraftRequest | None = None) -> None:
        self._last = None  # the time since the last request's step is not a step
        self.step_cost.new_request()
        self._trigrams.clear()
        self._scanned = 0
        if self._core is not None:
            self._core.begin()
            self._core_length = 0
        for member in self.members.values():
            member.begin(prompt_ids, request)

    def end(self, output_ids: list[int]) -> None:
        for member in self.members.values():
            member.end(output_ids)

    @property
    def use_seen(self) -> bool:
        """False: every node's seen is 0 (A/B scripts)."""
        return self._use_seen

    @use_seen.setter
    def use_seen(self, on: bool) -> None:
        self._use_seen = on
        if self._core is not None:
            self._core.set_use_seen(on)

    @property
    def stats(self) -> dict[tuple[str, int, int, int, int], list[float]]:
        """(member, depth, sibling rank, agreement, seen) -> [hits, trials] (native: a copy)."""
        if self._core is None:
            return self._stats
        names = {i: name for name, i in self._member_ids.items()}
        return {(names[int(m)], int(d), int(r), int(a), int(e)): [h, t] for m, d, r, a, e, h, t in self._core.stats_rows()}

    def rate(self, key: tuple[str, int, int, int, int]) -> float:
        """Conditional acceptance of a node given its parent was accepted. The prior of depth d is
        the rate at depth d - 1, so deep nodes of a member that is usually right get tried.
        Memoized until the next update (a step scores ~15 nodes, each through its depths)."""
        if self._core is not None:
            name, *rest = key
            return self._core.rate(self._member_id(name), *rest)
        rate = self._rates.get(key)
        if rate is None:
            name, depth, rank, agree, seen = key
            prior = BASE_RATE if depth <= 1 else self.rate((name, depth - 1, rank, agree, seen))
            hits, trials = self._stats.get(key, (0.0, 0.0))
            rate = self._rates[key] = (hits + PRIOR_WEIGHT * prior) / (trials + PRIOR_WEIGHT)
        return rate

    def _member_id(self, name: str) -> int:
        member = self._member_ids.get(name)
        if member is None:
            member = self._member_ids[name] = len(self._member_ids)
        return member

    def propose(self, context: list[int], budget: int) -> DraftTree:
        now = time.perf_counter()
        if self._last is not None:
            self.step_cost.observe(self._last[0], now - self._last[1])
        tree = self._propose(context, budget)
        self._last = (len(tree), now)
        return tree

    def _propose(self, context: list[int], budget: int) -> DraftTree:
        core = self._core
        if core is not None:  # the same merge, scores and ranking in one native object
            ids, sizes, tokens, parents = [], [], [], []
            for name, member in self.members.items():
                tree = member.propose(context, budget)
                ids.append(self._member_id(name))
                sizes.append(len(tree.tokens))
                tokens += tree.tokens
                parents += tree.parents
            if len(context) > self._core_length:
                core.extend(context[self._core_length:])
                self._core_length = len(context)
            scores = core.score(ids, sizes, tokens, parents, budget)
            return DraftTree(*core.take(self.choose_size(scores)))
        nodes = self._merge(context, budget)
        rates, scores = self._rates, []
        for node in nodes:  # parents come first
            best = 0.0  # the best rate among the node's keys (every rate is > 0)
            for key in node.keys:
                rate = rates.get(key)
                if rate is None:
                    rate = self.rate(key)
                if rate > best:
                    best = rate
            node.score = best if node.parent < 0 else best * nodes[node.parent].score
            scores.append(node.score)
        order = sorted(range(len(nodes)), key=scores.__getitem__, reverse=True)[:budget]  # stable: ties by index
        keep = sorted(order[: self.choose_size([scores[i] for i in order])])
        remap = {old: new for new, old in enumerate(keep)}
        parents = [remap[nodes[i].parent] if nodes[i].parent >= 0 else -1 for i in keep]
        self._chosen = [(nodes[i], parent) for i, parent in zip(keep, parents)]
        return DraftTree([nodes[i].token for i in keep], parents)

    def _merge(self, context: list[int], budget: int) -> list[_Node]:
        tokens: list[int] = []  # the merged trie, parents first
        parents: list[int] = []
        depths: list[int] = []
        proposed: list[list[tuple[str, int]]] = []  # per node: (member, sibling rank) of each proposal
        index: dict[tuple[int, int], int] = {}
        for name, member in self.members.items():
            tree = member.propose(context, budget)
            local: list[int] = []
            sibling_rank: dict[int, int] = {}
            for token, parent in zip(tree.tokens, tree.parents):
                merged_parent = -1 if parent < 0 else local[parent]
                rank = sibling_rank.get(parent, 0)
                sibling_rank[parent] = rank + 1
                pair = (merged_parent, token)
                idx = index.get(pair)
                if idx is None:
                    idx = index[pair] = len(tokens)
                    tokens.append(token)
                    parents.append(merged_parent)
                    depths.append(1 if merged_parent < 0 else depths[merged_parent] + 1)
                    proposed.append([(name, rank)])
                else:
                    proposed[idx].append((name, rank))
                local.append(idx)
        seen = self.trigram_counts(context, tokens, parents) if self.use_seen else [0] * len(tokens)
        nodes = []
        for token, parent, depth, pairs, count in zip(tokens, parents, depths, proposed, seen):
            # the keys, once every member has proposed: agreement and seen are known
            agree = 1 if len(pairs) == 1 else min(len({name for name, _ in pairs}), MAX_AGREE)
            count = min(count, MAX_SEEN)
            nodes.append(_Node(token, parent, depth, [(name, depth, min(rank, MAX_RANK), agree, count) for name, rank in pairs]))
        return nodes

    def trigram_counts(self, context: list[int], tokens: list[int], parents: list[int]) -> list[int]:
        """How often the request's context (prompt and output so far) holds each node's last three
        tokens (a trie given as tokens and parents, parents first): its own and the two before it
        on its path, the context's where the path is short."""
        counts = self._count_trigrams(context)
        last = tuple(context[-2:]) if len(context) >= 2 else (-1, -1)
        out = []
        for token, parent in zip(tokens, parents):
            if parent < 0:
                out.append(counts.get((*last, token), 0))
            else:
                grand = parents[parent]
                out.append(counts.get((tokens[grand] if grand >= 0 else last[1], tokens[parent], token), 0))
        return out

    def trigram_count(self, a: int, b: int, c: int) -> int:
        """How often the request's context, as counted so far, holds (a, b, c)."""
        if self._core is not None:
            return self._core.trigram_count(a, b, c)
        return self._trigrams.get((a, b, c), 0)

    def _count_trigrams(self, context: list[int]) -> dict[tuple[int, int, int], int]:
        """The request's trigram counts, brought up to `context` (its prompt and output so far)."""
        counts = self._trigrams
        for j in range(max(self._scanned, 2), len(context)):
            key = (context[j - 2], context[j - 1], context[j])
            counts[key] = counts.get(key, 0) + 1
        self._scanned = max(self._scanned, len(context))
        return counts

    def choose_size(self, scores: list[float]) -> int:
        """This step's tree size for its nodes' scores, best first: the best size (`_best_size`),
        except on every EXPLORE_EVERY-th step a size beside it and on every probe_every-th half of it."""
        size = self._best_size(scores)
        self._steps += 1
        if self._steps % EXPLORE_EVERY == 0:
            offset = EXPLORE_OFFSETS[self._steps // EXPLORE_EVERY % len(EXPLORE_OFFSETS)]
            size = min(max(size + offset, 0), len(scores))
        elif self.probe_every and self._steps % self.probe_every == PROBE_PHASE % self.probe_every:
            size //= 2
        return size

    def _best_size(self, scores: list[float]) -> int:
        """k maximising (1 + sum of the k best scores) / step_cost(k)."""
        costs = self.step_cost.costs(len(scores))
        best_k, best_value, expected = 0, 1.0 / costs[0], 1.0
        for k, score in enumerate(scores[: len(costs) - 1], start=1):
            expected += score
            value = expected / costs[k]
            if value > best_value:
                best_k, best_value = k, value
        return best_k

    def update(self, step: StepResult) -> None:
        for member in self.members.values():
            member.update(step)
        if self._core is not None:
            self._core.update(step.accepted_rows)
            return
        self._rates.clear()
        accepted = set(step.accepted_rows)
        for i, (node, parent) in enumerate(self._chosen):
            if parent + 1 not in accepted:  # row of the parent; row 0 = root
                continue  # never had a chance
            hit = float(i + 1 in accepted)
            for key in node.keys:
                stat = self._stats.setdefault(key, [0.0, 0.0])
                stat[0] += hit
                stat[1] += 1.0
                if stat[1] > MAX_TRIALS:
                    stat[0] /= 2
                    stat[1] /= 2
