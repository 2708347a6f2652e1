"""SuffixDecoding (Oliaro et al. 2024): draft from suffix tries of this request and of earlier outputs.

Two tries of bounded depth count every substring (up to `max_depth` tokens) they have seen:
one over this request's prompt + output, rebuilt per request and extended as tokens arrive,
and a global one over this LLM instance's earlier outputs (each with the tail of its prompt,
so the first output tokens after a chat template's "assistant" turn are predictable too).
At propose time each trie matches the longest suffix of the context (at most `max_pattern`
tokens) that occurred before with something after it, then grows a draft tree best-first by
score, an estimate of the chance that the target accepts a node: the product along its path of

    match_confidence(L + depth of the parent) * count(child) / count(continuations of the parent)

where L is the matched length (a longer match predicts better, and every accepted token makes
the match one longer; see ngram.MATCH_CONFIDENCE) and the count ratio is the empirical
probability of the child. The tree with the larger expected accepted length (sum of scores) wins.

Compactness, as in a suffix tree: a substring seen once is not stored as a chain of nodes but
as a *leaf*, the position of its last token in the trie's token sequence; the chain below a leaf
is read from that sequence. Only substrings seen twice or more get a node, so a trie costs
O(repeated substrings), and appending a token touches only the nodes of the context's repeated
suffixes. The global trie keeps at most `global_max_tokens` tokens: when full, the oldest
documents are dropped and the trie is rebuilt from the rest.

A third, read-only trie may come from a corpus file (`load_datastore`; `LLM(datastore=...)`),
as REST (He et al. 2024) drafts from a datastore: built once per LLM and shared by every drafter,
so text the model tends to write is predictable from the first request on.
"""
from __future__ import annotations

import gc
import heapq
import json
from collections import deque
from collections.abc import Callable
from pathlib import Path

from fastdecode.drafters.base import DraftRequest, StepResult
from fastdecode.drafters.ngram import match_confidence
from fastdecode.tree import DraftTree

SEPARATOR = -1  # ends a document in a trie's token sequence; leaf chains stop there
MAX_PATTERN = 24  # longest context suffix matched
MAX_DRAFT_DEPTH = 16  # deepest draft node
PROMPT_TAIL = 8  # prompt tokens kept before an output in the global trie (and a corpus answer in a datastore)


class _Node:
    """A substring seen at least twice: `count` occurrences, `total` of them followed by a token."""

    __slots__ = ("count", "total", "children")

    def __init__(self, count: int) -> None:
        self.count = count
        self.total = 0
        self.children: dict[int, _Node | int] = {}  # token -> node, or leaf (position in seq)


Cursor = _Node | int  # a place in a trie: a node, or a position in seq inside a leaf chain


