"""The machine's cost curve: time of an n-token forward over a 1-token forward, n = 1..64.

It decides how large a draft tree pays: a tree of n nodes is worth it only while its expected
accepted tokens grow faster than cost(n + 1). Measured once per (model, dtype, threads, CPU,
kernel sources) and cached as JSON, because it takes a few seconds.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

import torch

from fastdecode.kernels import amx_bf16, bf16_isa, source_digest
from fastdecode.model import Transformer
from fastdecode.weights import cache_root

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
MAX_NODES = SIZES[-1]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CostCurve:
    def __init__(self, ratios: dict[int, float]) -> None:
        self.ratios = dict(sorted(ratios.items()))  # n -> time(n) / time(1)

    def __call__(self, n: int) -> float:
        """Relative cost of an n-token forward, linearly interpolated between measured sizes."""
        sizes = list(self.ratios)
        if n <= sizes[0]:
            return self.ratios[sizes[0]]
        for lo, hi in zip(sizes, sizes[1:]):
            if n <= hi:
                w = (n - lo) / (hi - lo)
                return (1 - w) * self.ratios[lo] + w * self.ratios[hi]
        last, prev = sizes[-1], sizes[-2]
        slope = (self.ratios[last] - self.ratios[prev]) / (last - prev)
        return self.ratios[last] + slope * (n - last)

    @classmethod
    def measure(cls, model: Transformer, context: int = 128, repeats: int = 5) -> "CostCurve":
        """Time forwards of every size in SIZES over a `context`-token cache (medians of `repeats`
        rounds, each round every size once, after a round that warms up). A short context length
        (max_model_len below MAX_NODES + 1) shrinks the cache, and then the sizes, to what fits;
        __call__ extrapolates past the last.

        Rounds, not each size's runs back to back: timed size by size, the first size (1, the
        denominator) ran right after the prefill and load, and on the AMX VM the cached curves
        said a 2- to 12-token forward cost 0.63-0.95x a 1-token one (one: 2 / 4 / 8 tokens 0.72 /
        0.63 / 0.66x). In rounds, three measurements gave 0.98-1.00 / 0.99-1.02 / 1.04-1.05x (README,
        "The cost curve's timing")."""
        cache = model.new_cache()
        context = max(0, min(context, model.max_len - MAX_NODES - 1))
        if context:
            model(torch.zeros(context, dtype=torch.long), torch.arange(context), cache)
            cache.append(context)
        sizes = [n for n in SIZES if context + n <= model.max_len]
        runs: dict[int, list[float]] = {n: [] for n in sizes}
        for round_ in range(repeats + 1):  # round 0 warms up
            for n in sizes:
                tokens = torch.zeros(n, dtype=torch.long)
                positions = context + torch.arange(n)
                start = time.perf_counter()
                model(tokens, positions, cache)
                if round_:
                    runs[n].append(time.perf_counter() - start)
        times = {n: sorted(r)[len(r) // 2] for n, r in runs.items()}
        return cls({n: t / times[1] for n, t in times.items()})

    @classmethod
    def cached(cls, model: Transformer, key: str) -> "CostCurve":
        """Load the curve measured for `key` (+ threads and CPU) or measure and store it."""
        ident = (
            f"{key}|threads={torch.get_num_threads()}|cpu={_cpu_name()}|torch={torch.__version__}"
            f"|kernels={source_digest()}|isa={bf16_isa()}|amx={amx_bf16()}|timing=rounds"  # rounds: see measure
        )
        digest = hashlib.sha1(ident.encode()).hexdigest()[:16]
        path = cache_root() / "cost" / f"{digest}.json"
        try:
            return cls({int(n): float(r) for n, r in json.loads(path.read_text())["ratios"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # none yet, or unreadable: measure and write it again
        curve = cls.measure(model)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"ident": ident, "ratios": curve.ratios}, indent=1))
        except OSError:
            pass  # an unwritable cache only costs a re-measure next time
        return curve
