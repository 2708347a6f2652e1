"""LLM: the public entry point, shaped like vLLM's (`generate`, `chat`) plus `stream`."""
from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdecode.drafters import METHODS, check_method
from fastdecode.cost import CostCurve
from fastdecode.drafters.base import Drafter, DrafterEnv
from fastdecode.drafters.head import DraftHead, load_head
from fastdecode.drafters.recycling import TABLE_K, TABLE_PREFIX, model_successors
from fastdecode.drafters.suffix import SuffixTrie, load_datastore
from fastdecode.engine import Engine
from fastdecode.kernels import amx_bf16
from fastdecode.model import MATRIX_DTYPES, Transformer, build_model
from fastdecode.quant import QUANT_DTYPES, Blocks
from fastdecode.output import RequestOutput
from fastdecode.sampling import SamplingParams
from fastdecode.weights import cache_root, default_model_path, file_key, load_checkpoint

# weight storage: bf16 / fp32 matrices, or ggml-style blocks (see quant.py); activations are fp32 in all
DTYPES = tuple(MATRIX_DTYPES)
DEFAULT_MAX_MODEL_LEN = 8192
# generate / chat / stream, the CLI and the server decode with `auto` unless told otherwise: the
# fastest method of `fastdecode bench` greedy and sampled (docs/bench/avx512-bf16-greedy-final and
# avx512-bf16-sampled-final), and lossless like every method
DEFAULT_METHOD = "auto"

# draft nodes a step at most. With the bf16 weights prefetched into L2, a tree of up to ~6 nodes
# costs little more than a one-token step on the AVX512-BF16 EPYC and each node past that ~8 %
# more: interleaved in one process (28 Spec-Bench prompts, greedy), `auto` at 6 nodes 2.58x / 2.50x
# our AR against 2.31-2.45x at 8 (a larger tree's higher tau did not pay for its nodes)
DEFAULT_DRAFT_BUDGET = 6
# bf16 on a CPU with AMX (Xeon Sapphire Rapids; the matrices packed for the tile unit, scores and
# most weighted sums of attention on it too): a 16-token forward over 512 cached tokens costs
# 1.24x a one-token one, not 2.52x. `auto` was as fast at budgets 6-16 there (2.20-2.24x our AR,
# 29 prompts interleaved) and its tau higher at 10-12 (3.36-3.45 against 2.88, 21 prompts): 12
# for the tau at the same speed (README, "bf16 on the AMX machine"). Now the single drafters'
AMX_DRAFT_BUDGET = 12
# `auto` there: since its acceptance statistics are kept apart by how many members agree on a
# node, its expected tokens a step match the tokens that come (1.97 against 1.97, sampled), so a
# larger budget only offers it nodes it can weigh. Interleaved A/B, 21 Spec-Bench prompts, 256
# tokens, 24 nodes (and deeper `suffix` chains, drafters.AUTO_MEMBER_OPTIONS) against 12: greedy
# 201.6 against 192.2 decode tok/s, sampled (T 0.7, top-p 0.9) 142.4 against 138.3. The single
# drafters are slower at 24 (aded 134.3 against 151.8, recycling 106.1 against 125.9; suffix the
# same): they keep AMX_DRAFT_BUDGET
AMX_AUTO_DRAFT_BUDGET = 24


def default_draft_budget(dtype: str, method: str = DEFAULT_METHOD) -> int:
    """The draft budget LLM takes for `method` when none is given: on CPUs with AMX-BF16 for bf16
    models (their matrices run on the tile unit) AMX_AUTO_DRAFT_BUDGET for `auto` and
    AMX_DRAFT_BUDGET for the rest, else DEFAULT_DRAFT_BUDGET."""
    if dtype == "bfloat16" and amx_bf16():
        return AMX_AUTO_DRAFT_BUDGET if method == "auto" else AMX_DRAFT_BUDGET
    return DEFAULT_DRAFT_BUDGET


