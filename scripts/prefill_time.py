"""Prefill time of random prompts of several lengths, whole and in 64-token pieces, and whether
the two give bit-identical last logits (they must where the model has exact rows: bf16, int8, int4);
then a chat of `--turns` turns (the built-in prompts, each answer fed back), with and without the
prefix cache: each turn's prompt tokens, tokens reused, and prefill time.

    python scripts/prefill_time.py [--dtype int4] [--threads 2] [--lengths 90,500,2000] [--reps 2] [--turns 6]
"""
from __future__ import annotations

import argparse
import time

import torch

from fastdecode import LLM, SamplingParams
from fastdecode.bench.data import load_builtin
from fastdecode.llm import DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="int4", choices=DTYPES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", default="90,500,2000")
    parser.add_argument("--reps", type=int, default=2, help="the best of this many runs is reported")
    parser.add_argument("--turns", type=int, default=6, help="chat turns (0: no chat)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per chat answer")
    args = parser.parse_args()
    llm = LLM(dtype=args.dtype, threads=args.threads, max_model_len=4096)
    model = llm.model
    for length in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, model.cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
        cache = model.new_cache()
        whole_s, pieces_s = [], []
        for _ in range(args.reps):
            cache.truncate(0)
            start = time.perf_counter()
            whole = model(ids, torch.arange(length), cache, last_only=True)
            whole_s.append(time.perf_counter() - start)
            cache.truncate(0)
            start = time.perf_counter()
            for a in range(0, length, 64):
                b = min(length, a + 64)
                pieces = model(ids[a:b], torch.arange(a, b), cache, last_only=True)
                cache.append(b - a)
            pieces_s.append(time.perf_counter() - start)
        print(f"{length} tokens: whole {min(whole_s) * 1000:.0f} ms, in 64-token pieces {min(pieces_s) * 1000:.0f} ms, "
              f"bit-identical logits: {torch.equal(whole, pieces)}")
    if args.turns:
        chat(llm, args.turns, args.max_tokens)


def chat(llm: LLM, turns: int, max_tokens: int) -> None:
    """The same conversation twice, greedy: without the prefix cache, then with it."""
    questions = [p.turns[0] for p in load_builtin()][:turns]
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    answers: dict[bool, list] = {}
    for cached in (False, True):
        llm.engine.prefix_cache = cached and llm.model.exact_rows
        llm.engine.cache.truncate(0)
        messages, outs = [], []
        for question in questions:
            messages.append({"role": "user", "content": question})
            out = llm.chat(messages, params)[0]
            messages.append({"role": "assistant", "content": out.text})
            outs.append(out)
        answers[cached] = outs
    print("turn | prompt tokens | reused | prefill ms without / with the prefix cache")
    for i, (plain, reused) in enumerate(zip(answers[False], answers[True]), 1):
        print(f"{i} | {len(plain.prompt_token_ids)} | {reused.metrics.cached_tokens} | "
              f"{plain.metrics.prefill_s * 1000:.0f} / {reused.metrics.prefill_s * 1000:.0f}")
    same = all(a.token_ids == b.token_ids for a, b in zip(answers[False], answers[True]))
    print(f"same answers with and without: {same}")


if __name__ == "__main__":
    main()
