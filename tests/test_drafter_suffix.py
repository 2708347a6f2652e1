"""SuffixDecoding: the suffix trie counts every substring exactly (checked against brute force),
drafts follow the most frequent continuations within the budget, the global trie remembers
earlier outputs within its cap, and the engine stays exactly AR with it."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from fastdecode import SamplingParams
from fastdecode.drafters.suffix import SuffixDrafter, SuffixTrie
from fastdecode.tree import DraftTree


def continuation_counts(documents: list[list[int]], max_depth: int) -> Counter:
    """Brute force: (substring, next token) -> how often that token followed that substring."""
    counts: Counter = Counter()
    for doc in documents:
        for start in range(len(doc)):
            for end in range(start, min(start + max_depth, len(doc))):
                counts[tuple(doc[start:end]), doc[end]] += 1
    return counts


@pytest.mark.parametrize("seed", range(20))
def test_trie_counts_equal_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    max_depth = rng.randint(2, 6)
    documents = [[rng.randint(0, 3) for _ in range(rng.randint(1, 40))] for _ in range(rng.randint(1, 3))]
    trie = SuffixTrie(max_depth)
    for doc in documents:
        trie.extend(doc)
        trie.close_document()
    counts = continuation_counts(documents, max_depth)
    totals: Counter = Counter()
    for (substring, _), n in counts.items():
        totals[substring] += n
    for (substring, token), n in counts.items():
        cursor = trie.find(list(substring))
        assert trie.has_continuation(cursor, len(substring))
        estimates = {t: p for t, _, p in trie.continuations(cursor)}
        assert estimates[token] == pytest.approx(n / totals[substring]), (substring, token)


def test_repeated_phrase_is_continued() -> None:
    drafter = SuffixDrafter(min_score=0.0)
    context = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    drafter.begin(context[:9])
    tree = drafter.propose(context, 6)
    assert tree.tokens == [4, 5, 6, 7, 8, 9] and tree.parents == [-1, 0, 1, 2, 3, 4]


def test_most_frequent_continuation_comes_first_within_budget() -> None:
    drafter = SuffixDrafter(min_score=0.0)
    context = [7, 8, 1, 2, 0, 7, 8, 3, 4, 5, 7, 8, 1, 2, 6, 7, 8]
    drafter.begin(context)
    for budget in (0, 1, 2, 5, 16):
        tree = drafter.propose(context, budget)
        assert len(tree) <= budget
        DraftTree(tree.tokens, tree.parents)
        if budget:
            assert (tree.tokens[0], tree.parents[0]) == (1, -1)  # "7 8" -> "1" twice, "3" once
    roots = [t for t, p in zip(tree.tokens, tree.parents) if p == -1]
    assert sorted(roots) == [1, 3]


def test_nothing_repeated_drafts_nothing() -> None:
    drafter = SuffixDrafter()
    drafter.begin([1, 2, 3])
    assert len(drafter.propose([1, 2, 3, 4], 8)) == 0


def test_global_trie_remembers_earlier_outputs() -> None:
    drafter = SuffixDrafter(min_score=0.0)
    drafter.begin([50, 51])
    drafter.end([10, 11, 12, 13, 14, 15])
    drafter.begin([60, 61])  # a new request: its own trie knows nothing of 10..15
    tree = drafter.propose([60, 61, 10, 11], 4)
    assert tree.tokens == [12, 13, 14, 15]


def test_global_trie_stays_within_its_cap() -> None:
    drafter = SuffixDrafter(global_max_tokens=100, prompt_tail=0)
    for i in range(30):
        drafter.begin([1])
        drafter.end([1000 + i] * 10)
    assert drafter.global_tokens <= 100
    assert sum(len(d) for d in drafter.documents) == drafter.global_tokens
    assert drafter.documents[-1] == [1029] * 10
    assert len(drafter.global_trie.seq) <= 100 + len(drafter.documents)


def test_greedy_generation_equals_ar_and_memory_raises_tau(tiny_llm) -> None:
    params = SamplingParams(max_tokens=32, temperature=0)
    for prompt in ["a b c d a b c d a b", "Hello there"]:
        ar = tiny_llm.generate(prompt, params, method="ar")[0]
        assert tiny_llm.generate(prompt, params, method="suffix")[0].token_ids == ar.token_ids, prompt
    prompt = "suffix memory test: 7 + 5 = ?"
    first = tiny_llm.generate(prompt, params, method="suffix")[0]
    again = tiny_llm.generate(prompt, params, method="suffix")[0]
    assert again.token_ids == first.token_ids == tiny_llm.generate(prompt, params, method="ar")[0].token_ids
    assert again.metrics.accepted_per_step > first.metrics.accepted_per_step
    assert again.metrics.accepted_per_step > 2.0