Message = dict[str, str]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str = "bfloat16",
        threads: int | None = None,
        max_model_len: int | None = None,
        draft_budget: int | None = None,  # None: default_draft_budget(dtype, method) per method
        draft_model: str | None = None,
        prefix_cache: bool = True,
        draft_head: str | None = None,
        datastore: str | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; supported: {', '.join(DTYPES)}")
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads={threads!r} must be an integer >= 1")
            torch.set_num_threads(threads)
        if draft_budget is not None and (not isinstance(draft_budget, int) or draft_budget < 0):
            raise ValueError(f"draft_budget={draft_budget!r} must be an integer >= 0")
        self.model_path = model or default_model_path()
        blocks: dict[str, Blocks] | None = {} if dtype in QUANT_DTYPES else None
        self.config, state, self.tokenizer = load_checkpoint(self.model_path, blocks)
        limit = self.config.max_position_embeddings
        max_len = min(limit, DEFAULT_MAX_MODEL_LEN) if max_model_len is None else max_model_len
        if not 1 < max_len <= limit:
            raise ValueError(f"max_model_len={max_model_len} must be in [2, {limit}] (the model's context length)")
        self.dtype = dtype
        self.model = build_model(self.config, state, dtype, max_len, blocks)
        del state, blocks
        self.draft_budget = draft_budget  # None: each method's default (budget())
        self.eos_ids = sorted(set(self.config.eos_token_ids) | _tokenizer_eos(self.tokenizer))
        # a prompt that starts like the last one (a chat's next turn, a shared system prompt) reuses its
        # cached K/V; only where that is bit-exact (Transformer.exact_rows), so outputs never change
        self.engine = Engine(self.model, self.tokenizer, self.eos_ids, bool(prefix_cache) and self.model.exact_rows)
        self.draft_model_path = draft_model
        self._draft_model: Transformer | None = None
        if draft_head is not None and not os.path.isfile(draft_head):  # refused now, not at first use
            raise ValueError(f"draft head {draft_head} not found (train one with `fastdecode train-head`)")
        self.draft_head_path = draft_head
        self._draft_head: DraftHead | None = None
        # a corpus trie for `suffix` (and `auto`'s suffix member), shared by all their drafters;
        # built now (~9 s and ~0.8 GB per million corpus tokens here), so the first request does not wait
        self.datastore: SuffixTrie | None = None
        if datastore is not None:
            self.datastore = load_datastore(datastore, self.encode, self.config.vocab_size)
        self._drafters: dict[str, Drafter] = {}
        self._cost_curve: CostCurve | None = None
        self._successor_table: tuple[np.ndarray, np.ndarray] | None = None

    def generate(
        self, prompts: str | Sequence[str] | Sequence[list[int]], params: SamplingParams | None = None,
        method: str = DEFAULT_METHOD,
    ) -> list[RequestOutput]:
        """Complete each prompt (text, or a list of token ids)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        return [self._run_to_end(p, params, method) for p in prompts]

    def chat(
        self, conversations: list[Message] | list[list[Message]], params: SamplingParams | None = None,
        method: str = DEFAULT_METHOD,
    ) -> list[RequestOutput]:
        """Answer one conversation or a list of them, through the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        return [self._run_to_end(self.apply_chat_template(c), params, method) for c in conversations]

    def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None, method: str = DEFAULT_METHOD
    ) -> Iterator[str]:
        """Text deltas as they are decided; they never split a UTF-8 character or show a stop string."""
        for _, tracker in self._run(prompt, params, method):
            piece = tracker.delta()
            if piece:
                yield piece

    @property
    def prefix_cache(self) -> bool:
        """Whether prompts reuse a cached prefix (asked for, and the model has exact rows)."""
        return self.engine.prefix_cache

    def encode(self, text: str) -> list[int]:
        """The token ids of `text` alone (no BOS or other special tokens added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def apply_chat_template(self, messages: list[Message]) -> list[int]:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"chat message {m!r} must be a dict with 'role' and 'content'")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.model_path} has no chat template; use generate() with a plain prompt")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def info(self) -> dict[str, Any]:
        c = self.config
        params = sum(p.numel() for p in self.model.parameters())
        return {
            "model": self.model_path, "architecture": c.architecture, "layers": c.num_layers,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "heads": c.num_heads,
            "kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
            "context_length": self.model.max_len, "parameters": params,
            "weight_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
            "dtype": self.dtype, "threads": torch.get_num_threads(), "methods": list(METHODS),
        }

    def drafter(self, method: str) -> Drafter:
        """The drafter for `method`, created once per LLM so it can remember across requests."""
        check_method(method)
        if method not in self._drafters:
            self._drafters[method] = self.new_drafter(method)
        return self._drafters[method]

    def new_drafter(self, method: str) -> Drafter:
        """A fresh drafter for `method` (the batch engine keeps one per running request)."""
        check_method(method)
        return METHODS[method](self.drafter_env())

    def drafter_env(self) -> DrafterEnv:
        """What this LLM's drafters are built from: its model, cost curve, draft model, head, datastore."""
        return DrafterEnv(self.config, self.forward_cost, self.model, self.load_draft_model, self.load_draft_head,
                          lambda: self.datastore, self.successor_table)

    def successor_table(self) -> tuple[np.ndarray, np.ndarray]:
        """`recycling`'s starting matrix: every token's likeliest successors by this model (see
        recycling.model_successors; ~28 s for SmolLM2-135M in bf16 here), built on first use and cached
        on disk per model file, whatever the dtype (drafts only need the likeliest tokens)."""
        if self._successor_table is None:
            prefix = self.encode(TABLE_PREFIX)
            path = cache_root() / "recycling" / f"{file_key(self.model_path, f'{prefix}|{TABLE_K}')}.npz"
            self._successor_table = _load_table(path, self.config.vocab_size)
            if self._successor_table is None:
                print(f"fastdecode: scoring every token's successors for `recycling` (once for this model; "
                      f"cached in {path.parent})", file=sys.stderr)
                self._successor_table = model_successors(self.model, prefix, TABLE_K)
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(path, successors=self._successor_table[0], logits=self._successor_table[1])
                except OSError:
                    pass  # an unwritable cache only costs the rebuild next time
        return self._successor_table

    def load_draft_model(self) -> Transformer | None:
        """The separate draft model given as `draft_model` (loaded on first use), or None."""
        if self.draft_model_path is None or self._draft_model is not None:
            return self._draft_model
        blocks: dict[str, Blocks] | None = {} if self.dtype in QUANT_DTYPES else None
        config, state, tokenizer = load_checkpoint(self.draft_model_path, blocks)
        if config.vocab_size != self.config.vocab_size or tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(
                f"draft model {self.draft_model_path} does not share the target's tokenizer "
                f"(vocabularies of {config.vocab_size} and {self.config.vocab_size} tokens differ)"
            )
        self._draft_model = build_model(config, state, self.dtype, self.model.max_len, blocks)
        return self._draft_model

    def load_draft_head(self) -> DraftHead | None:
        """The trained draft head given as `draft_head` (loaded on first use), or None."""
        if self.draft_head_path is not None and self._draft_head is None:
            dtype = torch.float32 if self.dtype == "float32" else torch.bfloat16
            self._draft_head = load_head(self.draft_head_path, self.model, dtype)
        return self._draft_head

    def budget(self, method: str) -> int:
        """Draft nodes a step at most for `method`: the LLM's draft_budget, or the method's default."""
        return default_draft_budget(self.dtype, method) if self.draft_budget is None else self.draft_budget

    def forward_cost(self, n: int) -> float:
        """Measured time of an n-token forward over a 1-token one (measured on first use, cached on disk)."""
        if self._cost_curve is None:
            self._cost_curve = CostCurve.cached(self.model, f"{self.model_path}|{self.dtype}")
        return self._cost_curve(n)

    def _run(self, prompt: str | list[int], params: SamplingParams | None, method: str) -> Iterator[Any]:
        params = params or SamplingParams()
        drafter = self.drafter(method)
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            text, ids = self.tokenizer.decode(prompt), list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, not {type(prompt).__name__}")
        return self.engine.run(text, ids, params, drafter, self.budget(method))

    def _run_to_end(self, prompt: str | list[int], params: SamplingParams | None, method: str) -> RequestOutput:
        out = None
        for out, _ in self._run(prompt, params, method):
            pass
        assert out is not None
        return out


def _load_table(path: Path, vocab: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A cached successor table, or None when there is none or it is unreadable or of another shape
    (then it is built again and the file rewritten)."""
    try:
        with np.load(path) as saved:
            table = (saved["successors"], saved["logits"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    ok = table[0].shape == table[1].shape == (vocab, TABLE_K)
    return table if ok else None


def _tokenizer_eos(tokenizer: Any) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return set() if eos is None else {int(eos)}
