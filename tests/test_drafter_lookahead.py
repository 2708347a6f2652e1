"""Lookahead: the window is laid out as trunk + column chains at the right depths, its logits
fill the window and then feed the n-gram pool, pool n-grams after the root are drafted, and
greedy output equals AR."""
from __future__ import annotations

import pytest
import torch

from fastdecode import SamplingParams
from fastdecode.drafters.base import StepResult
from fastdecode.drafters.lookahead import Lookahead
from fastdecode.tree import DraftTree

VOCAB = 60


def top1_logits(tokens: list[int]) -> torch.Tensor:
    logits = torch.zeros(len(tokens), VOCAB)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


def full_window_drafter() -> Lookahead:
    """N = 3, W = 3, window already full: level 0 = [a1, a2], level 1 = [b0, b1, b2]."""
    drafter = Lookahead(ngram=3, window=3)
    drafter.begin([50, 51])
    drafter.pool.clear()
    drafter.window = 3
    drafter.levels = [[21, 22], [30, 31, 32]]
    return drafter


def test_window_is_a_trunk_with_column_chains_at_the_right_depths() -> None:
    drafter = full_window_drafter()
    tree = drafter.propose([1, 2], 16)  # empty pool: the tree is the window alone
    assert tree.tokens == [21, 22, 30, 31, 32]
    assert tree.parents == [-1, 0, -1, 0, 1]  # column j's level 1 hangs under level-0 column j
    depths = tree.depths()[1:]
    assert depths == [1, 2, 1, 2, 3]  # level l of column j at depth j + l
    assert drafter._top_rows == [3, 4, 5]


def test_full_window_adds_ngrams_and_moves_one_jacobi_step() -> None:
    drafter = full_window_drafter()
    tree = drafter.propose([1, 2], 16)
    guesses = [40, 41, 42]  # the target's top-1 at each column's top node
    logits = top1_logits([0, 0, 0] + guesses)
    drafter.update(StepResult(2, tree, logits, [0], [7]))
    # column j read bottom-up plus its new guess: key = level-0 token (the root for column 0)
    assert drafter.candidates(2) == [(30, 40)]
    assert drafter.candidates(21) == [(31, 41)]
    assert drafter.candidates(22) == [(32, 42)]
    assert drafter.levels == [[31, 32], [40, 41, 42]]  # oldest level dropped, shifted one left


def test_window_fills_one_level_per_step_before_collecting() -> None:
    drafter = Lookahead(ngram=4, window=3)
    drafter.begin([50, 51, 52])
    drafter.pool.clear()
    tree = drafter.propose([50, 51, 52], 16)
    assert len(drafter.levels) == 1 and len(tree) == 2  # level 0: W - 1 random prompt tokens
    drafter.update(StepResult(52, tree, top1_logits([10, 11, 12]), [0], [10]))
    assert drafter.levels[1] == [10, 11, 12] and not drafter.pool
    tree = drafter.propose([50, 51, 52, 10], 16)
    assert len(tree) == 2 + 3
    drafter.update(StepResult(10, tree, top1_logits([0, 0, 0, 20, 21, 22]), [0], [5]))
    assert len(drafter.levels) == 3 and not drafter.pool
    tree = drafter.propose([50, 51, 52, 10, 5], 16)
    assert len(tree) == 2 + 3 + 3
    assert drafter._top_rows == [4, 6, 8]  # each column's level-2 node
    drafter.update(StepResult(5, tree, top1_logits([0, 0, 0, 0, 30, 0, 31, 0, 32]), [0], [6]))
    assert drafter.candidates(5) == [(10, 20, 30)]  # now full: n-grams flow into the pool


def test_pool_ngrams_after_the_root_are_drafted_as_a_trie() -> None:
    drafter = full_window_drafter()
    drafter.add_ngram(2, (5, 6))
    drafter.add_ngram(2, (5, 7))
    drafter.add_ngram(3, (8, 9))
    tree = drafter.propose([1, 2], 16)
    assert tree.tokens[:3] == [5, 7, 6] and tree.parents[:3] == [-1, 0, 0]  # newest first, shared 5
    assert len(tree) == 3 + 5


def test_pool_keeps_the_newest_ngrams_per_key() -> None:
    drafter = Lookahead(ngram=2, pool_per_key=2)
    for token in (5, 6, 7, 6):
        drafter.add_ngram(1, (token,))
    assert drafter.candidates(1) == [(6,), (7,)]


def test_prompt_seeds_the_pool() -> None:
    drafter = Lookahead(ngram=3)
    drafter.begin([1, 2, 3, 4])
    assert drafter.candidates(1) == [(2, 3)] and drafter.candidates(2) == [(3, 4)]


@pytest.mark.parametrize("budget", [0, 1, 2, 5, 16, 40])
def test_budget_respected_and_tree_valid(budget: int) -> None:
    drafter = Lookahead(ngram=4)
    drafter.begin(list(range(30)) * 3)
    context = list(range(30)) * 3
    for step in range(5):
        tree = drafter.propose(context, budget)
        assert len(tree) <= budget
        DraftTree(tree.tokens, tree.parents)
        logits = torch.randn(len(tree) + 1, VOCAB)
        drafter.update(StepResult(context[-1], tree, logits, [0], [step]))
        context.append(step)


def test_greedy_output_equals_ar_and_the_pool_grows(tiny_llm) -> None:
    prompts = ["hello hello hello", "the cat sat on the mat. the cat", "Q: 2+2?"]
    params = SamplingParams(max_tokens=32, temperature=0)
    ar = [o.token_ids for o in tiny_llm.generate(prompts, params, method="ar")]
    drafter = tiny_llm.drafter("lookahead")
    saved = tiny_llm.draft_budget
    try:
        for budget in (3, 16):
            tiny_llm.draft_budget = budget
            before = sum(len(bucket) for bucket in drafter.pool.values())
            out = tiny_llm.generate(prompts, params, method="lookahead")
            assert [o.token_ids for o in out] == ar
    finally:
        tiny_llm.draft_budget = saved
    prompt_only = Lookahead()
    for ids in (o.prompt_token_ids for o in out):
        prompt_only.begin(ids)
    assert sum(len(bucket) for bucket in drafter.pool.values()) > before > 0
    assert len(drafter.pool) > len(prompt_only.pool)  # Jacobi n-grams, not just the prompt's
