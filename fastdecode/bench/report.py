"""Aggregate benchmark records into per runner x category numbers, a Markdown report and a plot.

Rates are pooled as Spec-Bench pools them: total tokens over total time within a category
(every turn of every prompt), not a mean of per-prompt rates, so long answers weigh more.

- decode tok/s: tokens after the first step / time after the first step (prefill excluded)
- end-to-end tok/s: all tokens / whole call time (prefill and library overhead included)
- speedup: decode tok/s of a runner / decode tok/s of our `ar` (or of the `hf` peer)
- tau: tokens per target forward after the first one (AR = 1.00), pooled the same way
- exactness: share of prompts whose tokens (all turns) equal our `ar` output's
- TTFT and per-token latency (decode time / decode tokens) per turn: mean, p50, p90
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from fastdecode.bench.data import CATEGORIES, CATEGORY_TITLES

HOW_TO_READ = [
    "Greedy, batch size 1, same prompt token ids for every runner; runners interleaved per prompt.",
    "Rates are pooled per category: total tokens / total time. Decode excludes the first step "
    "(prefill + first token); end-to-end includes it and the library's own overhead.",
    "tau = tokens per target forward after the first: ours from the engine's steps, HF from its "
    "generation steps, llama.cpp from its eval calls.",
    "A peer's exactness below 1.00 can come from its own numerics (e.g. llama.cpp's quantized "
    "matmuls) rather than from its decoding method.",
]
OVERALL = "overall"
BASELINE = "ar"
HF_BASELINE = "hf"

Stats = dict[str, Any]


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Stats]]:
    """runner -> category (and "overall") -> stats; runners and categories in first-seen order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["runner"], r["category"])].append(r)
        groups[(r["runner"], OVERALL)].append(r)
    reference = _tokens_by_prompt(records, BASELINE)
    summary: dict[str, dict[str, Stats]] = defaultdict(dict)
    for (runner, category), group in groups.items():
        summary[runner][category] = _stats(group, reference)
    for runner, by_category in summary.items():
        for category, stats in by_category.items():
            stats["speedup_ar"] = _ratio(stats, summary.get(BASELINE, {}).get(category))
            stats["speedup_hf"] = _ratio(stats, summary.get(HF_BASELINE, {}).get(category))
    return dict(summary)


def _stats(group: list[dict[str, Any]], reference: dict[str, list[list[int]]]) -> Stats:
    turns = [t for r in group for t in r["turns"]]
    decode_tokens = sum(t["decode_tokens"] for t in turns)
    decode_s = sum(t["decode_s"] for t in turns)
    tokens = sum(t["tokens"] for t in turns)
    e2e_s = sum(t["e2e_s"] for t in turns)
    stepped = [t for t in turns if t["steps"] is not None]
    steps = sum(t["steps"] for t in stepped)
    compared = [r for r in group if r["prompt_id"] in reference]
    exact = [_turn_tokens(r) == reference[r["prompt_id"]] for r in compared]
    per_token = [t["decode_s"] / t["decode_tokens"] for t in turns if t["decode_tokens"] > 0]
    return {
        "prompts": len(group), "turns": len(turns), "tokens": tokens, "decode_tokens": decode_tokens,
        "decode_s": decode_s, "e2e_s": e2e_s,
        "decode_tps": decode_tokens / decode_s if decode_s > 0 else None,
        "e2e_tps": tokens / e2e_s if e2e_s > 0 else None,
        "tau": sum(t["decode_tokens"] for t in stepped) / steps if stepped and steps else None,
        "exact": sum(exact) / len(exact) if exact else None,
        "ttft_s": _spread([t["ttft_s"] for t in turns]), "per_token_s": _spread(per_token),
    }


def _tokens_by_prompt(records: list[dict[str, Any]], runner: str) -> dict[str, list[list[int]]]:
    return {r["prompt_id"]: _turn_tokens(r) for r in records if r["runner"] == runner}


def _turn_tokens(record: dict[str, Any]) -> list[list[int]]:
    return [t["token_ids"] for t in record["turns"]]


def _ratio(stats: Stats, baseline: Stats | None) -> float | None:
    if baseline is None or not stats["decode_tps"] or not baseline["decode_tps"]:
        return None
    return stats["decode_tps"] / baseline["decode_tps"]


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90))}


