"""Quality of each weight dtype: perplexity on held-out text, and top-1 agreement with float32.

The text: the articles of Spec-Bench's summarization prompts (news text the project never tunes
on), tokenized and cut into non-overlapping windows; each window is one forward from position 0.
float32 holds the checkpoint's weights exactly (for the default model: the GGUF's Q4_1 blocks,
dequantized), so it is the reference; "agree" is the share of positions whose argmax equals
float32's.

    python scripts/perplexity.py [--dtypes float32,bfloat16,int8,int4] [--tokens 8192] [--window 512]
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from fastdecode import LLM
from fastdecode.bench.data import DEFAULT_HUMANEVAL, DEFAULT_SPEC_BENCH, load_prompts


def windows(llm: LLM, data: str, tokens: int, window: int) -> list[torch.Tensor]:
    prompts, _ = load_prompts(data, DEFAULT_HUMANEVAL, ["summarization"])
    ids: list[int] = []
    for p in prompts:
        ids += llm.tokenizer.encode("\n\n".join(p.turns))
        if len(ids) >= tokens:
            break
    ids = ids[: tokens // window * window]
    if not ids:
        raise SystemExit(f"not enough text in {data} for one window of {window} tokens")
    return list(torch.tensor(ids).split(window))


@torch.inference_mode()
def evaluate(llm: LLM, chunks: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """(perplexity, argmax at every predicted position)."""
    nll, count, argmax = 0.0, 0, []
    for chunk in chunks:
        logits = llm.model(chunk, torch.arange(len(chunk)), llm.model.new_cache())[:-1]
        nll += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += len(chunk) - 1
        argmax.append(logits.argmax(-1))
    return math.exp(nll / count), torch.cat(argmax)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16,int8,int4")
    ap.add_argument("--data", default=DEFAULT_SPEC_BENCH)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    results = []
    reference = None
    for dtype in args.dtypes.split(","):
        llm = LLM(args.model, dtype=dtype, threads=args.threads, max_model_len=args.window + 8)
        chunks = windows(llm, args.data, args.tokens, args.window)
        ppl, top1 = evaluate(llm, chunks)
        reference = top1 if reference is None else reference
        results.append((dtype, ppl, float((top1 == reference).float().mean())))
        del llm
    n = sum(len(c) - 1 for c in chunks)
    print(f"{n} predicted tokens in {len(chunks)} windows of {args.window}; agreement vs {results[0][0]}")
    print("| dtype | perplexity | top-1 agreement |\n|---|---|---|")
    for dtype, ppl, agree in results:
        print(f"| {dtype} | {ppl:.3f} | {agree:.4f} |")


if __name__ == "__main__":
    main()
