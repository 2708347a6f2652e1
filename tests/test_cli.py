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
    run = _cli("generate", "x", "--model", str(tiny_llama_dir), "--datastore", str(tiny_llama_dir / "none.jsonl"))
    assert run.returncode == 2 and "none.jsonl not found" in run.stderr and "Traceback" not in run.stderr


def test_train_head_writes_a_head_that_method_head_uses(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`train-head` end to end on the tiny model: it writes its corpus, trains, saves; a second run
    reads the corpus back; `generate --method head --draft-head` then gives `ar`'s tokens."""
    out, corpus = tmp_path / "head.safetensors", tmp_path / "corpus.jsonl"
    args = ("train-head", "--model", str(tiny_llama_dir), "--dtype", "float32", "--out", str(out), "--corpus",
            str(corpus), "--corpus-minutes", "0", "--batch", "20", "--answer-tokens", "24", "--epochs", "2",
            "--vocab", "100")
    run = _cli(*args)
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["answers"] + record["held_out"] == len(corpus.read_text().splitlines()) > 0
    assert 0.0 <= record["held_out_top1"] <= 1.0 and out.is_file()
    again = _cli(*args)
    assert again.returncode == 0 and "read from" in again.stderr
    gen = [_cli("generate", "Hello", "--model", str(tiny_llama_dir), "--dtype", "float32", "--max-tokens", "16",
                "--json", "--method", m, "--draft-head", str(out)) for m in ("ar", "head")]
    assert all(g.returncode == 0 for g in gen), gen[1].stderr
    assert json.loads(gen[0].stdout)["token_ids"] == json.loads(gen[1].stdout)["token_ids"]
    # the same corpus as a datastore for `suffix` / `auto`
    store = _cli("generate", "Hello", "--model", str(tiny_llama_dir), "--dtype", "float32", "--max-tokens", "16",
                 "--json", "--method", "auto", "--datastore", str(corpus))
    assert store.returncode == 0, store.stderr
    assert json.loads(store.stdout)["token_ids"] == json.loads(gen[0].stdout)["token_ids"]


def test_write_corpus_writes_a_datastore_that_auto_drafts_from(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`write-corpus` writes the model's own answers; as a --datastore, `auto` keeps `ar`'s tokens."""
    corpus = tmp_path / "corpus.jsonl"
    run = _cli("write-corpus", "--model", str(tiny_llama_dir), "--dtype", "float32", "--out", str(corpus),
               "--minutes", "0", "--batch", "8", "--answer-tokens", "16")
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert record["answers"] == len(rows) > 0
    assert record["answer_tokens"] == sum(len(r["ids"]) - r["start"] for r in rows) > 0
    gen = [_cli("generate", "Hello", "--model", str(tiny_llama_dir), "--dtype", "float32", "--max-tokens", "16",
                "--json", "--method", m, "--datastore", str(corpus)) for m in ("ar", "auto")]
    assert all(g.returncode == 0 for g in gen), gen[1].stderr
    assert json.loads(gen[0].stdout)["token_ids"] == json.loads(gen[1].stdout)["token_ids"]
    run = _cli("write-corpus", "--model", str(tiny_llama_dir), "--out", str(corpus), "--batch", "0")
    assert run.returncode == 2 and "--batch=0 must be >= 1" in run.stderr and "Traceback" not in run.stderr


def test_train_head_bad_arguments_exit_2_with_a_message(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run = _cli("train-head", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "h.safetensors"), "--epochs", "0")
    assert run.returncode == 2 and "--epochs=0 must be >= 1" in run.stderr and "Traceback" not in run.stderr
    run = _cli("train-head", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "no" / "h.safetensors"))
    assert run.returncode == 2 and "does not exist" in run.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ids": [1, 2]}\n')
    run = _cli("train-head", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "h.safetensors"), "--corpus", str(bad))
    assert run.returncode == 2 and "line 1" in run.stderr and "Traceback" not in run.stderr
    for row, want in (('{"ids": [1, 2, 99999], "start": 1}', "token id 99999 is outside the vocabulary [0, 320)"),
                      ('{"ids": [1, 2, 3], "start": 3}', "start=3 must be in [1, 2]")):
        bad.write_text(row + "\n")
        run = _cli("train-head", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "h.safetensors"), "--corpus",
                   str(bad))
        assert run.returncode == 2 and want in run.stderr and "Traceback" not in run.stderr
    run = _cli("generate", "x", "--model", str(tiny_llama_dir), "--method", "head")
    assert run.returncode == 2 and "draft_head=PATH" in run.stderr
