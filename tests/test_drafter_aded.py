"""ADED: the tri-gram counts learn from prompt, verified tokens and rejected rows; the PUCT search
drafts what they learned within the budget; greedy output equals AR."""
from __future__ import annotations

import random

import pytest
import torch

from fastdecode.drafters.aded import Aded
from fastdecode.drafters.base import StepResult
from fastdecode.tree import DraftTree

PHRASE = [11, 12, 13, 14, 15, 16]


def test_counts_learn_a_repeated_phrase_and_draft_it() -> None:
    drafter = Aded()
    drafter.begin([1, 2] + PHRASE + [3, 4] + PHRASE + [5])
    tree = drafter.propose([7, 8, 11], 5)  # the phrase's first token is the root
    assert PHRASE[1:] in tree.paths()
    assert drafter.trigram[(11, 12)] == {13: 2}
    assert drafter.bigram[16] == {3: 1, 5: 1}


def test_verified_tokens_extend_the_counts_across_steps() -> None:
    drafter = Aded(learn_from_logits=False)
    drafter.begin([1, 2])
    drafter.update(StepResult(2, DraftTree(), torch.zeros(1, 30), [0], [3]))
    drafter.update(StepResult(3, DraftTree(), torch.zeros(1, 30), [0], [4, 5]))
    assert drafter.trigram[(1, 2)] == {3: 1}
    assert drafter.trigram[(2, 3)] == {4: 1}
    assert drafter.trigram[(3, 4)] == {5: 1}


def test_rejected_rows_teach_the_targets_top1() -> None:
    drafter = Aded()
    drafter.begin([1, 2])
    tree = DraftTree([3, 9], [-1, 0])  # root 2 -> 3 -> 9; the target says 2 -> 3 -> 4
    logits = torch.zeros(3, 30)
    logits[0, 3] = logits[1, 4] = logits[2, 17] = 5.0
    drafter.update(StepResult(2, tree, logits, [0, 1], [3, 4]))
    assert drafter.trigram[(3, 9)] == {17: 1}  # row 2 was rejected, its prediction is kept
    assert drafter.trigram[(2, 3)] == {4: 1}  # verified


def test_search_spreads_over_alternatives_when_the_budget_allows() -> None:
    drafter = Aded()
    drafter.begin([1, 2, 3, 1, 2, 3, 1, 2, 4])  # after (1, 2): 3 twice, 4 once
    deep = drafter.propose([1, 2], 2)
    assert deep.tokens[0] == 3  # the likelier continuation is taken first
    wide = drafter.propose([1, 2], 8)
    first_level = {t for t, p in zip(wide.tokens, wide.parents) if p == -1}
    assert first_level == {3, 4}


@pytest.mark.parametrize("budget", [0, 1, 3, 16, 40])
def test_budget_respected_and_tree_valid(budget: int) -> None:
    rng = random.Random(0)
    drafter = Aded()
    drafter.begin([rng.randrange(20) for _ in range(400)])
    tree = drafter.propose([5, 6], budget)
    assert len(tree) <= budget
    assert budget == 0 or len(tree) > 0
    DraftTree(tree.tokens, tree.parents)
    for kids in tree.children():
        assert len(kids) == len(set(kids))
    assert max(tree.depths()) <= drafter.max_depth


def test_unseen_context_drafts_nothing() -> None:
    drafter = Aded()
    drafter.begin([1, 2, 3])
    assert len(drafter.propose([40, 41], 16)) == 0


def test_counts_persist_across_requests() -> None:
    drafter = Aded()
    drafter.begin([1, 2] + PHRASE)
    drafter.end([])
    drafter.begin([9, 9])
    assert PHRASE[1:4] == drafter.propose([9, 11], 3).tokens
