"""Load test for `fastdecode serve`: concurrent streaming clients against a running server.

What it measures, in three phases (loopback only; start the server yourself first):
  1. load: `--clients` clients, each sending greedy chat requests (the built-in bench prompts, first
     turn, in turn) back to back for `--duration` seconds, streamed with usage. Reports errors,
     TTFT (arrival to first text) and TPOT ((last - first) / (completion tokens - 1)) p50 / p99,
     and generated tokens/s.
  2. exactness: every distinct prompt is then sent alone (nothing else running); every answer it
     got under load must equal that text (greedy output does not depend on the batch).
  3. batching gain (`--compare`): generated tokens/s with 8 concurrent clients over one client at a
     time, `--compare-duration` seconds each.

    fastdecode serve --port 8000 &
    python scripts/load_server.py --url http://127.0.0.1:8000 --clients 32 --duration 120 --compare
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from fastdecode.bench.data import load_builtin


@dataclass
class Record:
    prompt: int
    text: str
    tokens: int
    ttft: float
    tpot: float | None


@dataclass
class Phase:
    records: list[Record] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.records) / self.seconds if self.seconds else 0.0


def one_request(http: httpx.Client, args: argparse.Namespace, prompt: str) -> tuple[str, int, float, float | None]:
    """Send one streamed greedy chat request; returns (text, completion tokens, ttft, tpot)."""
    body = {"model": args.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if args.method:
        body["method"] = args.method
    start, first, pieces, tokens = time.perf_counter(), None, [], 0
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode()[:200]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']['message']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    pieces.append(choice["delta"]["content"])
    end = time.perf_counter()
    first = first or end
    tpot = (end - first) / (tokens - 1) if tokens > 1 else None
    return "".join(pieces), tokens, first - start, tpot


def run_phase(args: argparse.Namespace, prompts: list[str], clients: int, seconds: float) -> Phase:
    phase, lock = Phase(), threading.Lock()
    deadline = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def client(k: int) -> None:
        with httpx.Client(base_url=args.url, headers=headers, timeout=600) as http:
            i = k
            while True:  # at least one request each (the warm-up runs with seconds = 0)
                p = i % len(prompts)
                try:
                    text, tokens, ttft, tpot = one_request(http, args, prompts[p])
                    with lock:
                        phase.records.append(Record(p, text, tokens, ttft, tpot))
                except Exception as exc:  # reported, not raised: the run goes on
                    with lock:
                        phase.errors.append(f"{type(exc).__name__}: {exc}")
                i += clients
                if time.perf_counter() >= deadline:
                    break

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    phase.seconds = time.perf_counter() - start
    return phase


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summary(name: str, phase: Phase) -> dict:
    ttft = [r.ttft for r in phase.records]
    tpot = [r.tpot for r in phase.records if r.tpot is not None]
    return {
        "phase": name, "requests": len(phase.records), "errors": len(phase.errors), "seconds": round(phase.seconds, 1),
        "generated_tokens_per_s": round(phase.tokens_per_s, 1),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
        "first_errors": phase.errors[:3],
    }


def check_exact(args: argparse.Namespace, prompts: list[str], phase: Phase) -> dict:
    """Each distinct prompt alone vs every answer it got under load."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    mismatches, checked = [], 0
    with httpx.Client(base_url=args.url, headers=headers, timeout=600) as http:
        for p in sorted({r.prompt for r in phase.records}):
            alone = one_request(http, args, prompts[p])[0]
            for r in phase.records:
                if r.prompt == p:
                    checked += 1
                    if r.text != alone:
                        mismatches.append({"prompt": p, "alone": alone[:80], "under_load": r.text[:80]})
    return {"answers_checked": checked, "mismatches": len(mismatches), "first_mismatches": mismatches[:3]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model id (default: the server's first /v1/models entry)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--method", default=None, help="decoding method (default: the server's)")
    parser.add_argument("--compare", action="store_true", help="also measure 8 concurrent clients vs 1")
    parser.add_argument("--compare-duration", type=float, default=60.0)
    parser.add_argument("--json", default=None, help="write the report here too")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.model is None:
        args.model = httpx.get(args.url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    prompts = [p.turns[0] for p in load_builtin()]
    run_phase(args, prompts[:1], 1, 0.0)  # warm-up: one request (kernel loads, `auto`'s cost curve)
    load = run_phase(args, prompts, args.clients, args.duration)
    report = {"url": args.url, "model": args.model, "max_tokens": args.max_tokens, "method": args.method,
              "load": {"clients": args.clients, **summary("load", load)}, "exactness": check_exact(args, prompts, load)}
    if args.compare:
        serial = run_phase(args, prompts, 1, args.compare_duration)
        batched = run_phase(args, prompts, 8, args.compare_duration)
        report["compare"] = {
            "one_at_a_time": summary("1 client", serial), "eight_concurrent": summary("8 clients", batched),
            "throughput_ratio_8_vs_1": round(batched.tokens_per_s / serial.tokens_per_s, 2) if serial.tokens_per_s else None,
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    ok = load.errors == [] and report["exactness"]["mismatches"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
