"""DraftTree: draft tokens and their parents -> the inputs of one verification forward.

Node indices are draft-local: node i has token `tokens[i]` and parent `parents[i]`, where a
parent of -1 is the *root*, the last emitted token whose K/V are not cached yet. The forward
runs `[root] + tokens`, so draft node i sits at input row i + 1.

Worked example: root r, drafts "a b" and "a c" share their first token:
    tokens  = [a, b, c]      parents = [-1, 0, 0]
    inputs  = [r, a, b, c]   depths  = [0, 1, 2, 2]   positions = base + depth
    mask (rows attend to columns, new part only):
        r: r            a: r a        b: r a b        c: r a . c
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.parents)} parents")
        for i, parent in enumerate(self.parents):
            if not -1 <= parent < i:
                raise ValueError(f"node {i} has parent {parent}; a parent must be -1 (root) or an earlier node")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int]) -> "DraftTree":
        """A single path: each token the child of the one before."""
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    def add(self, token: int, parent: int) -> int:
        """Append a node and return its index."""
        self.tokens.append(token)
        self.parents.append(parent)
        return len(self.tokens) - 1

    def depths(self) -> list[int]:
        """Depth of every input row (root = 0)."""
        depth = [0]
        for parent in self.parents:
            depth.append(depth[parent + 1] + 1)
        return depth

    def children(self) -> list[dict[int, int]]:
        """For every input row, {token: input row of the child carrying it} (first child wins)."""
        kids: list[dict[int, int]] = [{} for _ in range(len(self.tokens) + 1)]
        for i, (token, parent) in enumerate(zip(self.tokens, self.parents)):
            kids[parent + 1].setdefault(token, i + 1)
        return kids

    def ancestor_rows(self) -> list[list[bool]]:
        """Row i of the ancestor mask as a list: row i may attend to row j iff j is i or an
        ancestor of i. Lists: each row is its parent's copied, ~2x cheaper than numpy rows after a
        forward has pushed numpy's code out of the caches."""
        n = len(self.tokens) + 1
        rows = [[True] + [False] * (n - 1)]
        for i, parent in enumerate(self.parents, start=1):
            row = rows[parent + 1][:]
            row[i] = True
            rows.append(row)
        return rows

    def ancestor_mask(self) -> torch.Tensor:
        """`[n+1, n+1]` bool: input row i may attend to row j iff j is i or an ancestor of i."""
        return torch.tensor(self.ancestor_rows(), dtype=torch.bool)

    def paths(self) -> list[list[int]]:
        """Root-to-leaf token paths (root excluded)."""
        has_child = set(self.parents)
        out = []
        for leaf in range(len(self.tokens)):
            if leaf in has_child:
                continue
            path, node = [], leaf
            while node != -1:
                path.append(self.tokens[node])
                node = self.parents[node]
            out.append(path[::-1])
        return out
