"""The auto hybrid: merges member trees into one valid tree, sized by expected tokens per unit cost."""
from __future__ import annotations

import torch

from fastdecode.cost import CostCurve
from fastdecode.drafters.auto import AutoDrafter
from fastdecode.drafters.base import StepResult
from fastdecode.tree import DraftTree


class Fixed:
    """A member that always proposes the same tree."""

    def __init__(self, tree: DraftTree) -> None:
        self.tree, self.updates = tree, 0

    def begin(self, prompt_ids: list[int]) -> None:
        return None

    def propose(self, context: list[int], budget: int) -> DraftTree:
        return DraftTree(self.tree.tokens[:budget], self.tree.parents[:budget])

    def update(self, step: StepResult) -> None:
        self.updates += 1

    def end(self, output_ids: list[int]) -> None:
        return None


def _linear_cost(slope: float):
    return lambda n: 1.0 + slope * (n - 1)


def test_merged_tree_shares_common_prefixes_and_respects_the_budget() -> None:
    a = Fixed(DraftTree.chain([5, 6, 7]))
    b = Fixed(DraftTree([5, 9, 8], [-1, 0, -1]))  # 5 -> 9, and 8
    auto = AutoDrafter({"a": a, "b": b}, _linear_cost(0.0))  # free forwards: take everything
    tree = auto.propose([1, 2], budget=16)
    assert sorted(tree.paths()) == [[5, 6, 7], [5, 9], [8]]
    assert len(tree) == 5
    assert len(auto.propose([1, 2], budget=2)) == 2


def test_expensive_forwards_shrink_the_tree_to_nothing() -> None:
    auto = AutoDrafter({"a": Fixed(DraftTree.chain([5, 6, 7]))}, _linear_cost(5.0))
    assert len(auto.propose([1], budget=8)) == 0


def test_observed_acceptance_raises_scores_and_tree_size() -> None:
    member = Fixed(DraftTree.chain([5, 6, 7, 8]))
    auto = AutoDrafter({"a": member}, _linear_cost(0.3))
    first = len(auto.propose([1], budget=8))
    for _ in range(30):  # every node accepted, every time
        tree = auto.propose([1], budget=8)
        rows = list(range(len(tree) + 1))
        auto.update(StepResult(1, tree, torch.zeros(len(tree) + 1, 10), rows, tree.tokens + [0]))
    assert len(auto.propose([1], budget=8)) > first
    assert member.updates == 30
    assert auto.rate(("a", 1, 0)) > 0.8


def test_cost_curve_interpolates_and_extrapolates() -> None:
    curve = CostCurve({1: 1.0, 2: 1.2, 4: 2.0})
    assert curve(1) == 1.0 and curve(3) == 1.6 and abs(curve(6) - 2.8) < 1e-9


def test_a_damaged_cost_cache_is_measured_again(tiny_llm, tmp_path, monkeypatch) -> None:
    import json

    monkeypatch.setenv("FASTDECODE_CACHE", str(tmp_path))
    first = CostCurve.cached(tiny_llm.model, "tiny|float32")
    (cached,) = (tmp_path / "cost").glob("*.json")
    for damage in ("{not json", '{"ratios": [1, 2]}', '{"other": 1}'):
        cached.write_text(damage)
        again = CostCurve.cached(tiny_llm.model, "tiny|float32")
        assert list(again.ratios) == list(first.ratios) and again(1) == 1.0
        assert json.loads(cached.read_text())["ratios"]  # written again
