"""ADED: the tri-gram counts learn from prompt, verified tokens and rejected rows; the PUCT search
drafts what they learned within the budget; the native counts and search (csrc/aded.cpp) give the
Python code's trees; greedy output equals AR. Every behaviour test runs on both."""
from __future__ import annotations

import random

import pytest
import torch

from fastdecode import kernels
from fastdecode.drafters.aded import Aded
from fastdecode.drafters.base import StepResult
from fastdecode.tree import DraftTree

PHRASE = [11, 12, 13, 14, 15, 16]


@pytest.fixture(params=[False, True], ids=["python", "native"])
def native(request) -> bool:
    """Both implementations; this CPU has AVX2+FMA, so the kernels must build (test_kernels.py)."""
    assert kernels.bf16_linear_available(), "the kernels failed to build"
    return request.param


def test_counts_learn_a_repeated_phrase_and_draft_it(native: bool) -> None:
    drafter = Aded(native=native)
    drafter.begin([1, 2] + PHRASE + [3, 4] + PHRASE + [5])
    tree = drafter.propose([7, 8, 11], 5)  # the phrase's first token is the root
    assert PHRASE[1:] in tree.paths()
    assert drafter.counts(11, 12) == {13: 2}
    assert drafter.counts(-1, 16) == {3: 1, 5: 1}


def test_verified_tokens_extend_the_counts_across_steps(native: bool) -> None:
    drafter = Aded(learn_from_logits=False, native=native)
    drafter.begin([1, 2])
    drafter.update(StepResult(2, DraftTree(), torch.zeros(1, 30), [0], [3]))
    drafter.update(StepResult(3, DraftTree(), torch.zeros(1, 30), [0], [4, 5]))
    assert drafter.counts(1, 2) == {3: 1}
    assert drafter.counts(2, 3) == {4: 1}
    assert drafter.counts(3, 4) == {5: 1}


def test_rejected_rows_teach_the_targets_top1(native: bool) -> None:
    drafter = Aded(native=native)
    drafter.begin([1, 2])
    tree = DraftTree([3, 9], [-1, 0])  # root 2 -> 3 -> 9; the target says 2 -> 3 -> 4
    logits = torch.zeros(3, 30)
    logits[0, 3] = logits[1, 4] = logits[2, 17] = 5.0
    drafter.update(StepResult(2, tree, logits, [0, 1], [3, 4]))
    assert drafter.counts(3, 9) == {17: 1}  # row 2 was rejected, its prediction is kept
    assert drafter.counts(2, 3) == {4: 1}  # verified


def test_search_spreads_over_alternatives_when_the_budget_allows(native: bool) -> None:
    drafter = Aded(native=native)
    drafter.begin([1, 2, 3, 1, 2, 3, 1, 2, 4])  # after (1, 2): 3 twice, 4 once
    deep = drafter.propose([1, 2], 2)
    assert deep.tokens[0] == 3  # the likelier continuation is taken first
    wide = drafter.propose([1, 2], 8)
    first_level = {t for t, p in zip(wide.tokens, wide.parents) if p == -1}
    assert first_level == {3, 4}


@pytest.mark.parametrize("budget", [0, 1, 3, 16, 40])
def test_budget_respected_and_tree_valid(budget: int, native: bool) -> None:
    rng = random.Random(0)
    drafter = Aded(native=native)
    drafter.begin([rng.randrange(20) for _ in range(400)])
    tree = drafter.propose([5, 6], budget)
    assert len(tree) <= budget
    assert budget == 0 or len(tree) > 0
    DraftTree(tree.tokens, tree.parents)
    for kids in tree.children():
        assert len(kids) == len(set(kids))
    assert max(tree.depths()) <= drafter.max_depth


def test_unseen_context_drafts_nothing(native: bool) -> None:
    drafter = Aded(native=native)
    drafter.begin([1, 2, 3])
    assert len(drafter.propose([40, 41], 16)) == 0


def test_counts_persist_across_requests(native: bool) -> None:
    drafter = Aded(native=native)
    drafter.begin([1, 2] + PHRASE)
    drafter.end([])
    drafter.begin([9, 9])
    assert PHRASE[1:4] == drafter.propose([9, 11], 3).tokens


@pytest.mark.parametrize("seed", range(4))
def test_native_search_and_counts_equal_the_python_code(seed: int) -> None:
    """Random text with repeats (a small vocabulary, copied spans), learned by prompt, verified
    tokens and rejected rows; after every update both implementations hold the same counts and
    propose the same tree, for budgets from 0 to 40 and settings other than the defaults."""
    rng = random.Random(seed)
    settings = [{}, {"top_m": 2, "c_puct": 0.5, "max_depth": 3}, {"top_m": 7, "c_puct": 2.5, "max_depth": 12}][seed % 3]
    python, native = Aded(native=False, **settings), Aded(native=True, **settings)
    text = [rng.randrange(12) for _ in range(40)]
    for _ in range(30):  # copies of earlier spans, as real text repeats itself
        start = rng.randrange(len(text) - 5)
        text += text[start : start + rng.randrange(2, 6)] + [rng.randrange(12)]
    for d in (python, native):
        d.begin(text[:60])
    context, drafted = text[:60], 0
    for step in range(60):
        budget = rng.choice([0, 1, 2, 5, 12, 24, 40])
        trees = [d.propose(context, budget) for d in (python, native)]
        assert (trees[0].tokens, trees[0].parents) == (trees[1].tokens, trees[1].parents), f"step {step}"
        tree = trees[0]
        drafted += len(tree)
        emitted = [rng.randrange(12) for _ in range(rng.randrange(1, 4))]
        logits = torch.randn(len(tree) + 1, 12, generator=torch.Generator().manual_seed(seed * 1000 + step))
        accepted = [0] + [i + 1 for i in range(min(len(tree), len(emitted) - 1)) if tree.parents[i] == i - 1][:1]
        for d in (python, native):
            d.update(StepResult(context[-1], tree, logits, accepted, emitted))
        context = context + emitted
        for a, b in {(context[-3], context[-2]), (-1, context[-1]), (tree.tokens[0] if tree.tokens else 0, 1)}:
            assert python.counts(a, b) == native.counts(a, b)
    assert drafted > 300  # the trees compared were not empty
