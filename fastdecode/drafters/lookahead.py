"""Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding"): Jacobi iterations over a window of guessed future tokens feed an n-gram
pool; n-grams from the pool that start with the root are the drafts.

Every step's tree has two branches hanging from the root:
- verification: the pool's (N-1)-token continuations of the root, merged into a trie;
- lookahead: the Jacobi window, W columns x (N-1) levels. Level 0 holds guesses for depths
  1..W-1 (column 0's level-0 token is the root itself); level l holds W guesses, column j at
  depth j + l. The target's top-1 at the top level of column j is a new guess for depth
  j + N - 1, and column j read bottom-up plus that guess is a fresh N-gram for the pool.
  Then the window moves one Jacobi step: the oldest level is dropped, the new guesses become
  the top level, and everything shifts one position left as the root advances.

How the window is laid out as a tree. Our forward gives each node its ancestors only, at
position base + depth. The lookahead window therefore becomes
    a trunk: the level-0 guesses as one chain from the root (depths 1..W-1), and
    a chain per column: levels 1..N-2 of column j hung under the trunk node at depth j
    (column 0 under the root), so level l of column j sits at depth j + l.
Level l of column j then sees the root, level 0 up to column j, and its own column below it:
exactly the attention pattern of the reference implementation's 2D mask (lade,
`j_make_causal_mask_multilevel`). Where it differs from the paper: there the lookahead and
verification branches are laid out side by side in one flat sequence with a hand-made mask and
explicit position ids; here both are plain subtrees of the draft tree, so a lookahead node
whose token happens to be the target's choice is accepted like any draft node (a free bonus),
and n-grams that share a prefix share nodes. Variants that hang every column straight from the
root with a position gap (llama.cpp's lookahead example) cannot be expressed with positions
= base + depth and are not what we do.

The window starts from random prompt tokens and fills one level per step (no n-grams until it
is full). The pool is keyed by first token, keeps the newest `pool_per_key` n-grams of each key
and persists across the requests of an LLM instance; the prompt's own n-grams seed it.
"""
from __future__ import annotations

import random
from collections import OrderedDict

from fastdecode.drafters.base import DraftRequest, StepResult
from fastdecode.tree import DraftTree

NGram = tuple[int, ...]


class Lookahead:
    """Drafter: verify pool n-grams that follow the root; grow the pool with a Jacobi window."""

    def __init__(self, ngram: int = 4, window: int | None = None, lookahead_share: float = 0.5,
                 pool_per_key: int = 8) -> None:
        if ngram < 2:
            raise ValueError(f"ngram={ngram} must be >= 2 (an n-gram is a key token plus n-1 drafts)")
        if not 0 <= lookahead_share <= 1:
            raise ValueError(f"lookahead_share={lookahead_share} must be in [0, 1]")
        self.ngram, self.fixed_window = ngram, window
        self.lookahead_share, self.pool_per_key = lookahead_share, pool_per_key
        self.pool: dict[int, OrderedDict[NGram, None]] = {}
        self.levels: list[list[int]] = []  # levels[0]: W-1 guesses, levels[l>0]: W guesses
        self.window = 0
        self._prompt: list[int] = []
        self._top_rows: list[int] = []  # input row of each column's top-level node, this step

    # -- Drafter protocol --------------------------------------------------------------------
    def begin(self, prompt_ids: list[int], request: DraftRequest | None = None) -> None:
        self.levels, self.window, self._top_rows = [], 0, []
        self._prompt = list(prompt_ids)
        n = self.ngram
        for i in range(len(prompt_ids) - n + 1):
            self.add_ngram(prompt_ids[i], tuple(prompt_ids[i + 1 : i + n]))

    def propose(self, context: list[int], budget: int) -> DraftTree:
        tree = DraftTree()
        self._top_rows = []
        if budget <= 0:
            return tree
        if not self.window:
            self._start_window(budget)
        window_fits = self._window_size() <= budget  # not near the end of the context
        self._add_candidates(tree, context[-1], budget - self._window_size() if window_fits else budget)
        if window_fits:
            self._add_window(tree)
        return tree

    def update(self, step: StepResult) -> None:
        if not self._top_rows:
            return
        guesses = step.logits[self._top_rows].argmax(dim=-1).tolist()  # [W]: depth j + levels
        if len(self.levels) < self.ngram - 1:
            self.levels.append(guesses)  # still filling the window
            return
        levels, w = self.levels, self.window
        for j in range(w):
            key = step.root if j == 0 else levels[0][j - 1]
            self.add_ngram(key, tuple(levels[l][j] for l in range(1, len(levels))) + (guesses[j],))
        self.levels = [levels[1][1:]] + levels[2:] + [guesses] if len(levels) > 1 else [guesses[1:]]

    def end(self, output_ids: list[int]) -> None:
        self.levels, self.window, self._top_rows = [], 0, []

    # -- the pool --------------------------------------------------------------------------------
    def add_ngram(self, key: int, continuation: NGram) -> None:
        """Remember that `continuation` (n-1 tokens) followed `key`; newest kept, oldest dropped."""
        bucket = self.pool.setdefault(key, OrderedDict())
        bucket[continuation] = None
        bucket.move_to_end(continuation)
        if len(bucket) > self.pool_per_key:
            bucket.popitem(last=False)

    def candidates(self, token: int) -> list[NGram]:
        """Pool n-grams that continue `token`, newest first."""
        bucket = self.pool.get(token)
        return list(reversed(bucket)) if bucket else []

    # -- the tree ----------------------------------------------------------------------------------
    def _start_window(self, budget: int) -> None:
        """Size the window for this request's budget; level 0 starts as random prompt tokens."""
        per_column = self.ngram - 1  # (W - 1) + W * (N - 2) = W * (N - 1) - 1 nodes when full
        share = int(budget * self.lookahead_share)
        self.window = self.fixed_window or max(1, (share + 1) // per_column)
        rng = random.Random(len(self._prompt))
        pool = self._prompt or [0]
        self.levels = [[rng.choice(pool) for _ in range(self.window - 1)]]

    def _window_size(self) -> int:
        return sum(len(level) for level in self.levels)

    def _add_candidates(self, tree: DraftTree, root: int, room: int) -> None:
        """The verification branch: newest n-grams first, shared prefixes merged, within `room`."""
        children: dict[tuple[int, int], int] = {}  # (parent index, token) -> node index
        for continuation in self.candidates(root):
            parent = -1
            for token in continuation:
                node = children.get((parent, token))
                if node is None:
                    if len(tree) >= room:
                        return
                    node = tree.add(token, parent)
                    children[(parent, token)] = node
                parent = node

    def _add_window(self, tree: DraftTree) -> None:
        """The lookahead branch: the level-0 trunk, then each column's higher levels under it."""
        trunk = [-1]  # draft index of column j's level-0 node (-1: the root)
        for token in self.levels[0]:
            trunk.append(tree.add(token, trunk[-1]))
        self._top_rows = []
        for j in range(self.window):
            node = trunk[j]
            for level in self.levels[1:]:
                node = tree.add(level[j], node)
            self._top_rows.append(node + 1)  # input row = draft index + 1 (the root is row 0)
