"""How often a model draft's first token equals the target's, per Spec-Bench category.

For each prompt (first turn only), the target decodes greedily; then every candidate layer set of
`layerskip` and the early-exit `draft` predicts each output token from the target's own KV cache
of everything before it, as those drafters do, and we count top-1 agreement with the target. This
is the acceptance rate of a chain's first node, whatever the drafters' gates decide to draft.

    python scripts/draft_agreement.py --dtype int4 --limit 5 --max-new-tokens 128 --threads 2
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from fastdecode import LLM, SamplingParams
from fastdecode.bench.data import CATEGORIES, DEFAULT_HUMANEVAL, DEFAULT_SPEC_BENCH, load_prompts
from fastdecode.drafters.model import exit_candidates, skip_candidates
from fastdecode.llm import DTYPES

CHUNK = 64  # queries per masked forward (its mask is [queries, cache + queries])


def agreement(llm: LLM, prompt_ids: list[int], output: list[int], layers: tuple[int, ...]) -> tuple[int, int]:
    """(matches, predictions): the draft at each output position sees the target's cache before it."""
    model, full = llm.model, prompt_ids + output
    cache = model.new_cache()
    model(torch.tensor(full), torch.arange(len(full)), cache)
    cache.append(len(full))
    # query i is the token before output i, at its own position, seeing the target's cache before
    # that position plus its own fresh entry: one masked forward per chunk, over the chosen layers
    queries = list(range(len(prompt_ids) - 1, len(full) - 1))
    hits = 0
    for start in range(0, len(queries), CHUNK):
        chunk = queries[start : start + CHUNK]
        mask = torch.zeros(len(chunk), cache.length + len(chunk), dtype=torch.bool)
        for row, pos in enumerate(chunk):
            mask[row, :pos] = True
            mask[row, cache.length + row] = True
        logits = model(torch.tensor([full[p] for p in chunk]), torch.tensor(chunk), cache, mask, layers=layers)
        hits += sum(int(a == full[p + 1]) for a, p in zip(logits.argmax(-1).tolist(), chunk))
    return hits, len(queries)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="int4", choices=DTYPES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=5, help="prompts per category")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--data", default=DEFAULT_SPEC_BENCH)
    p.add_argument("--humaneval", default=DEFAULT_HUMANEVAL)
    args = p.parse_args()
    llm = LLM(dtype=args.dtype, threads=args.threads)
    n = llm.config.num_layers
    sets = {f"skip {n - len(s)} of {n}": s for s in skip_candidates(n)}
    sets |= {f"exit after {len(s)}": s for s in exit_candidates(n)}
    prompts, _ = load_prompts(args.data, args.humaneval, list(CATEGORIES), args.limit)
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0)
    for prompt in prompts:
        ids = llm.apply_chat_template([{"role": "user", "content": prompt.turns[0]}])
        output = llm.generate(ids, params)[0].token_ids
        for name, layers in sets.items():
            hits, total = agreement(llm, ids, output, layers)
            for key in (prompt.category, "overall"):
                counts[name][key][0] += hits
                counts[name][key][1] += total
    columns = list(CATEGORIES) + ["overall"]
    print("| layers run | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name in sets:
        cells = [f"{counts[name][c][0] / max(counts[name][c][1], 1):.2f}" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
