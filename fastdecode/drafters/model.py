"""Drafting with a model: `layerskip` (the target itself with some layers skipped, after SWIFT,
Xia et al. 2024) and `draft` (an early-exit copy of the target, or a separate draft model that
shares the target's tokenizer).

A draft step runs one token through the draft model and takes the token the request's own
sampler would pick from the draft's logits (`Sampler.draft_with_prob`: the argmax when greedy,
else the same Gumbel noise the target will use at that position). So a chain guesses the target's
own picks, and the verifier's match rule keeps the output exactly AR's, greedy or sampled (see
sampling.py).

The chain's length follows the draft's confidence (SpecDec++-style): the chance that the chain up
to a token is accepted is estimated as the product of the draft's probabilities of its tokens,
times a calibration factor learned from how often the nodes that verification reached were
really accepted. A token is drafted while that chance exceeds what it costs: one draft forward
plus one more verified node, both relative to a plain step and both measured while decoding.

`layerskip` and the early-exit `draft` run parts of the target over the target's own KV cache:
the context's keys and values in the layers they run are the target's (exact), the drafted
tokens' are written into the pending slots that the verification forward then overwrites. Which
layers run is chosen on the fly: a bandit over a few candidate layer sets, scored by the tokens
gained per drafting step (see ChainDrafter).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import torch

from fastdecode.drafters.base import DraftRequest, DrafterEnv, StepResult
from fastdecode.model import Transformer
from fastdecode.tree import DraftTree

DECAY = 0.97  # weight of the past in running sums, per observation
EXPLORE = 3  # drafting steps each arm (candidate layer set) gets before the best one is exploited
EXPLORE_RATE = 0.1  # then: the share of drafting steps that try a random arm
PROBE_EVERY = 8  # while no arm pays, draft only on every 8th step, to notice when one starts to


class _Ratio:
    """A decayed ratio of two running sums, starting at `prior` (worth `weight` observations)."""

    def __init__(self, prior: float, weight: float = 2.0) -> None:
        self.num, self.den = prior * weight, weight

    def add(self, num: float, den: float) -> None:
        self.num = self.num * DECAY + num
        self.den = self.den * DECAY + den

    @property
    def value(self) -> float:
        return self.num / self.den if self.den else 0.0


class ChainDrafter:
    """Drafts one chain a step, token by token; subclasses say how a draft forward runs.

    Whether to draft at all is learned too: each drafting step's net gain in seconds is the
    accepted tokens times a plain step's time, minus the drafting time and the extra cost of
    verifying the chain. An "arm" (a subclass's choice, e.g. a layer set) with the best running gain
    drafts; while even that gain is negative, only every PROBE_EVERY-th step drafts."""

    def __init__(self, cost: Callable[[int], float], arms: int = 1, adaptive: bool = True) -> None:
        self.cost = cost  # an n-token target forward over a 1-token one
        self.adaptive = adaptive  # False: always draft the whole budget with arm 0 (tests, measurements)
        self.request: DraftRequest | None = None
        self.calibration = _Ratio(1.0)  # accepted nodes / summed confidence, over reached nodes
        self.draft_s = _Ratio(0.0, 0.0)  # seconds per draft forward
        self.plain_s = _Ratio(0.0, 0.0)  # seconds of a plain (1-token) step, inferred from real steps
        self.gains = [_Ratio(0.0, 0.0) for _ in range(arms)]  # net seconds gained per drafting step
        self.tries = [0] * arms
        self.rng = random.Random(0)
        self.arm = 0
        self._idle = 0  # steps since the last drafting one
        self._confs: list[float] = []  # the last chain's confidences
        self._last: list[int] = []  # the last chain's tokens
        self._spent: float | None = None  # seconds the last chain took to draft (None: no drafting)
        self._mark: float | None = None  # when the last drafting ended

    # -- what subclasses provide
    def _start(self, context: list[int]) -> torch.Tensor:
        """Draft logits `[vocab]` for the token after `context`."""
        raise NotImplementedError

    def _next(self, token: int) -> torch.Tensor:
        """Draft logits after also feeding `token`."""
        raise NotImplementedError

    def _stop(self) -> None:
        """Drafting for this step is over."""

    def _use(self, arm: int) -> None:
        """Draft with this arm from now on."""

    # -- the Drafter protocol
    def begin(self, prompt_ids: list[int], request: DraftRequest | None = None) -> None:
        if request is None:
            raise ValueError(f"{type(self).__name__} drafts with a model and needs the request's sampler and KV cache")
        self.request, self._mark, self._spent = request, None, None

    def propose(self, context: list[int], budget: int) -> DraftTree:
        now = time.perf_counter()
        if self._mark is not None:  # the step just verified: its time without the drafting
            self.plain_s.add((now - self._mark) / self.cost(len(self._last) + 1), 1.0)
        tree, self._spent = DraftTree(), None
        if budget > 0 and self.request is not None and self._pick_arm():
            tree = self._draft(context, budget)  # sets self._spent
        self._last = list(tree.tokens)
        self._mark = time.perf_counter()
        return tree

    def update(self, step: StepResult) -> None:
        if self._spent is None or step.tree.tokens != self._last:
            return  # no drafting this step, or not our chain (e.g. merged by `auto`)
        accepted = len(step.accepted_rows) - 1
        if self._confs:
            reached = self._confs[: accepted + 1]  # node i is reached when the i before it were accepted
            self.calibration.add(accepted, sum(reached))
        if self.plain_s.den:
            plain = self.plain_s.value
            gain = accepted * plain - self._spent - (self.cost(len(self._last) + 1) - 1) * plain
            self.gains[self.arm].add(gain, 1.0)

    def end(self, output_ids: list[int]) -> None:
        self.request = None

    def _pick_arm(self) -> bool:
        """Choose the arm to draft with this step; False: do not draft."""
        if not self.adaptive:
            self._use(0)
            return True
        untried = [i for i, tries in enumerate(self.tries) if tries < EXPLORE]
        if untried:
            arm = untried[0]
        else:
            arm = max(range(len(self.gains)), key=lambda i: self.gains[i].value)
            if self.gains[arm].value < 0 and self._idle < PROBE_EVERY - 1:
                self._idle += 1
                return False
            if self.rng.random() < EXPLORE_RATE:
                arm = self.rng.randrange(len(self.gains))
        self._idle = 0
        self.tries[arm] += 1
        self.arm = arm
        self._use(arm)
        return True

    def _draft(self, context: list[int], budget: int) -> DraftTree:
        sampler = self.request.sampler
        start = time.perf_counter()
        logits = self._start(context)
        tree, confs, chance, forwards = DraftTree(), [], 1.0, 1
        calibration = self.calibration.value
        # before both timings exist, draft up to the budget (the first steps measure them)
        draft_cost = self.draft_s.value / self.plain_s.value if self.plain_s.den and self.draft_s.den else 0.0
        for depth in range(budget):
            token, conf = sampler.draft_with_prob(logits, depth)
            chance *= min(1.0, conf * calibration)
            if self.adaptive and chance < draft_cost + self.cost(depth + 2) - self.cost(depth + 1):
                break
            tree.add(token, depth - 1)
            confs.append(conf)
            if depth + 1 == budget:
                break
            logits = self._next(token)
            forwards += 1
        self._stop()
        self._spent = time.perf_counter() - start
        self.draft_s.add(self._spent, forwards)
        self._confs = confs
        return tree


class SkipLayers(ChainDrafter):
    """The target with only some of its layers run, over the target's own KV cache; the arms are
    candidate layer sets."""

    def __init__(
        self, model: Transformer, cost: Callable[[int], float], candidates: Sequence[Sequence[int]], adaptive: bool = True
    ) -> None:
        if model is None:
            raise ValueError("self-drafting needs the target model")
        self.candidates = [tuple(c) for c in dict.fromkeys(tuple(c) for c in candidates)]
        bad = [c for c in self.candidates if not c or not all(0 <= i < len(model.blocks) for i in c)]
        if bad:
            raise ValueError(f"layer set {bad[0]} must be a non-empty set of layers in [0, {len(model.blocks)})")
        super().__init__(cost, arms=len(self.candidates), adaptive=adaptive)
        self.model = model
        self.layers = self.candidates[0]
        self._base = 0

    def _use(self, arm: int) -> None:
        self.layers = self.candidates[arm]

    def _forward(self, token: int) -> torch.Tensor:
        cache = self.request.cache
        logits = self.model(torch.tensor([token]), torch.tensor([cache.length]), cache, layers=self.layers)
        cache.append(1)  # provisionally, so the next draft token sees this one; undone in _stop
        return logits[0]

    def _start(self, context: list[int]) -> torch.Tensor:
        self._base = self.request.cache.length
        if self._base != len(context) - 1:
            raise RuntimeError(f"the KV cache holds {self._base} tokens; the context has {len(context)} (expected one more)")
        return self._forward(context[-1])

    def _next(self, token: int) -> torch.Tensor:
        return self._forward(token)

    def _stop(self) -> None:
        self.request.cache.truncate(self._base)


class DraftModel(ChainDrafter):
    """A separate model that shares the target's tokenizer, with its own KV cache kept in step with
    the context (accepted drafts are already in it; rejected ones are cut off on the next step)."""

    def __init__(self, model: Transformer, cost: Callable[[int], float], adaptive: bool = True) -> None:
        super().__init__(cost, adaptive=adaptive)
        self.model = model
        self.cache = model.new_cache()
        self.cached: list[int] = []  # the tokens whose K/V the draft cache holds

    def begin(self, prompt_ids: list[int], request: DraftRequest | None = None) -> None:
        super().begin(prompt_ids, request)
        self.cache.truncate(0)
        self.cached = []

    def _start(self, context: list[int]) -> torch.Tensor:
        keep = 0
        limit = min(len(self.cached), len(context) - 1)  # the root is always run again
        while keep < limit and self.cached[keep] == context[keep]:
            keep += 1
        self.cache.truncate(keep)
        feed = context[keep:]
        logits = self.model(torch.tensor(feed), torch.arange(keep, len(context)), self.cache, last_only=True)
        self.cache.append(len(feed))
        self.cached = list(context)
        return logits[0]

    def _next(self, token: int) -> torch.Tensor:
        logits = self.model(torch.tensor([token]), torch.tensor([self.cache.length]), self.cache)
        self.cache.append(1)
        self.cached.append(token)
        return logits[0]


def skip_candidates(layers: int) -> list[tuple[int, ...]]:
    """Layer sets for `layerskip`: 15 %, 25 %, 40 % or 55 % of the inner layers skipped, spread
    evenly (the first and last two layers always run). Measured on SmolLM2-135M (int4, greedy, the
    target's own cache): skipping 6 of 30 spread evenly, the draft's top-1 matched the target's
    63 % of the time; 10: 44 %; 14: 29 %; skipping a block of late layers instead: under 7 %."""
    inner = list(range(2, layers - 2)) if layers > 6 else list(range(1, layers))
    out = []
    for ratio in (0.15, 0.25, 0.4, 0.55):
        n = max(1, min(len(inner), round(ratio * len(inner))))
        skip = {inner[i * len(inner) // n + len(inner) // (2 * n)] for i in range(n)}
        out.append(tuple(layer for layer in range(layers) if layer not in skip))
    return [c for c in dict.fromkeys(out) if c]


def exit_candidates(layers: int) -> list[tuple[int, ...]]:
    """Prefixes for the early-exit `draft`: the first quarter, third, half or two thirds of the layers."""
    return [tuple(range(k)) for k in dict.fromkeys(max(1, layers * f // 12) for f in (3, 4, 6, 8))]


def layer_skip(env: DrafterEnv) -> SkipLayers:
    return SkipLayers(env.model, env.cost, skip_candidates(env.config.num_layers))


def draft_model(env: DrafterEnv) -> ChainDrafter:
    """The separate draft model when the LLM has one, else an early-exit copy of the target."""
    model = env.draft_model()
    if model is not None:
        return DraftModel(model, env.cost)
    return SkipLayers(env.model, env.cost, exit_candidates(env.config.num_layers))
