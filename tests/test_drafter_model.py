"""Model-based drafters: `layerskip` (parts of the target) and `draft` (early exit, or a separate model).

The method-wide lossless tests (test_lossless, test_sampling_lossless, test_server_batch) run these
too, forced to draft (see conftest.force_model_drafting). Here: the pieces they rest on.
"""
from __future__ import annotations

import time

import pytest
import torch

from fastdecode import LLM, SamplingParams
from fastdecode.drafters.base import DraftRequest, StepResult
from fastdecode.drafters.model import EXPLORE, PROBE_EVERY, ChainDrafter, DraftModel, SkipLayers, skip_candidates
from fastdecode.sampling import Sampler

from conftest import force_model_drafting, make_tiny_model

PROMPT = "the cat sat on the mat. the cat sat on the"


def test_forward_over_a_layer_subset(tiny_llm) -> None:
    model, cfg = tiny_llm.model, tiny_llm.config
    tokens, positions = torch.tensor([5, 9, 30]), torch.arange(3)
    full = model(tokens, positions, model.new_cache())
    assert torch.equal(model(tokens, positions, model.new_cache(), layers=range(cfg.num_layers)), full)
    none = model(tokens, positions, model.new_cache(), layers=[])
    assert torch.allclose(none, model.lm_head(model.norm(model.embed(tokens).float())))
    assert not torch.allclose(model(tokens, positions, model.new_cache(), layers=[1]), full)


def test_a_draft_over_every_layer_is_always_accepted_and_leaves_the_cache_as_it_was(tiny_llm) -> None:
    """Drafting with all layers over the target's cache is the target itself: every draft is
    accepted, so the chain length is the budget, and the output equals AR's. The provisional
    entries a draft writes must not survive it."""
    drafter = SkipLayers(tiny_llm.model, tiny_llm.forward_cost, [range(tiny_llm.config.num_layers)], adaptive=False)
    ids = tiny_llm.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = tiny_llm.generate(ids, params, method="ar")[0].token_ids
    saved = dict(tiny_llm._drafters)
    tiny_llm._drafters["layerskip"] = drafter
    try:
        out = tiny_llm.generate(ids, params, method="layerskip")[0]
    finally:
        tiny_llm._drafters.clear()
        tiny_llm._drafters.update(saved)
    assert out.token_ids == want
    per_step = tiny_llm.budget("layerskip") + 1  # every draft accepted, plus the bonus token
    assert out.metrics.steps == -(-(len(want) - 1) // per_step)  # the first token comes from the prefill

    cache = tiny_llm.model.new_cache()
    tiny_llm.model(torch.tensor(ids), torch.arange(len(ids)), cache)
    cache.append(len(ids) - 1)  # committed: all but the root
    keys = cache.keys()[:, :, : cache.length].clone()
    drafter.begin(ids, DraftRequest(Sampler(params, ids, tiny_llm.config.vocab_size), cache))
    assert len(drafter.propose(ids, 5)) == 5
    assert cache.length == len(ids) - 1 and torch.equal(cache.keys()[:, :, : cache.length], keys)


def test_a_separate_draft_model_is_lossless_greedy_and_sampled(tiny_llama_dir, tmp_path) -> None:
    other = make_tiny_model(tmp_path / "draft", "llama", seed=1, num_hidden_layers=1)
    llm = LLM(str(tiny_llama_dir), dtype="float32", draft_model=str(other))
    force_model_drafting(llm)
    llm.new_drafter = lambda method: DraftModel(llm.load_draft_model(), llm.forward_cost, adaptive=False)
    ids = llm.tokenizer.encode(PROMPT)
    for params in (
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=4, ignore_eos=True),
    ):
        want = llm.generate(ids, params, method="ar")[0].token_ids
        for _ in range(2):  # the second request reuses the draft cache
            out = llm.generate(ids, params, method="draft")[0]
            assert out.token_ids == want
            assert out.metrics.drafted > 0


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_llama_dir, tmp_path) -> None:
    other = make_tiny_model(tmp_path / "draft", "llama", vocab_size=330)
    llm = LLM(str(tiny_llama_dir), dtype="float32", draft_model=str(other))
    with pytest.raises(ValueError, match="does not share the target's tokenizer"):
        llm.generate("abc", SamplingParams(max_tokens=2), method="draft")


def test_bad_layer_sets_are_refused(tiny_llm) -> None:
    with pytest.raises(ValueError, match=r"layer set \(0, 7\) must be"):
        SkipLayers(tiny_llm.model, tiny_llm.forward_cost, [(0, 7)])


def test_layer_sets_keep_the_outer_layers_and_shrink() -> None:
    sets = skip_candidates(30)
    assert len(sets) == 4
    assert all({0, 1, 28, 29} <= set(s) for s in sets)
    assert [len(s) for s in sets] == sorted((len(s) for s in sets), reverse=True)


class _Scripted(ChainDrafter):
    """Drafts token 1 with full confidence every time; the test decides what is accepted."""

    def _start(self, context: list[int]) -> torch.Tensor:
        return torch.tensor([0.0, 50.0, 0.0])

    def _next(self, token: int) -> torch.Tensor:
        return self._start([])


@pytest.mark.parametrize("accepted", [False, True])
def test_drafting_stops_when_it_does_not_pay_and_goes_on_when_it_does(accepted: bool) -> None:
    drafter = _Scripted(lambda n: 1.0)
    sampler = Sampler(SamplingParams(temperature=0), [], 3)
    drafter.begin([0], DraftRequest(sampler, None))
    drafting = []
    for _ in range(80):
        tree = drafter.propose([0, 1], 3)
        drafting.append(len(tree) > 0)
        time.sleep(0.001)  # the target's forward
        rows = list(range(len(tree) + 1)) if accepted else [0]
        drafter.update(StepResult(1, tree, torch.zeros(len(tree) + 1, 3), rows, [1] * len(rows)))
    later = drafting[EXPLORE + 8 :]
    if accepted:
        assert all(later)
    else:
        assert 0 < sum(later) <= len(later) / PROBE_EVERY + 1
