"""The benchmark: prompt loading, the report from synthetic records, and one quick real run."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from fastdecode.bench import build_parser, run_bench
from fastdecode.bench.data import (
    BUILTIN, CATEGORIES, DEFAULT_HUMANEVAL, DEFAULT_SPEC_BENCH, load_builtin, load_prompts, resolve_data_path,
)
from fastdecode.bench.report import OVERALL, markdown_report, plot_speedup, summarize
from fastdecode.bench.data import BenchPrompt
from fastdecode.bench.peers import Generation
from fastdecode.bench.run import freeze_heap, rotated, run_interleaved
from fastdecode.weights import default_model_path

SPEC_BENCH = resolve_data_path(DEFAULT_SPEC_BENCH)
HUMANEVAL = resolve_data_path(DEFAULT_HUMANEVAL)
needs_data = pytest.mark.skipif(
    not (SPEC_BENCH.is_file() and HUMANEVAL.is_file()), reason="shared Spec-Bench/HumanEval data not present"
)


@needs_data
def test_spec_bench_and_humaneval_give_seven_categories() -> None:
    prompts, notes = load_prompts(DEFAULT_SPEC_BENCH, DEFAULT_HUMANEVAL)
    assert notes == []
    counts = {c: sum(p.category == c for p in prompts) for c in CATEGORIES}
    assert counts == {"mt_bench": 80, "translation": 80, "summarization": 80, "qa": 80,
                      "math_reasoning": 80, "rag": 80, "code": 164}
    assert all(len(p.turns) == 2 for p in prompts if p.category == "mt_bench")
    assert all(len(p.turns) == 1 for p in prompts if p.category != "mt_bench")
    code = next(p for p in prompts if p.category == "code")
    assert code.turns[0].startswith("Complete this Python function:\n```python\n") and "def " in code.turns[0]


@needs_data
def test_limit_is_per_category_and_mt_bench_spans_subcategories() -> None:
    prompts, _ = load_prompts(DEFAULT_SPEC_BENCH, DEFAULT_HUMANEVAL, ["mt_bench", "qa"], limit=8)
    assert [p.category for p in prompts] == ["mt_bench"] * 8 + ["qa"] * 8
    assert len({p.subcategory for p in prompts[:8]}) == 8
    later, _ = load_prompts(DEFAULT_SPEC_BENCH, DEFAULT_HUMANEVAL, ["mt_bench", "qa"], limit=3, skip=5)
    assert [p.prompt_id for p in later] == [p.prompt_id for p in prompts[5:8] + prompts[13:16]]


def test_builtin_set_covers_every_category() -> None:
    prompts = load_builtin()
    assert {p.category for p in prompts} == set(CATEGORIES)
    assert all(len(p.turns) == 2 for p in prompts if p.category == "mt_bench")
    assert len({p.prompt_id for p in prompts}) == len(prompts)
    limited, _ = load_prompts(BUILTIN, categories=["qa", "code"], limit=1)
    assert [p.category for p in limited] == ["qa", "code"]


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(ValueError, match="poetry"):
        load_prompts(BUILTIN, categories=["poetry"])
    with pytest.raises(ValueError, match="skip=-1"):
        load_prompts(BUILTIN, skip=-1)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_prompts("nowhere.jsonl")


def test_rotation_changes_the_first_runner() -> None:
    runners = ["a", "b", "c"]
    assert [rotated(runners, i)[0] for i in range(4)] == ["a", "b", "c", "a"]  # type: ignore[arg-type]


class _FakeLLM:
    class tokenizer:  # noqa: N801 - stands in for the LLM's tokenizer attribute
        @staticmethod
        def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
            return " ".join(map(str, ids))

    @staticmethod
    def apply_chat_template(messages: list[dict]) -> list[int]:
        return [len(messages)]


class _FakeRunner:
    kind = "method"

    def __init__(self, name: str) -> None:
        self.name = name

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        return Generation(prompt_ids + [7] * (max_new_tokens - 1), "length", 0.01, 0.02, 0.03)


def test_every_record_reaches_the_sink_as_it_is_made() -> None:
    prompts = [BenchPrompt("1", "qa", ("q",)), BenchPrompt("2", "mt_bench", ("a", "b"), "writing")]
    seen: list[dict] = []

    def sink(record: dict) -> None:
        seen.append(record)

    records = run_interleaved(prompts, [_FakeRunner("x"), _FakeRunner("y")], _FakeLLM(), 3,  # type: ignore[arg-type]
                              show_progress=False, on_record=sink)
    assert seen == records and len(records) == 4
    assert [(r["prompt_id"], r["runner"]) for r in records] == [("1", "x"), ("1", "y"), ("2", "y"), ("2", "x")]
    assert [t["token_ids"] for t in records[2]["turns"]] == [[1, 7, 7], [3, 7, 7]]  # turn 2 sees turn 1's answer


def _turn(tokens: list[int], decode_s: float, ttft_s: float = 0.1, steps: int | None = None) -> dict:
    n = len(tokens)
    return {"token_ids": tokens, "tokens": n, "decode_tokens": n - 1, "decode_s": decode_s, "ttft_s": ttft_s,
            "e2e_s": ttft_s + decode_s, "steps": n - 1 if steps is None else steps}


def _record(runner: str, category: str, prompt_id: str, turns: list[dict]) -> dict:
    return {"runner": runner, "category": category, "prompt_id": prompt_id, "turns": turns}


def test_report_from_synthetic_records(tmp_path: Path) -> None:
    records = [
        _record("ar", "qa", "q1", [_turn([1, 2, 3, 4, 5], decode_s=4.0)]),
        _record("pld", "qa", "q1", [_turn([1, 2, 3, 4, 5], decode_s=1.0, steps=2)]),
        _record("hf", "qa", "q1", [_turn([1, 2, 3, 9, 9], decode_s=8.0)]),
        _record("ar", "mt_bench", "m1", [_turn([7, 8, 9], decode_s=2.0), _turn([4, 5, 6], decode_s=2.0)]),
        _record("pld", "mt_bench", "m1", [_turn([7, 8, 9], decode_s=1.0, steps=1), _turn([4, 5, 6], 1.0, steps=1)]),
        _record("hf", "mt_bench", "m1", [_turn([7, 8, 9], decode_s=4.0), _turn([4, 5, 6], decode_s=4.0)]),
    ]
    summary = summarize(records)
    assert summary["ar"]["qa"]["decode_tps"] == pytest.approx(1.0)
    assert summary["pld"]["qa"]["speedup_ar"] == pytest.approx(4.0)
    assert summary["pld"]["qa"]["speedup_hf"] == pytest.approx(8.0)
    assert summary["pld"]["qa"]["tau"] == pytest.approx(2.0)
    assert summary["pld"]["mt_bench"]["tau"] == pytest.approx(2.0)
    assert summary["ar"][OVERALL]["tau"] == pytest.approx(1.0)
    assert summary["pld"][OVERALL]["speedup_ar"] == pytest.approx((8 / 3) / 1.0)  # 8 tokens in 3 s vs 8 in 8 s
    assert summary["hf"]["qa"]["exact"] == 0.0 and summary["hf"]["mt_bench"]["exact"] == 1.0
    assert summary["hf"][OVERALL]["exact"] == 0.5
    assert summary["ar"]["mt_bench"]["ttft_s"]["p50"] == pytest.approx(0.1)
    report = markdown_report(summary, {"model": "m.gguf", "threads": 2}, ["a note"])
    assert "| Runner | Multi-turn | QA | Overall | tau |" in report
    assert "| pld | 2.00x | 4.00x | 2.67x | 2.00 |" in report
    assert "- a note" in report
    assert "Roofline" not in report  # no roofline measured: no section
    roof = {"weight_bytes": 1e6, "bandwidth_gbs": 0.002, "bound_forwards_per_s": 2.0}
    report = markdown_report(summary, {"roofline": roof, "methods": ["ar", "pld"]}, [])
    assert "at most 2.0 forwards/s" in report
    assert "| ar | 1.0 | 1.00 | 1.0 | 50 % |" in report and "| pld | 2.7 | 2.00 | 1.3 | 67 % |" in report
    assert "not a bound in this run" not in report
    fast = markdown_report(summary, {"roofline": {**roof, "bound_forwards_per_s": 1.2}, "methods": ["ar", "pld"]}, [])
    assert "| pld | 2.7 | 2.00 | 1.3 | 111 % |" in fast and "not a bound in this run" in fast  # faster than the probe
    assert "the size of the weights" not in fast  # no weight-sized probe in these results: no sentence
    sized = markdown_report(summary, {"roofline": {**roof, "weight_sized_bandwidth_gbs": 3.5}, "methods": ["ar"]}, [])
    assert "Over a buffer the size of the weights the probe read 3.5 GB/s (3500.0 forwards/s)" in sized
    plot_speedup(summary, str(tmp_path / "speedup.png"))
    assert (tmp_path / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bench_default_model(out: Path, *options: str) -> dict:
    """Run the benchmark on the built-in prompts with the default model; returns results.json."""
    try:
        default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    args = build_parser().parse_args(["--data", BUILTIN, "--out", str(out), "--no-progress", *options])
    assert run_bench(args) == 0
    return json.loads((out / "results.json").read_text())


def test_quick_run_on_the_default_model(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    results = _bench_default_model(
        out, "--categories", "mt_bench,qa", "--limit", "1", "--max-new-tokens", "16",
        "--methods", "ar", "--peers", "hf", "--dtype", "float32",
    )
    assert {"cpu", "torch", "threads", "dtype", "git_commit"} <= set(results["info"])
    runners = {r["runner"] for r in results["records"]}
    assert runners == {"ar", "hf"}
    assert len(results["records"]) == 4  # 2 prompts x 2 runners
    ar = results["summary"]["ar"]
    assert ar[OVERALL]["exact"] == 1.0 and ar[OVERALL]["tau"] == pytest.approx(1.0)
    assert ar[OVERALL]["decode_tps"] > 0
    assert all(len(r["turns"]) == 2 for r in results["records"] if r["category"] == "mt_bench")
    report = (out / "report.md").read_text()
    assert "## Speedup over fastdecode AR" in report and "| ar | 1.00x | 1.00x | 1.00x | 1.00 |" in report
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "records.partial.jsonl").exists()
    assert results["info"]["roofline"]["bound_forwards_per_s"] > 0 and "## Roofline" in report  # the run finished: results.json holds it all
    assert results["info"]["roofline"]["weight_sized_bandwidth_gbs"] > 0 and "the size of the weights" in report


def test_sampled_run_gives_every_method_ars_tokens(tmp_path: Path) -> None:
    """With one seed for all, sampling is drafter-invariant (sampling.py): pld's tokens equal ar's."""
    out = tmp_path / "bench"
    results = _bench_default_model(
        out, "--categories", "summarization", "--limit", "1", "--max-new-tokens", "24",
        "--methods", "ar,pld", "--peers", "none", "--dtype", "int4",
        "--temperature", "0.7", "--top-p", "0.9", "--seed", "3",
    )
    assert (results["info"]["temperature"], results["info"]["top_p"], results["info"]["seed"]) == (0.7, 0.9, 3)
    assert results["summary"]["pld"][OVERALL]["exact"] == 1.0
    assert "- temperature (0: greedy): 0.7" in (out / "report.md").read_text()


def test_sampling_with_peers_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["--data", BUILTIN, "--peers", "hf", "--temperature", "0.5"])
    assert run_bench(args) == 2
    assert "--temperature=0.5" in capsys.readouterr().err


def test_freeze_heap_moves_live_objects_out_of_the_collectors_reach() -> None:
    """After the warm-up the bench freezes the heap, so full collections walk only what the runs
    allocate, not every runner's models and state."""
    class Live:
        pass

    live = Live()
    try:
        freeze_heap()
        assert not any(obj is live for obj in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(obj is live for obj in gc.get_objects())
