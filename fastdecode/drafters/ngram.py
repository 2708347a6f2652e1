"""Prompt lookup decoding (PLD): draft by copying what followed earlier occurrences of the
context's last n-gram (Saxena 2023, "Prompt Lookup Decoding"; the input-guided copying of
Aggressive Decoding, Ge et al. 2022).

An incremental index maps every n-gram (min_ngram <= n <= max_ngram) of prompt + output to the
positions right after its occurrences, so a step costs O(new tokens), never a rescan of the
context. At propose time the longest suffix n-gram that occurred before is looked up, and the
continuations of several distinct occurrences (most recent first, longer n-grams before shorter
ones) are merged into a trie. Each trie node gets a score, an estimate of the chance that the
target accepts it. A match's real length L (how far back it agrees with the context, which may
exceed max_ngram) sets the chance match_confidence(L) that its next token is right; once that
token is accepted the match is one longer, so a node at depth d along a match is right with
chance c(L) c(L+1) ... c(L+d-1). Matches share the root in proportion to c(L), so

    score(node) = sum over matches m through node of share(m) * prod_{j<depth} c(L_m + j)

It falls strictly along every path, so the `budget` best nodes always form a valid tree (every
parent outranks its children): a small budget keeps the most agreed-on, shallowest tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fastdecode.drafters.base import DraftRequest, StepResult
from fastdecode.tree import DraftTree

# Chance that the target's next token is the one that followed an earlier occurrence of the
# context's last L tokens, by L (index L; the last value holds for longer matches). Measured on
# SmolLM2-135M greedy chat answers to Spec-Bench prompts: L = 1: 0.18, 2: 0.38, 3: 0.6, 4: 0.75,
# 8-15: 0.87, 16+: 0.93. Also used by the suffix drafter.
MATCH_CONFIDENCE = (0.0, 0.2, 0.4, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)


def match_confidence(match_len: int) -> float:
    return MATCH_CONFIDENCE[min(match_len, len(MATCH_CONFIDENCE) - 1)]


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
        min_score: float = 0.3,
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        if max_matches < 1 or max_continuation < 1:
            raise ValueError(f"max_matches={max_matches} and max_continuation={max_continuation} must be >= 1")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_matches, self.max_continuation = max_matches, max_continuation
        self.min_score = min_score
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions right after it

    def begin(self, prompt_ids: list[int], request: DraftRequest | None = None) -> None:
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
        """(continuation start, match length) of up to max_matches earlier occurrences of the
        context's suffix n-grams: longest n first, most recent first, distinct starts."""
        tokens, end = self.tokens, len(self.tokens)
        found: list[tuple[int, int]] = []
        starts: set[int] = set()
        for n in range(min(self.max_ngram, end), self.min_ngram - 1, -1):
            positions = self.index.get(tuple(tokens[end - n :]), ())
            for start in reversed(positions):
                if start < end and start not in starts:  # the suffix itself has no continuation
                    starts.add(start)
                    found.append((start, self._match_length(start, n)))
                    if len(found) == self.max_matches:
                        return found
        return found

    def _match_length(self, start: int, known: int) -> int:
        """How many tokens before `start` agree with the end of the context (`known` are known
        to), counted as far as match_confidence tells lengths apart."""
        tokens, end, longest = self.tokens, len(self.tokens), min(start, len(MATCH_CONFIDENCE) - 1)
        length = known
        while length < longest and tokens[start - 1 - length] == tokens[end - 1 - length]:
            length += 1
        return length

    def _trie(self, matches: list[tuple[int, int]]) -> list[_TrieNode]:
        """Merge the matches' continuations into a trie and score its nodes."""
        tokens, nodes = self.tokens, []
        root_children: dict[int, int] = {}
        total = sum(match_confidence(length) for _, length in matches)
        for start, length in matches:
            score, children, parent = match_confidence(length) / total, root_children, -1
            for depth, token in enumerate(tokens[start : start + self.max_continuation]):
                score *= match_confidence(length + depth)
                node = children.get(token)
                if node is None:
                    node = len(nodes)
                    children[token] = node
                    nodes.append(_TrieNode(token, parent))
                nodes[node].score += score
                children, parent = nodes[node].children, node
        return nodes

    def _best_nodes(self, nodes: list[_TrieNode], budget: int) -> DraftTree:
        """The `budget` highest-scoring trie nodes (score >= min_score), parents first.

        Scores fall strictly from parent to child (every confidence is < 1), so any top-k by
        score is closed under parents, and trie order (parents are created first) is valid.
        """
        ranked = sorted(range(len(nodes)), key=lambda i: -nodes[i].score)
        keep = sorted(i for i in ranked[:budget] if nodes[i].score >= self.min_score)
        tree, row_of = DraftTree(), {-1: -1}
        for i in keep:
            row_of[i] = tree.add(nodes[i].token, row_of[nodes[i].parent])
        return tree
