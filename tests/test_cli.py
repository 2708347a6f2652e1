"""The CLI on a tiny model: generate --json, interactive chat over stdin, clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "fastdecode.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def test_generate_json_matches_the_python_api(tiny_llama_dir: Path, tiny_llm) -> None:
    from fastdecode import SamplingParams

    run = _cli("generate", "Hello", "--model", str(tiny_llama_dir), "--dtype", "float32", "--max-tokens", "12",
               "--method", "pld", "--json")
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    want = tiny_llm.generate("Hello", SamplingParams(max_tokens=12, temperature=0))[0]
    assert record["token_ids"] == want.token_ids and record["text"] == want.text
    assert record["finish_reason"] == "length" and record["metrics"]["tokens"] == 12


def test_interactive_chat_streams_a_reply_per_line(tiny_llama_dir: Path) -> None:
    run = _cli("chat", "--model", str(tiny_llama_dir), "--dtype", "float32", "--max-tokens", "6",
               stdin="hi\nand again\n\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("> ") >= 2 and len(run.stdout) > len("> > > ")


def test_bad_arguments_exit_2_with_a_message(tiny_llama_dir: Path) -> None:
    run = _cli("generate", "x", "--model", str(tiny_llama_dir), "--method", "nope")
    assert run.returncode == 2 and "unknown method 'nope'" in run.stderr and "Traceback" not in run.stderr
    run = _cli("generate", "x", "--model", str(tiny_llama_dir / "missing.gguf"))
    assert run.returncode == 2 and "does not exist" in run.stderr
