"""Prefill time of random prompts of several lengths, whole and in 64-token pieces, and whether
the two give bit-identical last logits (they must where the model has exact rows: bf16, int8, int4).

    python scripts/prefill_time.py [--dtype int4] [--threads 2] [--lengths 90,500,2000] [--reps 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from fastdecode import LLM
from fastdecode.llm import DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="int4", choices=DTYPES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", default="90,500,2000")
    parser.add_argument("--reps", type=int, default=2, help="the best of this many runs is reported")
    args = parser.parse_args()
    model = LLM(dtype=args.dtype, threads=args.threads, max_model_len=4096).model
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


if __name__ == "__main__":
    main()
