"""`fastdecode bench`: Spec-Bench-style speed benchmark of our methods against peers, on one machine.

What it measures: for each decoding method (ours, through `fastdecode.LLM`) and each peer
(HF transformers `generate`, its prompt lookup, llama.cpp and its prompt lookup) on the same
prompts, greedy (or sampled with --temperature, ours only) at batch size 1: decode and
end-to-end tokens/s per category, speedup over
our AR and over HF's AR, tau (tokens per target forward), exactness against our AR, TTFT and
per-token latency. Runners are warmed up first and interleaved per prompt (see run.py).

Writes results.json (every record + machine info), report.md and speedup.png to --out.

    python -m fastdecode.bench --data builtin --limit 1 --max-new-tokens 32
    fastdecode bench --methods ar --peers hf,llamacpp --limit 5

The CLI hooks in with `add_bench_parser(subparsers)`; the parsed args go to `run_bench`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fastdecode.bench.data import CATEGORIES, DEFAULT_HUMANEVAL, DEFAULT_SPEC_BENCH, load_prompts
from fastdecode.bench.peers import PEERS
from fastdecode.llm import DTYPES

DEFAULT_MAX_NEW_TOKENS = 256

__all__ = ["add_bench_parser", "build_parser", "run_bench"]


def add_bench_parser(subparsers: Any) -> None:
    """Register the `bench` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser("bench", help="benchmark decoding methods against peers (Spec-Bench style)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    parser.set_defaults(func=run_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastdecode.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    return parser


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--methods", default=None, help="comma-separated fastdecode methods (default: all registered)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated peers from {', '.join(PEERS)}, or 'none' (default: all)")
    parser.add_argument("--data", default=DEFAULT_SPEC_BENCH,
                        help="Spec-Bench question.jsonl, or 'builtin' for the built-in set (default: %(default)s)")
    parser.add_argument("--humaneval", default=DEFAULT_HUMANEVAL, help="HumanEval.jsonl.gz for the code category")
    parser.add_argument("--categories", default=",".join(CATEGORIES), help="comma-separated (default: all seven)")
    parser.add_argument("--limit", type=int, default=None, help="prompts per category (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--threads", type=int, default=None, help="threads for every runner (default: torch's)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (our KV cache, llama.cpp)")
    parser.add_argument("--draft-model", default=None, help="a separate draft model for method 'draft'")
    parser.add_argument("--draft-head", default=None,
                        help="a trained draft head (fastdecode train-head): method 'head' runs, and 'auto' has it as a member")
    parser.add_argument("--datastore", default=None,
                        help="a corpus for 'suffix' and 'auto' to draft from (.jsonl of text or ids rows, or text)")
    parser.add_argument("--draft-budget", type=int, default=None,
                        help="most draft nodes a step verifies, for every method "
                             "(default: fastdecode.llm.default_draft_budget, per method)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="> 0 samples (our methods only: use --peers none); every method gets the same seed")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed of every generation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds per runner")
    parser.add_argument("--out", default=None, help="output folder (default: bench_out/<timestamp>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed args; returns a process exit code (2: bad arguments)."""
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastdecode bench: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from fastdecode.bench.report import markdown_report, plot_speedup, summarize
    from fastdecode.bench.run import freeze_heap, machine_info, run_interleaved, warm_up
    from fastdecode.roofline import roofline

    if args.max_new_tokens < 1 or args.warmup < 0:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1 and --warmup={args.warmup} >= 0")
    prompts, notes = load_prompts(args.data, args.humaneval, _split(args.categories), args.limit)
    if not prompts:
        raise ValueError(f"no prompts selected from {args.data} for categories {args.categories}")
    llm, runners, runner_notes = _build_runners(args)
    notes += runner_notes
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    out_dir = Path(args.out or Path("bench_out") / time.strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    warm_up(runners, llm, args.warmup, args.max_new_tokens)
    freeze_heap()
    # every record is appended here as it is made: a run cut off midway keeps what it measured
    with open(out_dir / "records.partial.jsonl", "w", encoding="utf-8") as log:
        def keep(record: dict) -> None:
            log.write(json.dumps(record) + "\n")
            log.flush()

        records = run_interleaved(
            prompts, runners, llm, args.max_new_tokens, show_progress=not args.no_progress, on_record=keep
        )
    info = machine_info(llm, _threads(args)) | {
        "max_new_tokens": args.max_new_tokens, "limit": args.limit, "data": args.data, "warmup": args.warmup,
        "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
        "runners": [r.name for r in runners], "methods": [r.name for r in runners if r.kind == "method"],
        "roofline": roofline(llm.model),
    }
    summary = summarize(records)
    results = {"info": info, "notes": notes, "summary": summary, "records": records}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "report.md").write_text(markdown_report(summary, info, notes))
    plot_speedup(summary, str(out_dir / "speedup.png"))
    (out_dir / "records.partial.jsonl").unlink()  # complete: results.json holds every record
    print(f"wrote {out_dir}/results.json, report.md, speedup.png", file=sys.stderr)
    return 0


def _build_runners(args: argparse.Namespace) -> tuple[Any, list[Any], list[str]]:
    """The LLM, our method runners (ar always first: it is the reference) and the peer runners."""
    import torch

    from fastdecode.bench.peers import MethodRunner, build_peers
    from fastdecode.drafters import METHODS, check_method
    from fastdecode.llm import LLM
    from fastdecode.sampling import SamplingParams

    methods = [check_method(m) for m in _split(args.methods)] if args.methods else list(METHODS)
    notes = []
    if "head" in methods and args.draft_head is None:
        if args.methods:
            raise ValueError("method 'head' needs --draft-head PATH (train one with `fastdecode train-head`)")
        methods.remove("head")
        notes.append("method head skipped: no --draft-head given")
    if "ar" not in methods:
        notes.append("method ar added: speedups and exactness are measured against it")
    methods = ["ar"] + [m for m in methods if m != "ar"]
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    SamplingParams(**sampling)  # checks the values
    peer_names = [] if args.peers.strip().lower() in ("", "none") else _split(args.peers)
    if peer_names and args.temperature > 0:
        raise ValueError(f"--temperature={args.temperature}: the peers decode greedily; add --peers none to sample")
    # every runner prefills every prompt whole: a prefix cached by the runner before would favour
    # the runner after (the peers keep no cache between calls either)
    llm = LLM(args.model, dtype=args.dtype, threads=_threads(args), max_model_len=args.max_model_len,
              draft_model=args.draft_model, prefix_cache=False, draft_head=args.draft_head,
              datastore=args.datastore,
              **({} if args.draft_budget is None else {"draft_budget": args.draft_budget}))
    runners = [MethodRunner(llm, m, sampling) for m in methods]
    # HF peers compute in bf16 unless we run fp32 (transformers has no CPU kernels for our block formats)
    hf_dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    peers, peer_notes = build_peers(peer_names, llm, hf_dtype, _threads(args), llm.model.max_len)
    return llm, runners + peers, notes + peer_notes


def _threads(args: argparse.Namespace) -> int:
    import torch

    return args.threads or torch.get_num_threads()  # LLM(threads=...) has already set torch's count


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]