class SuffixTrie:
    """All substrings of at most `max_depth` tokens of the documents appended, with counts."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root = _Node(0)
        self.seq: list[int] = []
        self.active: list[_Node] = [self.root]  # nodes of the open document's suffixes, by length

    def append(self, token: int) -> None:
        """Extend the open document by one token."""
        seq, pos = self.seq, len(self.seq)
        seq.append(token)
        next_active = [self.root]
        for depth, node in enumerate(self.active[: self.max_depth]):
            node.total += 1
            child = node.children.get(token)
            if child is None:
                node.children[token] = pos
            elif isinstance(child, int):  # seen once before, at `child`: now it needs a node
                promoted = _Node(2)
                after = child + 1  # the token that followed that earlier occurrence
                if seq[after] != SEPARATOR and depth + 2 <= self.max_depth:
                    promoted.children[seq[after]] = after
                    promoted.total = 1
                node.children[token] = promoted
                next_active.append(promoted)
            else:
                child.count += 1
                next_active.append(child)
        self.active = next_active

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.append(token)

    def close_document(self) -> None:
        """End the open document: no substring spans two documents."""
        self.seq.append(SEPARATOR)
        self.active = [self.root]

    def find(self, pattern: list[int]) -> Cursor | None:
        """Where `pattern` ends in the trie, or None if it never occurred."""
        node: _Node = self.root
        for i, token in enumerate(pattern):
            child = node.children.get(token)
            if child is None:
                return None
            if isinstance(child, int):
                return self._follow_leaf(child, pattern[i + 1 :])
            node = child
        return node

    def _follow_leaf(self, pos: int, rest: list[int]) -> int | None:
        seq = self.seq
        end = pos + 1 + len(rest)
        return end - 1 if end <= len(seq) and seq[pos + 1 : end] == rest else None

    def has_continuation(self, cursor: Cursor | None, depth: int) -> bool:
        if cursor is None or depth >= self.max_depth:
            return False
        if isinstance(cursor, _Node):
            return cursor.total > 0
        return cursor + 1 < len(self.seq) and self.seq[cursor + 1] != SEPARATOR

    def longest_match(self, context: list[int], max_pattern: int) -> tuple[Cursor, int] | None:
        """The longest non-empty suffix of `context` (<= max_pattern tokens) seen with a
        continuation, as (cursor, length); None if not even the last token was.

        If a suffix has a continuation, so has every shorter one, so binary search suffices.
        """
        low, high, best = 0, min(max_pattern, len(context), self.max_depth - 1), None
        while low < high:
            mid = (low + high + 1) // 2
            cursor = self.find(context[len(context) - mid :])
            if self.has_continuation(cursor, mid):
                low, best = mid, (cursor, mid)
            else:
                high = mid - 1
        return best  # type: ignore[return-value]

    def continuations(self, cursor: Cursor) -> list[tuple[int, Cursor, float]]:
        """(token, cursor after it, empirical probability) for what followed `cursor`."""
        if isinstance(cursor, _Node):
            total = cursor.total
            return [
                (token, child, (child.count if isinstance(child, _Node) else 1) / total)
                for token, child in cursor.children.items()
            ]
        after = cursor + 1
        if after < len(self.seq) and self.seq[after] != SEPARATOR:
            return [(self.seq[after], after, 1.0)]
        return []


class SuffixDrafter:
    def __init__(
        self,
        max_pattern: int = MAX_PATTERN,
        max_draft_depth: int = MAX_DRAFT_DEPTH,
        min_score: float = 0.3,
        global_max_tokens: int = 100_000,
        prompt_tail: int = PROMPT_TAIL,
        datastore: SuffixTrie | None = None,
    ) -> None:
        if max_pattern < 1 or max_draft_depth < 1:
            raise ValueError(f"max_pattern={max_pattern} and max_draft_depth={max_draft_depth} must be >= 1")
        self.max_pattern, self.max_draft_depth = max_pattern, max_draft_depth
        self.min_score = min_score
        self.global_max_tokens, self.prompt_tail = global_max_tokens, prompt_tail
        self.max_depth = max_pattern + max_draft_depth
        self.request = SuffixTrie(self.max_depth)
        self.global_trie = SuffixTrie(self.max_depth)
        self.documents: deque[list[int]] = deque()  # what the global trie holds, oldest first
        self.global_tokens = 0
        self.prompt: list[int] = []
        self.datastore = datastore  # read-only, maybe shared with other drafters

    def begin(self, prompt_ids: list[int], request: DraftRequest | None = None) -> None:
        self.prompt = list(prompt_ids)
        self.request = SuffixTrie(self.max_depth)
        self.request.extend(self.prompt)

    def propose(self, context: list[int], budget: int) -> DraftTree:
        self._sync(context)
        best, best_score = DraftTree(), 0.0
        if budget <= 0:
            return best
        for trie in (self.request, self.global_trie, self.datastore):
            if trie is None:
                continue
            match = trie.longest_match(context, self.max_pattern)
            if match is None:
                continue
            tree, score = self._grow(trie, *match, budget)
            if score > best_score:
                best, best_score = tree, score
        return best

    def update(self, step: StepResult) -> None:
        return None  # the context handed to propose() carries everything learned

    def end(self, output_ids: list[int]) -> None:
        tail = self.prompt[len(self.prompt) - self.prompt_tail :] if self.prompt_tail else []
        self.remember(tail + list(output_ids))
        self.request = SuffixTrie(self.max_depth)

    def remember(self, document: list[int]) -> None:
        """Add a document to the global trie, dropping the oldest ones beyond global_max_tokens."""
        if not document or len(document) > self.global_max_tokens:
            return
        self.documents.append(document)
        self.global_tokens += len(document)
        if self.global_tokens <= self.global_max_tokens:
            self.global_trie.extend(document)
            self.global_trie.close_document()
            return
        while self.global_tokens > self.global_max_tokens * 3 // 4:  # slack: rebuild rarely
            self.global_tokens -= len(self.documents.popleft())
        self.global_trie = SuffixTrie(self.max_depth)
        for kept in self.documents:
            self.global_trie.extend(kept)
            self.global_trie.close_document()

    def _sync(self, context: list[int]) -> None:
        """Append the context tokens the request trie has not seen; rebuild if it diverged."""
        seq = self.request.seq
        if len(seq) > len(context) or (seq and context[len(seq) - 1] != seq[-1]):
            self.request = SuffixTrie(self.max_depth)
            seq = self.request.seq
        self.request.extend(context[len(seq) :])

    def _grow(self, trie: SuffixTrie, cursor: Cursor, match_len: int, budget: int) -> tuple[DraftTree, float]:
        """Best-first expansion from the match: the `budget` highest-scoring nodes (score >= min_score).

        A child enters the frontier only once its parent is in the tree, so parents precede
        children; scores fall from parent to child (every confidence is < 1).
        """
        tree, total, tiebreak = DraftTree(), 0.0, 0
        # (-score, tiebreak, token, cursor after the token, draft depth, parent row)
        frontier: list[tuple[float, int, int, Cursor, int, int]] = []

        def push_children(cursor: Cursor, depth: int, row: int, score: float) -> None:
            nonlocal tiebreak
            if depth >= self.max_draft_depth or not trie.has_continuation(cursor, match_len + depth):
                return
            score *= match_confidence(match_len + depth)
            for token, child, probability in trie.continuations(cursor):
                child_score = score * probability
                if child_score >= self.min_score:
                    tiebreak += 1
                    heapq.heappush(frontier, (-child_score, tiebreak, token, child, depth + 1, row))

        push_children(cursor, 0, -1, 1.0)
        while frontier and len(tree) < budget:
            neg_score, _, token, child, depth, parent_row = heapq.heappop(frontier)
            row = tree.add(token, parent_row)
            total -= neg_score
            push_children(child, depth, row, -neg_score)
        return tree, total


def load_datastore(path: str | Path, encode: Callable[[str], list[int]], vocab_size: int) -> SuffixTrie:
    """A trie over the documents of a corpus file, for SuffixDrafter(datastore=...).

    `.jsonl`: one document a line, {"text": "..."} (encoded with `encode`) or {"ids": [token ids]};
    with "start" (the answer's first index, as in `fastdecode train-head --corpus` files) only the
    answer and the PROMPT_TAIL tokens before it are kept, as the global trie keeps an output.
    Any other file: UTF-8 text, one document per block of lines between blank lines.

    A trie of a large corpus is millions of Python objects (6.4 M for 1.14 M tokens), and each
    full pass of the cyclic garbage collector walks them all (1.4 s each). So the trie is built
    with the collector paused (10.3 -> 3.5 s for that corpus), and then, being read-only, moved
    with everything else alive to the collector's permanent generation (`gc.freeze()`, as vLLM's
    engine does with its start-up heap). Garbage cycles from before are collected first.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"datastore {path} not found (a .jsonl corpus, or a text file)")
    trie = SuffixTrie(MAX_PATTERN + MAX_DRAFT_DEPTH)
    documents = 0
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for n, ids in enumerate(_documents(path, encode), 1):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"datastore {path} document {n}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
            if ids:
                trie.extend(ids)
                trie.close_document()
                documents += 1
    finally:
        if was_enabled:
            gc.enable()
    if not documents:
        raise ValueError(f"datastore {path} holds no documents")
    gc.freeze()
    return trie


def _documents(path: Path, encode: Callable[[str], list[int]]):
    if path.suffix != ".jsonl":
        block: list[str] = []
        with open(path, encoding="utf-8") as f:
            for line in list(f) + [""]:
                if line.strip():
                    block.append(line)
                elif block:
                    yield encode("".join(block).rstrip("\n"))
                    block = []
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if "text" in row:
                    yield encode(str(row["text"]))
                    continue
                ids = [int(t) for t in row["ids"]]
                start = int(row.get("start", PROMPT_TAIL))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"datastore {path} line {n}: want {{\"text\": \"...\"}} or {{\"ids\": [token ids], "
                                 f"\"start\": answer start (optional)}} ({exc!r})") from exc
            yield ids[max(start - PROMPT_TAIL, 0) :]
