"""Prompt lookup decoding (PLD): draft by copying what followed earlier occurrences of the
context's last n-gram (Saxena 2023, "Prompt Lookup Decoding"; the input-guided copying of
Aggressive Decoding, Ge et al. 2022).

An incremental index maps every n-gram (min_ngram <= n <= max_ngram) of prompt + output to the
positions right after its occurrences, so a step costs O(new tokens), never a rescan of the
context. At propose time the longest suffix n-gram that occurred before is looked up, and the
continuations of several distinct occurrences (most recent first, longer n-grams before shorter
ones) are merged into a trie. Each trie node gets a score, an estimate of the chance that the
target accepts it: every match m (found with an n_m-gram) is taken as the right source with a
share proportional to confidence(n_m), and a source copied right to depth d with chance
confidence(n_m) ** d, so

    score(node) = sum over matches m through node of share(m) * confidence(n_m) ** depth(node)

It falls strictly along every path, so the `budget` best nodes always form a valid tree (every
parent outranks its children): a small budget keeps the most agreed-on, shallowest tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastdecode.drafters.base import StepResult
from fastdecode.tree import DraftTree

# Per-token chance that a copied continuation is what the target says, by the length of the
# matched n-gram; measured on SmolLM2-135M chat answers (Spec-Bench prompts, greedy).
DEFAULT_CONFIDENCE = {1: 0.35, 2: 0.55, 3: 0.65, 4: 0.7}


@dataclass
class _TrieNode:
    token: int
    parent: int  # trie-node index; -1 = root
    score: float = 0.0  # estimated chance that the target accepts this node
    children: dict[int, int] = field(default_factory=dict)


class PromptLookupDrafter:
    def __init__(
        self,
        max_ngram: int = 4,
        min_ngram: int = 1,
        max_matches: int = 8,
        max_continuation: int = 10,
        min_score: float = 0.15,
        confidence: dict[int, float] | None = None,
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        if max_matches < 1 or max_continuation < 1:
            raise ValueError(f"max_matches={max_matches} and max_continuation={max_continuation} must be >= 1")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_matches, self.max_continuation = max_matches, max_continuation
        self.min_score = min_score
        self.confidence = {**DEFAULT_CONFIDENCE, **(confidence or {})}
        for n in range(min_ngram, max_ngram + 1):
            self.confidence.setdefault(n, max(self.confidence.values()))
        bad = {n: c for n, c in self.confidence.items() if not 0 < c < 1}
        if bad:  # scores must fall strictly from parent to child for the top-k pruning
            raise ValueError(f"confidence values must be in (0, 1); got {bad}")
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions right after it

    def begin(self, prompt_ids: list[int]) -> None:
        self.tokens, self.index = [], {}
        self._extend(prompt_ids)

    def propose(self, context: list[int], budget: int) -> DraftTree:
        self._sync(context)
        if budget <= 0:
            return DraftTree()
        matches = self._matches()
        if not matches:
            return DraftTree()
        return self._best_nodes(self._trie(matches), budget)

    def update(self, step: StepResult) -> None:
        return None  # the context handed to propose() carries everything learned

    def end(self, output_ids: list[int]) -> None:
        self.tokens, self.index = [], {}

    def _sync(self, context: list[int]) -> None:
        """Index the tokens of `context` not seen yet; start over if it is not a continuation."""
        seen = len(self.tokens)
        if seen > len(context) or (seen and context[seen - 1] != self.tokens[-1]):
            self.tokens, self.index, seen = [], {}, 0
        self._extend(context[seen:])

    def _extend(self, new_tokens: list[int]) -> None:
        tokens, index = self.tokens, self.index
        for token in new_tokens:
            tokens.append(token)
            end = len(tokens)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                index.setdefault(tuple(tokens[end - n :]), []).append(end)

    def _matches(self) -> list[tuple[int, int]]:
        """(continuation start, n-gram length) of up to max_matches earlier occurrences of the
        context's suffix n-grams: longest n first, most recent first, distinct starts."""
        tokens, end = self.tokens, len(self.tokens)
        found: list[tuple[int, int]] = []
        starts: set[int] = set()
        for n in range(min(self.max_ngram, end), self.min_ngram - 1, -1):
            positions = self.index.get(tuple(tokens[end - n :]), ())
            for start in reversed(positions):
                if start < end and start not in starts:  # the suffix itself has no continuation
                    starts.add(start)
                    found.append((start, n))
                    if len(found) == self.max_matches:
                        return found
        return found

    def _trie(self, matches: list[tuple[int, int]]) -> list[_TrieNode]:
        """Merge the matches' continuations into a trie and score its nodes."""
        tokens, nodes = self.tokens, []
        root_children: dict[int, int] = {}
        total = sum(self.confidence[n] for _, n in matches)
        for start, n in matches:
            conf = self.confidence[n]
            share, children, parent = conf / total, root_children, -1
            for depth, token in enumerate(tokens[start : start + self.max_continuation], start=1):
                node = children.get(token)
                if node is None:
                    node = len(nodes)
                    children[token] = node
                    nodes.append(_TrieNode(token, parent))
                nodes[node].score += share * conf**depth
                children, parent = nodes[node].children, node
        return nodes

    def _best_nodes(self, nodes: list[_TrieNode], budget: int) -> DraftTree:
        """The `budget` highest-scoring trie nodes, as a DraftTree with parents first.

        Scores fall strictly from parent to child, so any top-k by score is closed under parents,
        and sorting the kept nodes by creation order (parents are created first) is a valid order.
        """
        ranked = sorted(range(len(nodes)), key=lambda i: -nodes[i].score)
        keep = sorted(i for i in ranked[:budget] if nodes[i].score >= self.min_score)
        tree, row_of = DraftTree(), {-1: -1}
        for i in keep:
            row_of[i] = tree.add(nodes[i].token, row_of[nodes[i].parent])
        return tree
