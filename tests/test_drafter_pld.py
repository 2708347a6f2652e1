"""Prompt lookup decoding: drafts copy what followed earlier occurrences of the context's last
n-gram, merged into a tree within the budget, and the engine stays exactly AR with it."""
from __future__ import annotations

import pytest

from fastdecode import SamplingParams
from fastdecode.drafters.ngram import PromptLookupDrafter
from fastdecode.tree import DraftTree


def propose(context: list[int], budget: int = 16, **kwargs) -> DraftTree:
    drafter = PromptLookupDrafter(**kwargs)
    drafter.begin(context[:1])
    return drafter.propose(context, budget)


def test_repeated_phrase_is_continued() -> None:
    context = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    tree = propose(context, min_score=0.0)
    assert tree.paths()[0][:4] == [4, 5, 6, 7]
    assert tree.parents[:3] == [-1, 0, 1]


def test_no_earlier_occurrence_drafts_nothing() -> None:
    assert len(propose([1, 2, 3, 4, 5])) == 0


def test_several_matches_make_a_tree_with_shared_prefixes_merged() -> None:
    # "7 8" was followed by "1 2" twice and by "3 4" once
    context = [7, 8, 1, 2, 0, 7, 8, 3, 4, 5, 7, 8, 1, 2, 6, 7, 8]
    tree = propose(context, min_score=0.0)
    first_tokens = [t for t, p in zip(tree.tokens, tree.parents) if p == -1]
    assert sorted(first_tokens) == [1, 3]  # the two "1 2 ..." continuations share one node
    assert [1, 2] in [path[:2] for path in tree.paths()]
    assert [3, 4] in [path[:2] for path in tree.paths()]


@pytest.mark.parametrize("budget", [0, 1, 2, 3, 5, 16])
def test_budget_respected_and_most_agreed_nodes_kept(budget: int) -> None:
    context = [7, 8, 1, 2, 0, 7, 8, 3, 4, 5, 7, 8, 1, 2, 6, 7, 8]
    tree = propose(context, budget, min_score=0.0)
    assert len(tree) == min(budget, len(propose(context, 100, min_score=0.0)))
    DraftTree(tree.tokens, tree.parents)  # validates parents precede children
    if budget >= 1:
        assert tree.tokens[0] == 1 and tree.parents[0] == -1  # two of three matches agree on "1"


def test_min_score_prunes_unlikely_nodes() -> None:
    context = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 1, 2, 3]
    full = propose(context, 64, min_score=0.0)
    pruned = propose(context, 64, min_score=0.3)
    assert 0 < len(pruned) < len(full)
    assert pruned.tokens == full.tokens[: len(pruned)]


def test_incremental_index_matches_a_fresh_one() -> None:
    context = [5, 1, 2, 3, 9, 1, 2, 4, 1, 2, 3, 9, 1, 2]
    drafter = PromptLookupDrafter(min_score=0.0)
    drafter.begin(context[:3])
    for end in range(3, len(context) + 1):
        grown = drafter.propose(context[:end], 8)
        fresh = propose(context[:end], 8, min_score=0.0)
        assert (grown.tokens, grown.parents) == (fresh.tokens, fresh.parents)


def test_a_context_that_is_not_a_continuation_is_reindexed() -> None:
    drafter = PromptLookupDrafter(min_score=0.0)
    drafter.begin([1, 2, 3, 4])
    drafter.propose([1, 2, 3, 4, 1, 2], 8)
    tree = drafter.propose([9, 8, 7, 9, 8], 8)
    assert tree.tokens[0] == 7


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupDrafter(max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="max_matches"):
        PromptLookupDrafter(max_matches=0)


def test_greedy_generation_equals_ar(tiny_llm) -> None:
    params = SamplingParams(max_tokens=32, temperature=0)
    prompts = ["a b c d a b c d a b", "for i in range(3):\n    print(i)\n", "Hello there"]
    for prompt in prompts:
        ar = tiny_llm.generate(prompt, params, method="ar")[0]
        pld = tiny_llm.generate(prompt, params, method="pld")[0]
        assert pld.token_ids == ar.token_ids, prompt
