"""The auto hybrid: merges member trees into one valid tree, sized by expected tokens per unit cost."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdecode.cost import SIZES, CostCurve
from fastdecode.drafters.auto import PROBE_EVERY, PROBE_PHASE, AutoDrafter, StepCost
from fastdecode.drafters.base import StepResult
from fastdecode.tree import DraftTree


class Fixed:
    """A member that always proposes the same tree."""

    def __init__(self, tree: DraftTree) -> None:
        self.tree, self.updates = tree, 0

    def begin(self, prompt_ids: list[int], request=None) -> None:
        return None

    def propose(self, context: list[int], budget: int) -> DraftTree:
        return DraftTree(self.tree.tokens[:budget], self.tree.parents[:budget])

    def update(self, step: StepResult) -> None:
        self.updates += 1

    def end(self, output_ids: list[int]) -> None:
        return None


@pytest.fixture(params=[False, True], ids=["python", "native"])
def native(request) -> bool:
    """Each behaviour test runs on the Python code and on csrc/auto.cpp."""
    return request.param


def _linear_cost(slope: float):
    return lambda n: 1.0 + slope * (n - 1)


def test_merged_tree_shares_common_prefixes_and_respects_the_budget(native: bool) -> None:
    a = Fixed(DraftTree.chain([5, 6, 7]))
    b = Fixed(DraftTree([5, 9, 8], [-1, 0, -1]))  # 5 -> 9, and 8
    auto = AutoDrafter({"a": a, "b": b}, _linear_cost(0.0), native=native)  # free forwards: take everything
    tree = auto.propose([1, 2], budget=16)
    assert sorted(tree.paths()) == [[5, 6, 7], [5, 9], [8]]
    assert len(tree) == 5
    assert len(auto.propose([1, 2], budget=2)) == 2


def test_expensive_forwards_shrink_the_tree_to_nothing(native: bool) -> None:
    auto = AutoDrafter({"a": Fixed(DraftTree.chain([5, 6, 7]))}, _linear_cost(5.0), native=native)
    assert len(auto.propose([1], budget=8)) == 0


def test_observed_acceptance_raises_scores_and_tree_size(native: bool) -> None:
    member = Fixed(DraftTree.chain([5, 6, 7, 8]))
    auto = AutoDrafter({"a": member}, _linear_cost(0.3), native=native)
    first = len(auto.propose([1], budget=8))
    for _ in range(30):  # every node accepted, every time
        tree = auto.propose([1], budget=8)
        rows = list(range(len(tree) + 1))
        auto.update(StepResult(1, tree, torch.zeros(len(tree) + 1, 10), rows, tree.tokens + [0]))
    assert len(auto.propose([1], budget=8)) > first
    assert member.updates == 30
    assert auto.rate(("a", 1, 0, 1, 0)) > 0.8  # (member, depth, sibling rank, members agreeing, seen)


def test_acceptance_is_counted_apart_for_nodes_several_members_agree_on(native: bool) -> None:
    """Agreed nodes always accepted, lone ones never: pooled, both would score ~1/2 and a
    half-priced node would be drafted either way; apart, only an agreed node is."""
    a, b = Fixed(DraftTree.chain([5])), Fixed(DraftTree.chain([5]))
    auto = AutoDrafter({"a": a, "b": b}, _linear_cost(0.0), native=native)  # free nodes while it learns: every one drafted
    auto.step_cost.observe = lambda nodes, seconds: None  # the given costs, not this test's timings
    for step in range(40):
        b.tree = DraftTree.chain([5 if step % 2 else 7])  # agrees with a every other step
        tree = auto.propose([1], budget=4)
        hit = [i for i, token in enumerate(tree.tokens) if token == 5 and b.tree.tokens == [5]]
        rows = [0] + [i + 1 for i in hit]
        auto.update(StepResult(1, tree, torch.zeros(len(tree) + 1, 10), rows, [tree.tokens[i] for i in hit] + [0]))
    assert auto.rate(("a", 1, 0, 2, 0)) > 0.8 and auto.rate(("a", 1, 0, 1, 0)) < 0.2
    auto.step_cost = StepCost(_linear_cost(0.4))  # a node now costs 40 % of a step (steps 41, 42: not exploring)
    auto.step_cost.observe = lambda nodes, seconds: None
    b.tree = DraftTree.chain([5])
    assert auto.propose([1], budget=4).tokens == [5]
    b.tree = DraftTree.chain([7])
    assert auto.propose([1], budget=4).tokens == []


def test_acceptance_is_counted_apart_for_nodes_whose_trigram_the_context_holds(native: bool) -> None:
    """A node whose last three tokens (with the context's) already occur in the request's context
    is far likelier right: the statistics keep such nodes apart (`seen`: 0, 1, 2 or more)."""
    a = Fixed(DraftTree.chain([5]))
    auto = AutoDrafter({"a": a}, _linear_cost(0.0), native=native)
    auto.step_cost.observe = lambda nodes, seconds: None
    seen, unseen = [9, 8, 5, 9, 8], [9, 7, 5, 9, 8]  # (9, 8) then 5 occurs in the first only
    for step in range(40):
        context = seen if step % 2 else unseen
        auto.begin(context)
        tree = auto.propose(context, budget=4)  # [5], or [] on a step exploring a smaller size
        right = context is seen and len(tree) == 1  # right exactly where the context holds (9, 8, 5)
        auto.update(StepResult(8, tree, torch.zeros(len(tree) + 1, 10), [0, 1] if right else [0], [5, 0] if right else [0]))
    assert auto.rate(("a", 1, 0, 1, 1)) > 0.8 and auto.rate(("a", 1, 0, 1, 0)) < 0.2
    auto.step_cost = StepCost(_linear_cost(0.4))
    auto.step_cost.observe = lambda nodes, seconds: None
    for context, drafted in ((seen, [5]), (unseen, [])):
        auto.begin(context)
        assert auto.propose(context, budget=4).tokens == drafted
    auto.begin(seen)
    auto.propose(seen, budget=4)
    auto.propose(seen + [5, 9, 8], budget=4)  # the request's next step: only the new tokens are counted
    assert auto.trigram_count(9, 8, 5) == 2 and auto.trigram_count(8, 5, 9) == 2


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


def test_cost_curve_of_a_short_context_measures_the_sizes_that_fit(tiny_llama_dir) -> None:
    """max_model_len below the largest size (64 tokens): no cached prefix, the sizes up to it."""
    from fastdecode import LLM

    curve = CostCurve.measure(LLM(str(tiny_llama_dir), dtype="float32", max_model_len=32).model, repeats=1)
    assert list(curve.ratios) == [n for n in SIZES if n <= 32] and curve(1) == 1.0


def _knee(k: int) -> float:
    """A step's time by draft size: flat up to 5 nodes, then 8 % more per node."""
    return 1.0 if k <= 5 else 1.0 + 0.08 * (k - 5)


def test_step_cost_learns_a_knee_the_prior_lacks_despite_context_drift() -> None:
    import math
    import random

    cost = StepCost(lambda n: 1.0)  # the prior: every size costs the same
    assert cost.costs(8) == [1.0] * 9
    rng, context = random.Random(0), 1.0
    for step in range(400):  # mostly full trees, now and then 4-7 nodes; every step slower than the last
        context *= 1.003  # over the run, the context's growth outweighs the knee
        size = 8 if step % 4 else rng.choice([4, 5, 6, 7])
        cost.observe(size, 0.01 * context * _knee(size) * math.exp(rng.gauss(0, 0.05)))
    learned = cost.costs(8)
    assert all(a <= b for a, b in zip(learned, learned[1:]))  # never cheaper with more nodes
    for k in range(4, 9):  # relative to 4 nodes, within a few percent
        assert abs(learned[k] / learned[4] - _knee(k)) < 0.04, (k, learned)


def test_step_cost_refits_every_few_pairs() -> None:
    cost = StepCost(lambda n: 1.0)
    assert cost.costs(8) == [1.0] * 9
    for i in range(StepCost.REFIT_EVERY):  # 8 steps: 7 pairs, each 8 nodes twice the time of 2
        cost.observe(8 if i % 2 else 2, 0.02 if i % 2 else 0.01)
    assert cost.costs(8) == [1.0] * 9  # the last fit stands
    cost.observe(2, 0.01)  # the 8th pair
    assert cost.costs(8)[8] > 1.5


def test_step_cost_never_pairs_steps_of_different_requests() -> None:
    cost = StepCost(lambda n: 1.0)
    for seconds in (0.01, 0.02, 0.04):  # each request one step of 8 nodes, then a long one of 2
        cost.new_request()
        cost.observe(8, seconds)
        cost.new_request()
        cost.observe(2, seconds * 10)
    assert cost.costs(8) == [1.0] * 9
    small = StepCost(lambda n: 1.0, max_nodes=8)
    small.observe(2, 0.01)
    small.observe(9, 0.5)  # more nodes than it tracks: neither kept nor a partner for the next step
    small.observe(8, 0.1)
    assert small.costs(8) == [1.0] * 9


def test_auto_explores_sizes_beside_the_best_and_shrinks_to_the_knee() -> None:
    member = Fixed(DraftTree.chain([5, 6, 7, 8, 9, 10, 11, 12]))
    auto = AutoDrafter({"a": member}, _linear_cost(0.0))  # the prior: nodes are free
    sizes = []
    for step in range(400):
        tree = auto.propose([1], budget=8)
        sizes.append(len(tree))
        auto._last = (len(tree), auto._last[1] - 0.01 * _knee(len(tree)))  # as if the step took that long
        rows = [0, 1, 2][: 2 + step % 2][: len(tree) + 1]  # depth 1 always accepted, depth 2 every other step
        auto.update(StepResult(1, tree, torch.zeros(len(tree) + 1, 20), rows, [tree.tokens[r - 1] for r in rows[1:]] + [0]))
    assert sizes[0] == 8 and len(set(sizes[:40])) >= 3  # a full tree first, and sizes beside the best
    # deep nodes are seldom right; free, they would still be drafted, but past the knee they do not pay
    assert sorted(sizes[-48:])[24] <= 5, sizes[-48:]


def test_draft_budget_defaults_per_method_unless_given(tiny_llama_dir, monkeypatch) -> None:
    """On AMX, bf16: `auto` (which weighs each node by measured acceptance) 24 nodes, the single
    drafters 12; elsewhere 6 for all; a budget given to LLM holds for every method."""
    from fastdecode import LLM, llm as llm_module

    monkeypatch.setattr(llm_module, "amx_bf16", lambda: True)
    assert [llm_module.default_draft_budget("bfloat16", m) for m in ("auto", "suffix", "aded")] == [24, 12, 12]
    assert llm_module.default_draft_budget("float32", "auto") == 6
    monkeypatch.setattr(llm_module, "amx_bf16", lambda: False)
    assert llm_module.default_draft_budget("bfloat16", "auto") == 6
    given = LLM(str(tiny_llama_dir), dtype="float32", draft_budget=5)
    assert given.budget("auto") == given.budget("pld") == 5
    with pytest.raises(ValueError, match="draft_budget=-1"):
        LLM(str(tiny_llama_dir), dtype="float32", draft_budget=-1)


def test_auto_suffix_member_offers_longer_copies_than_suffix_alone(tiny_llm) -> None:
    """A passage seen before: `suffix` alone stops its chain at 11 tokens (0.9 a token, nodes
    scored below 0.3 dropped), `auto`'s suffix member at 21 (below 0.1)."""
    passage = list(range(100, 140))
    context = [7, 8] + passage + [9] + passage[:20]
    depths = {}
    alone, member = tiny_llm.new_drafter("suffix"), tiny_llm.new_drafter("auto").members["suffix"]
    for name, drafter in (("alone", alone), ("member", member)):
        drafter.begin(context)
        tree = drafter.propose(context, 40)
        assert tree.paths() == [(passage[20:] + [9] + passage)[: len(tree)]]  # one chain: what followed
        depths[name] = len(tree)
    assert depths == {"alone": 11, "member": 21}


def _run_chain(auto: AutoDrafter, steps: int, seconds) -> list[int]:
    """`steps` steps of `auto` over one member's chain, each taking seconds(nodes); depth 1 always
    accepted, depth 2 every other step, deeper never. Returns the sizes drafted."""
    sizes = []
    for step in range(steps):
        tree = auto.propose([1], budget=24)
        sizes.append(len(tree))
        auto._last = (len(tree), auto._last[1] - seconds(len(tree)))  # as if the step took that long
        rows = [0, 1, 2][: 2 + step % 2][: len(tree) + 1]
        auto.update(StepResult(1, tree, torch.zeros(len(tree) + 1, 40), rows, [tree.tokens[r - 1] for r in rows[1:]] + [0]))
    return sizes


def test_auto_probes_half_its_size_and_leaves_an_oversized_start_fast() -> None:
    # The prior says nodes are free, so the first trees take all 24 nodes; each node costs 3 % of a
    # step, and only depths 1-2 are ever accepted. Exploring 1-2 nodes beside the best, the fit
    # knows the slope near the size it drafts and nothing far below, so the tree creeps down a
    # node or two at a time; the half-size probes show the far sizes at once.
    chain = DraftTree.chain(list(range(5, 29)))
    auto = AutoDrafter({"a": Fixed(chain)}, _linear_cost(0.0))
    sizes = _run_chain(auto, 160, lambda k: 0.01 * (1 + 0.03 * k))
    assert sizes[0] == 24
    probes = [i for i in range(1, 159) if (i + 1) % PROBE_EVERY == PROBE_PHASE]  # the drafter counts steps from 1
    assert len(probes) >= 2
    assert all(sizes[i] == max(sizes[i - 1], sizes[i + 1]) // 2 for i in probes), [sizes[i - 1 : i + 2] for i in probes]
    assert sorted(sizes[96:])[32] <= 3, sizes[96:]
    unprobed = AutoDrafter({"a": Fixed(chain)}, _linear_cost(0.0))
    unprobed.probe_every = 0
    assert sorted(_run_chain(unprobed, 160, lambda k: 0.01 * (1 + 0.03 * k))[96:])[32] >= 8  # still creeping


class Random:
    """A member proposing a random tree of up to `budget` nodes over a small vocabulary, so the
    members' trees overlap (agreement) and repeat the context's trigrams (seen)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def begin(self, prompt_ids: list[int], request=None) -> None:
        return None

    def propose(self, context: list[int], budget: int) -> DraftTree:
        n = int(self.rng.integers(0, budget + 1))
        parents = [int(self.rng.integers(-1, i)) if i else -1 for i in range(n)]
        return DraftTree(self.rng.integers(0, 6, n).tolist(), parents)

    def update(self, step: StepResult) -> None:
        return None

    def end(self, output_ids: list[int]) -> None:
        return None


def test_native_core_equals_the_python_code() -> None:
    """csrc/auto.cpp against the Python code over 300 steps of random member trees (the two
    drafters' members seeded alike, so they propose the same trees), random verifications and
    growing contexts: the same tree every step, the same statistics at the end."""
    drafters = [AutoDrafter({f"m{i}": Random(i) for i in range(3)}, _linear_cost(0.02), native=native)
                for native in (False, True)]
    for auto in drafters:
        auto.step_cost.observe = lambda nodes, seconds: None  # sizes from the given costs, not timings
    rng = np.random.default_rng(7)
    nodes = 0
    for request in range(6):
        context = rng.integers(0, 6, 12).tolist()
        for auto in drafters:
            auto.begin(context)
        for step in range(50):
            budget = int(rng.integers(0, 20))
            python_tree, native_tree = (auto.propose(context, budget) for auto in drafters)
            assert (native_tree.tokens, native_tree.parents) == (python_tree.tokens, python_tree.parents)
            nodes += len(python_tree)
            rows, node = [0], -1  # a verification: from the root, maybe one child a node, down a path
            while True:
                children = [i for i, p in enumerate(python_tree.parents) if p == node]
                if not children or rng.random() < 0.35:
                    break
                node = children[int(rng.integers(0, len(children)))]
                rows.append(node + 1)
            emitted = [python_tree.tokens[r - 1] for r in rows[1:]] + [int(rng.integers(0, 6))]
            result = StepResult(context[-1], python_tree, torch.zeros(len(python_tree) + 1, 6), rows, emitted)
            for auto in drafters:
                auto.update(result)
            context = context + emitted
    assert nodes > 500  # the trees were not empty
    assert drafters[1].stats == drafters[0].stats and len(drafters[0].stats) > 20
