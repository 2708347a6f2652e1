"""ADED (Liu et al., "Adaptive Draft-Verification for Efficient Large Language Model
Decoding"): a tri-gram model of the target's output, searched with MCTS to build the draft tree.

The n-gram model: `trigram[(a, b)][c]` and `bigram[b][c]` count how often c followed (a, b) or
b. It learns from the prompt, from every verified token, and (the "LLM representation" of the
paper) from the target's top-1 prediction at every rejected tree node, which the verification
forward computed anyway. Counts persist across the requests of an LLM instance, so the model
keeps adapting to what the target says. A context (a, b) never seen falls back to the bigram.

The draft search is a small PUCT tree search (as in AlphaZero's MCTS) rooted at the last
emitted token. One simulation walks down from the root, at each node choosing the
continuation c that maximises

    Q(c) + c_puct * P(c | node) * sqrt(N(node)) / (1 + N(c))

where P is the n-gram probability (the prior), N the visit count and Q the mean value backed up
through c. When the walk picks a continuation not yet in the tree it adds it as a draft node,
with value = the n-gram probability of the whole path, and backs that value up the path.
High-probability continuations are exploited (deep chains) while the visit-count term spreads
nodes over less-visited siblings (breadth). The search stops at `budget` nodes.

Where the kernels are built the counts and the search run natively (csrc/aded.cpp): the same
counts, walk and arithmetic, so the same trees (tested against this file's code). Inside `auto`
(sampled, 14 Spec-Bench prompts, `python scripts/step_split.py --skip 12 --limit 2`) this
Python's proposals took 0.11-0.14 ms a step (three runs), the native ones 0.035.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from fastdecode.drafters.base import DraftRequest, StepResult
from fastdecode.kernels import aded_table
from fastdecode.tree import DraftTree

Counts = dict[int, int]


@dataclass
class _SearchNode:
    token: int
    prev: int  # the token before it (-1 if none): the n-gram context is (prev, token)
    draft_index: int  # -1 for the root
    path_prob: float
    visits: int = 0
    value_sum: float = 0.0
    children: dict[int, "_SearchNode"] = field(default_factory=dict)
    options: list[tuple[int, float]] | None = None  # (token, prior), filled on first visit
    exhausted: bool = False  # nothing left to add below it


class Aded:
    """Drafter: tri-gram counts + PUCT draft-tree search."""

    def __init__(self, top_m: int = 4, c_puct: float = 1.0, max_depth: int = 8, learn_from_logits: bool = True,
                 native: bool | None = None) -> None:
        """native: the counts and search in csrc/aded.cpp (None: when the kernels are built; True
        raises without them)."""
        self.top_m, self.c_puct, self.max_depth = top_m, c_puct, max_depth
        self.learn_from_logits = learn_from_logits
        self._native = None if native is False else aded_table(top_m, c_puct, max_depth)
        if native and self._native is None:
            raise ValueError("native=True needs the fastdecode kernels, which are unavailable here")
        self.trigram: defaultdict[tuple[int, int], Counts] = defaultdict(dict)  # Python's counts (not native)
        self.bigram: defaultdict[int, Counts] = defaultdict(dict)
        self._last_two: tuple[int, int] = (-1, -1)  # the two newest tokens of the request

    # -- Drafter protocol --------------------------------------------------------------------
    def begin(self, prompt_ids: list[int], request: DraftRequest | None = None) -> None:
        self._last_two = (-1, -1)
        self._learn_sequence(prompt_ids)

    def propose(self, context: list[int], budget: int) -> DraftTree:
        tree = DraftTree()
        if budget <= 0:
            return tree
        prev = context[-2] if len(context) > 1 else -1
        if self._native is not None:
            tokens, parents = self._native.propose(prev, context[-1], budget)
            return DraftTree(tokens, parents)
        root = _SearchNode(context[-1], prev, -1, 1.0)
        for _ in range(2 * budget + 8):  # bounded: dead ends waste a simulation
            self._simulate(root, tree)
            if len(tree) >= budget or root.exhausted:
                break
        return tree

    def update(self, step: StepResult) -> None:
        """Learn the verified tokens, then the target's top-1 at the rejected rows."""
        triples = self._rejected(step) if self.learn_from_logits else []
        if self._native is not None:  # one native call a step: a call costs more than the counting
            self._last_two = self._native.learn(list(step.emitted), *self._last_two, triples)
            return
        self._learn_sequence(step.emitted)
        for i in range(0, len(triples), 3):
            self.observe(*triples[i : i + 3])

    def end(self, output_ids: list[int]) -> None:
        return None

    # -- the n-gram model ------------------------------------------------------------------------
    def counts(self, a: int, b: int) -> Counts:
        """How often each token followed (a, b), or b alone when a < 0, in first-seen order."""
        if self._native is not None:
            tokens, counts = self._native.table(a, b)
            return dict(zip(tokens, counts))
        return dict(self.trigram.get((a, b), {}) if a >= 0 else self.bigram.get(b, {}))

    def observe(self, a: int, b: int, c: int, weight: int = 1) -> None:
        """c followed (a, b)."""
        if self._native is not None:
            self._native.observe(a, b, c, weight)
            return
        if a >= 0:
            ctx = self.trigram[(a, b)]
            ctx[c] = ctx.get(c, 0) + weight
        ctx = self.bigram[b]
        ctx[c] = ctx.get(c, 0) + weight

    def continuations(self, prev: int, token: int) -> list[tuple[int, float]]:
        """Up to top_m (next token, probability) after (prev, token): tri-gram, else bi-gram."""
        counts = self.trigram.get((prev, token)) or self.bigram.get(token)
        if not counts:
            return []
        total = sum(counts.values())
        best = sorted(counts.items(), key=lambda kv: -kv[1])[: self.top_m]
        return [(tok, n / total) for tok, n in best]

    def _learn_sequence(self, tokens: list[int]) -> None:
        if self._native is not None:
            self._last_two = self._native.learn(list(tokens), *self._last_two, [])
            return
        a, b = self._last_two
        for c in tokens:
            if b >= 0:
                self.observe(a, b, c)
            a, b = b, c
        self._last_two = (a, b)

    @staticmethod
    def _rejected(step: StepResult) -> list[int]:
        """(the row's parent token, the row's token, the target's top-1 there) for every tree row
        off the accepted path, flat: the target's prediction in that row's context."""
        accepted = set(step.accepted_rows)
        rejected = [row for row in range(1, len(step.tree) + 1) if row not in accepted]
        if not rejected:
            return []
        top1 = step.argmax()
        tokens = [step.root] + step.tree.tokens
        parents = step.tree.parents
        return [t for row in rejected for t in (tokens[parents[row - 1] + 1], tokens[row], top1[row])]

    # -- the search ----------------------------------------------------------------------------
    def _simulate(self, root: _SearchNode, tree: DraftTree) -> None:
        path, node, depth = [root], root, 0
        while True:
            if node.options is None:
                node.options = self.continuations(node.prev, node.token) if depth < self.max_depth else []
            choice = self._select(node)
            if choice is None:
                node.exhausted = True  # never walked into again
                value = 0.0  # and the Q of the path above drops, so the search goes elsewhere
                break
            token, prior = choice
            child = node.children.get(token)
            if child is None:
                index = tree.add(token, node.draft_index)
                child = _SearchNode(token, node.token, index, node.path_prob * prior)
                node.children[token] = child
                path.append(child)
                value = child.path_prob
                break
            path.append(child)
            node, depth = child, depth + 1
        for visited in path:
            visited.visits += 1
            visited.value_sum += value

    def _select(self, node: _SearchNode) -> tuple[int, float] | None:
        """PUCT: mean value plus a prior-weighted bonus that shrinks with the child's visits."""
        explore = self.c_puct * math.sqrt(node.visits + 1)
        best, best_score = None, -1.0
        for token, prior in node.options or ():
            child = node.children.get(token)
            if child is None:
                score = prior * explore
            elif child.exhausted:
                continue
            else:
                score = child.value_sum / child.visits + prior * explore / (1 + child.visits)
            if score > best_score:
                best, best_score = (token, prior), score
        return best
