"""The benchmark loop: warm every runner up, then run each prompt through every runner in turn.

Protocol (Spec-Bench's, plus peers in the same process): greedy, batch size 1, one chat
template applied once so every runner sees the same prompt token ids. For prompt i the
runners go in rotated order (runner i mod n first), so slow drift of the machine (heat,
other load) falls on all of them alike. A multi-turn prompt asks its second turn after the
runner's own answer to the first; both turns are timed.

One record per (prompt, runner), with a list of turn records; `report.py` aggregates them.
"""
from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from fastdecode.bench.data import REPO_ROOT, BenchPrompt
from fastdecode.bench.peers import Generation, Runner
from fastdecode.kernels import bf16_kernel
from fastdecode.llm import LLM

WARMUP_PROMPT = "List three everyday uses of a paper clip."
WARMUP_MAX_TOKENS = 32


@dataclass
class TurnRecord:
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    tokens: int
    first_tokens: int
    decode_tokens: int
    ttft_s: float
    decode_s: float
    e2e_s: float
    steps: int | None
    tau: float | None  # tokens per target forward after the first; None where steps are unknown

    @classmethod
    def from_generation(cls, prompt_len: int, gen: Generation, text: str) -> TurnRecord:
        tau = gen.decode_tokens / gen.steps if gen.steps else None
        return cls(
            prompt_len, gen.token_ids, text, gen.finish_reason, len(gen.token_ids), gen.first_tokens,
            gen.decode_tokens, gen.ttft_s, gen.decode_s, gen.e2e_s, gen.steps, tau,
        )


def run_prompt(prompt: BenchPrompt, runner: Runner, llm: LLM, max_new_tokens: int) -> list[TurnRecord]:
    """All turns of one prompt with one runner; later turns follow the runner's own answers."""
    messages: list[dict[str, str]] = []
    turns = []
    for user_text in prompt.turns:
        messages.append({"role": "user", "content": user_text})
        prompt_ids = llm.apply_chat_template(messages)
        gen = runner.generate(prompt_ids, max_new_tokens)
        text = llm.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": text})
        turns.append(TurnRecord.from_generation(len(prompt_ids), gen, text))
    return turns


def warm_up(runners: list[Runner], llm: LLM, rounds: int, max_new_tokens: int) -> None:
    """Untimed generations so first-call costs (allocation, kernel choice, caches) are paid."""
    ids = llm.apply_chat_template([{"role": "user", "content": WARMUP_PROMPT}])
    for _ in range(rounds):
        for runner in runners:
            runner.generate(ids, min(max_new_tokens, WARMUP_MAX_TOKENS))


def freeze_heap() -> None:
    """Collect garbage, then move every object alive (models, tokenizers, every runner's state)
    to the collector's permanent generation, as vLLM's engine does after start-up. A full pass of
    the cyclic collector otherwise walks the whole shared heap during whichever runner happens to
    allocate: in an interleaved run of `ar`, `aded`, `auto` and `suffix` over translation
    prompts, `auto`'s proposals took 0.71 ms a step against 0.18 ms once the heap was frozen
    (ad-hoc timing of each call); a process running one method has far less heap to walk."""
    gc.collect()
    gc.freeze()


def rotated(runners: list[Runner], index: int) -> list[Runner]:
    """The runners starting from number `index` mod n: [r2, r0, r1] for index 2 of 3."""
    k = index % len(runners)
    return runners[k:] + runners[:k]


def run_interleaved(
    prompts: list[BenchPrompt], runners: list[Runner], llm: LLM, max_new_tokens: int, show_progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every prompt through every runner (rotated order); one record per (prompt, runner),
    each also handed to `on_record` as soon as it exists (so a cut-off run keeps its data)."""
    from tqdm import tqdm

    total = sum(len(p.turns) for p in prompts) * len(runners)
    records = []
    with tqdm(total=total, unit="gen", file=sys.stderr, disable=not show_progress, dynamic_ncols=True) as bar:
        for i, prompt in enumerate(prompts):
            for position, runner in enumerate(rotated(runners, i)):
                bar.set_postfix_str(f"{prompt.category} {prompt.prompt_id} {runner.name}")
                turns = run_prompt(prompt, runner, llm, max_new_tokens)
                bar.update(len(turns))
                record = {
                    "prompt_id": prompt.prompt_id, "category": prompt.category, "subcategory": prompt.subcategory,
                    "runner": runner.name, "kind": runner.kind, "position": position,
                    "turns": [asdict(t) for t in turns],
                }
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records


def draft_budget_info(llm: LLM) -> str | int:
    """The LLM's draft budget, or its per-method defaults when it was given none."""
    if llm.draft_budget is not None:
        return llm.draft_budget
    auto, rest = llm.budget("auto"), llm.budget("pld")
    return rest if auto == rest else f"{auto} for auto, {rest} for the others"


def machine_info(llm: LLM, threads: int) -> dict[str, Any]:
    """What a reader needs to reproduce or compare the numbers."""
    return {
        "cpu": _cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": _version("transformers"), "llama_cpp_python": _version("llama-cpp-python"),
        "threads": threads, "dtype": llm.dtype, "bf16_kernel": bf16_kernel(),
        "draft_budget": draft_budget_info(llm), "model": llm.model_path, "git_commit": _git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """HEAD of the repository, with `+dirty` when the work tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True,
            text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if status else "")