def categories_of(summary: dict[str, dict[str, Stats]]) -> list[str]:
    """Categories present, in Spec-Bench's order (then any others)."""
    present = {c for by_category in summary.values() for c in by_category if c != OVERALL}
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted(present, key=lambda c: (order.get(c, len(order)), c))


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _table(summary: dict[str, dict[str, Stats]], key: str, pattern: str, with_tau: bool = False) -> list[str]:
    """Rows runners, columns categories + Overall (+ overall tau); cells `stats[key]` formatted."""
    categories = categories_of(summary)
    header = ["Runner"] + [CATEGORY_TITLES.get(c, c) for c in categories] + ["Overall"] + (["tau"] if with_tau else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for runner, by_category in summary.items():
        cells = [_fmt(by_category[c][key], pattern) if c in by_category else "-" for c in categories + [OVERALL]]
        if with_tau:
            cells.append(_fmt(by_category[OVERALL]["tau"], "{:.2f}"))
        lines.append("| " + " | ".join([runner] + cells) + " |")
    return lines


def markdown_report(summary: dict[str, dict[str, Stats]], info: dict[str, Any], notes: list[str]) -> str:
    """The report: Spec-Bench-style speedup table first, then rates, tau, exactness and latency."""
    sections = [
        "# fastdecode bench", "", _header(info), "",
        "## Speedup over fastdecode AR (decode tokens/s ratio)", "", *_table(summary, "speedup_ar", "{:.2f}x", True), "",
    ]
    if HF_BASELINE in summary:
        sections += ["## Speedup over HF transformers AR (`hf`)", "", *_table(summary, "speedup_hf", "{:.2f}x", True), ""]
    sections += [
        "## Decode tokens/s (prefill excluded)", "", *_table(summary, "decode_tps", "{:.1f}"), "",
        "## End-to-end tokens/s (prefill included)", "", *_table(summary, "e2e_tps", "{:.1f}"), "",
        "## Tokens per target forward (tau)", "", *_table(summary, "tau", "{:.2f}"), "",
        "## Exactness: share of prompts whose tokens equal fastdecode AR's", "", *_table(summary, "exact", "{:.2f}"), "",
        "## Latency per turn, all categories (ms)", "", *_latency_table(summary), "",
        *_roofline_section(summary, info),
        "## Notes", "", *[f"- {n}" for n in HOW_TO_READ + notes], "",
    ]
    return "\n".join(sections)


def _header(info: dict[str, Any]) -> str:
    keys = [
        ("model", "model"), ("dtype", "dtype"), ("bf16_kernel", "bf16 kernel"), ("draft_budget", "draft budget"), ("threads", "threads"), ("cpu", "CPU"),
        ("usable_cores", "cores"), ("torch", "torch"), ("transformers", "transformers"),
        ("llama_cpp_python", "llama-cpp-python"), ("git_commit", "commit"), ("max_new_tokens", "max new tokens"),
        ("limit", "prompts per category"), ("temperature", "temperature (0: greedy)"), ("top_p", "top_p"),
        ("seed", "seed"), ("data", "data"), ("time", "time"),
    ]
    return "\n".join(f"- {label}: {info[key]}" for key, label in keys if info.get(key) is not None)


def _roofline_section(summary: dict[str, dict[str, Stats]], info: dict[str, Any]) -> list[str]:
    """How close each of our methods gets to the memory bound (peers read their own weights)."""
    r = info.get("roofline")
    if not r:
        return []
    bound = r["bound_forwards_per_s"]
    lines = [
        "## Roofline: the memory bound of one forward", "",
        f"One forward reads {r['weight_bytes'] / 1e6:.1f} MB of weights (plus the KV cache); the measured read "
        f"bandwidth is {r['bandwidth_gbs']:.1f} GB/s, so at most {bound:.1f} forwards/s. That is AR's bound in "
        "tokens/s; a method's is tau times it.", "",
    ]
    sized = r.get("weight_sized_bandwidth_gbs")
    if sized:  # a buffer of the weights' size may sit in a large last-level cache
        lines += [f"Over a buffer the size of the weights the probe read {sized:.1f} GB/s ({sized * 1e9 / r['weight_bytes']:.1f} "
                  "forwards/s): the first probe's buffer is larger than any cache, this one reads as fast as the weights "
                  "could if a cache holds part of them.", ""]
    lines += ["| Runner | decode tok/s | tau | forwards/s | % of the bound |", "|---|---|---|---|---|"]
    over = False
    for runner in info.get("methods", []):
        s = summary.get(runner, {}).get(OVERALL)
        if not s or not s["decode_tps"] or not s["tau"]:
            continue
        forwards = s["decode_tps"] / s["tau"]
        over = over or forwards > bound
        lines.append(f"| {runner} | {s['decode_tps']:.1f} | {s['tau']:.2f} | {forwards:.1f} | {100 * forwards / bound:.0f} % |")
    if over:  # the probe's buffer is larger than the weights: a cache that holds them beats it
        lines += ["", "Above 100 %: the forwards read their weights faster than the probe read its buffer (larger than "
                      "the weights), so some weights came from a cache (a large shared L3, for one): not a bound in this run."]
    return lines + [""]


def _latency_table(summary: dict[str, dict[str, Stats]]) -> list[str]:
    header = "| Runner | TTFT mean | TTFT p50 | TTFT p90 | per-token mean | per-token p50 | per-token p90 | turns |"
    lines = [header, "|" + "---|" * 8]
    for runner, by_category in summary.items():
        s = by_category[OVERALL]
        seconds = (*s["ttft_s"].values(), *s["per_token_s"].values())
        ms = [_fmt(None if v is None else v * 1000, "{:.1f}") for v in seconds]
        lines.append(f"| {runner} | " + " | ".join(ms) + f" | {s['turns']} |")
    return lines


def plot_speedup(summary: dict[str, dict[str, Stats]], path: str) -> None:
    """Grouped bars: one group per category (+ overall), one colour per runner, a line at 1.0 = AR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = categories_of(summary) + [OVERALL]
    runners = list(summary)
    width = 0.8 / max(len(runners), 1)
    fig, ax = plt.subplots(figsize=(min(16.0, max(8.0, 0.25 * len(columns) * len(runners))), 5))
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: tab10 repeats after ten runners
    for i, runner in enumerate(runners):
        values = [summary[runner].get(c, {}).get("speedup_ar") or 0.0 for c in columns]
        xs = [x + (i - (len(runners) - 1) / 2) * width for x in range(len(columns))]
        ax.bar(xs, values, width, label=runner, color=palette[(2 * i) % 20 + (i >= 10)])
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_xticks(range(len(columns)), [CATEGORY_TITLES.get(c, c.title()) for c in columns])
    ax.set_ylabel("decode speedup over fastdecode AR")
    ax.set_title("fastdecode bench: speedup per category (1.0 = AR)")
    ax.legend(ncol=min(len(runners), 4), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
