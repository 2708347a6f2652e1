"""Greedy fp32 parity with transformers on the default model: how many prompts give identical tokens.

Prompts: the first turn of the first N Spec-Bench questions per category (default 4 x 6 = 24),
through the chat template; greedy, --max-tokens new tokens (stopping at EOS like HF).

    python scripts/parity_hf.py [--per-category 4] [--max-tokens 64] [--data ../shared/data/spec_bench/question.jsonl]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastdecode import LLM, SamplingParams
from fastdecode.weights import default_model_path


def prompts(path: Path, per_category: int) -> list[str]:
    taken: dict[str, int] = {}
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if taken.get(row["category"], 0) < per_category:
            taken[row["category"]] = taken.get(row["category"], 0) + 1
            out.append(row["turns"][0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "../shared/data/spec_bench/question.jsonl"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    llm = LLM(dtype="float32", threads=args.threads, max_model_len=4096)
    path = Path(default_model_path())
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    same = 0
    texts = prompts(Path(args.data), args.per_category)
    for i, text in enumerate(texts):
        ids = llm.apply_chat_template([{"role": "user", "content": text}])
        ours = llm.generate(ids, SamplingParams(max_tokens=args.max_tokens, temperature=0))[0].token_ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=llm.eos_ids)
        ref = ref[0, len(ids):].tolist()
        same += ours == ref
        first = next((j for j, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        print(f"prompt {i:2d}: {'identical' if ours == ref else f'differs at token {first}'} ({len(ours)} tokens)")
    print(f"greedy fp32 token-identical to transformers: {same}/{len(texts)} prompts")


if __name__ == "__main__":
    main()
