"""Benchmark prompts: Spec-Bench's six categories, HumanEval as a seventh ("code"), and a small
built-in set so a quick run works on any clone.

Every prompt is a `BenchPrompt`: an id, a category and one or more user turns. Multi-turn
prompts (Spec-Bench's MT-Bench rows) carry two turns; the runner asks the second after the
model's own answer to the first.

Category names follow Spec-Bench's evaluation script (`mt_bench`, `translation`, ...). The
80 MT-Bench rows are stored under their MT-Bench subcategory (writing, roleplay, ...); they
all become `mt_bench` here, and `--limit` takes them round-robin over the subcategories so a
small limit still spans several kinds of conversation.
"""
from __future__ import annotations

import gzip
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag", "code")
CATEGORY_TITLES = {
    "mt_bench": "Multi-turn", "translation": "Translation", "summarization": "Summarization", "qa": "QA",
    "math_reasoning": "Math", "rag": "RAG", "code": "Code",
}
MT_BENCH_SUBCATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
DEFAULT_SPEC_BENCH = "../shared/data/spec_bench/question.jsonl"
DEFAULT_HUMANEVAL = "../shared/data/humaneval/HumanEval.jsonl.gz"
BUILTIN = "builtin"
BUILTIN_FILE = Path(__file__).with_name("builtin.jsonl")
REPO_ROOT = Path(__file__).resolve().parents[2]

# HumanEval gives a function stub; a chat model is asked to complete it. The stub goes in a
# fenced block so the model sees it as code, and the answer usually repeats it, which is the
# kind of copying that prompt-lookup style drafters exploit (as in real coding assistants).
CODE_PROMPT = "Complete this Python function:\n```python\n{prompt}```"


@dataclass(frozen=True)
class BenchPrompt:
    prompt_id: str
    category: str
    turns: tuple[str, ...]
    subcategory: str = ""


def resolve_data_path(path: str) -> Path:
    """`path` as given if it exists (relative to the cwd), else relative to the repository root."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    from_root = REPO_ROOT / path
    return from_root if from_root.exists() else given


def load_spec_bench(path: str | Path) -> list[BenchPrompt]:
    """Spec-Bench `question.jsonl`: the MT-Bench rows become `mt_bench`, the rest keep their category."""
    prompts = []
    for row in _read_jsonl(Path(path)):
        sub = row["category"]
        category = "mt_bench" if sub in MT_BENCH_SUBCATEGORIES else sub
        if category not in CATEGORIES:
            raise ValueError(f"{path}: question {row['question_id']} has unknown category {sub!r}")
        prompts.append(BenchPrompt(str(row["question_id"]), category, tuple(row["turns"]), sub))
    return prompts


def load_humaneval(path: str | Path) -> list[BenchPrompt]:
    """HumanEval problems as single-turn `code` prompts (see CODE_PROMPT)."""
    return [
        BenchPrompt(row["task_id"], "code", (CODE_PROMPT.format(prompt=row["prompt"]),))
        for row in _read_jsonl(Path(path))
    ]


def load_builtin() -> list[BenchPrompt]:
    """The project's own small prompt set, two per category (fastdecode/bench/builtin.jsonl)."""
    return [
        BenchPrompt(row["question_id"], row["category"], tuple(row["turns"]))
        for row in _read_jsonl(BUILTIN_FILE)
    ]


def load_prompts(
    data: str = DEFAULT_SPEC_BENCH, humaneval: str = DEFAULT_HUMANEVAL,
    categories: list[str] | None = None, limit: int | None = None, skip: int = 0,
) -> tuple[list[BenchPrompt], list[str]]:
    """Prompts of the chosen categories, at most `limit` per category after its first `skip` (a set
    held out from a run of the first ones), plus notes on what was skipped."""
    categories = list(categories or CATEGORIES)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; valid: {', '.join(CATEGORIES)}")
    notes: list[str] = []
    if data == BUILTIN:
        prompts = load_builtin()
    else:
        prompts = load_spec_bench(_existing(data, "--data", f"or use --data {BUILTIN}"))
        if "code" in categories:
            prompts += _humaneval_or_note(humaneval, notes)
    return _select(prompts, categories, limit, skip), notes


def _humaneval_or_note(path: str, notes: list[str]) -> list[BenchPrompt]:
    resolved = resolve_data_path(path)
    if not resolved.is_file():
        notes.append(f"HumanEval file {path} not found: the code category is skipped (set --humaneval)")
        return []
    return load_humaneval(resolved)


def _select(prompts: list[BenchPrompt], categories: list[str], limit: int | None, skip: int = 0) -> list[BenchPrompt]:
    """Group by category in `categories` order; within mt_bench alternate the subcategories."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for every prompt)")
    if skip < 0:
        raise ValueError(f"skip={skip} must be >= 0")
    by_category: dict[str, list[BenchPrompt]] = defaultdict(list)
    for p in prompts:
        by_category[p.category].append(p)
    chosen = []
    for category in categories:
        group = _round_robin(by_category[category]) if category == "mt_bench" else by_category[category]
        chosen += group[skip:][:limit]
    return chosen


def _round_robin(prompts: list[BenchPrompt]) -> list[BenchPrompt]:
    """Reorder so consecutive prompts come from different subcategories, keeping file order in each."""
    rank: dict[str, int] = defaultdict(int)
    keyed = []
    for i, p in enumerate(prompts):
        keyed.append((rank[p.subcategory], i, p))
        rank[p.subcategory] += 1
    return [p for _, _, p in sorted(keyed, key=lambda k: (k[0], k[1]))]


def _existing(path: str, option: str, hint: str) -> Path:
    resolved = resolve_data_path(path)
    if not resolved.is_file():
        raise FileNotFoundError(f"{option} {path!r} not found (looked in {Path.cwd()} and {REPO_ROOT}); {hint}")
    return resolved


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
