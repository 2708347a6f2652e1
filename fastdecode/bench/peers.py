"""Runners: our decoding methods and the peers (HF transformers, llama.cpp) behind one interface.

A runner takes prompt token ids and returns a `Generation`: the tokens it produced and when.
Every runner gets the same ids (one chat template, applied once by the harness), decodes
greedily, and stops at max_new_tokens or at an end-of-sequence token, which it keeps, as
fastdecode does.

Timing, the same for all: `ttft_s` runs from the call to the first emitted token (prefill and
the first sample, plus the library's own setup), `decode_s` from there to the last token,
`e2e_s` is the whole call. `first_tokens` says how many tokens the first step emitted: 1
for AR, possibly more for HF prompt lookup, whose first forward verifies a draft along with
the prompt. `steps` counts target forwards after the first one (None where unknown), so
tau = (tokens - first_tokens) / steps is measured the same way for every runner.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fastdecode.llm import LLM
from fastdecode.sampling import SamplingParams

PEERS = ("hf", "hf-pld", "llamacpp", "llamacpp-pld")
PROMPT_LOOKUP_TOKENS = 10  # draft length of the prompt-lookup peers (HF's and llama.cpp's knob)


@dataclass
class Generation:
    token_ids: list[int]
    finish_reason: str  # "stop" (an end-of-sequence token) | "length"
    ttft_s: float
    decode_s: float
    e2e_s: float
    first_tokens: int = 1
    steps: int | None = None

    @property
    def decode_tokens(self) -> int:
        return len(self.token_ids) - self.first_tokens


class Runner(Protocol):
    name: str
    kind: str  # "method" (ours) | "peer"

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Generation: ...


def finish_reason(token_ids: list[int], eos_ids: list[int]) -> str:
    return "stop" if token_ids and token_ids[-1] in eos_ids else "length"


def cut_at_eos(token_ids: list[int], eos_ids: list[int]) -> list[int]:
    """Tokens up to and including the first end-of-sequence token.

    HF's assisted decoding can accept a draft that runs past an EOS (its stop check looks
    at the last token only); AR would never have produced those tokens, so they don't count.
    """
    for i, token in enumerate(token_ids):
        if token in eos_ids:
            return token_ids[: i + 1]
    return token_ids


class MethodRunner:
    """One fastdecode method through the public `LLM` API (the ids are the chat template's)."""

    kind = "method"

    def __init__(self, llm: LLM, method: str, sampling: dict[str, Any] | None = None) -> None:
        self.llm, self.name = llm, method
        self.sampling = sampling or {"temperature": 0.0}  # the same for every method, seed included

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        params = SamplingParams(max_tokens=max_new_tokens, ignore_eos=False, **self.sampling)
        start = time.perf_counter()
        out = self.llm.generate(prompt_ids, params, method=self.name)[0]
        e2e = time.perf_counter() - start
        m = out.metrics
        return Generation(
            list(out.token_ids), out.finish_reason or "length", m.prefill_s, m.decode_s, e2e, 1, m.steps
        )


class _TokenClock:
    """An HF StoppingCriteria that never stops generation; it timestamps every step instead."""

    def __init__(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len
        self.times: list[float] = []
        self.lengths: list[int] = []  # generated tokens after each step

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.times.append(time.perf_counter())
        self.lengths.append(input_ids.shape[1] - self.prompt_len)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class HFRunner:
    """HF transformers `generate`, greedy; with `prompt_lookup` it is HF's prompt lookup decoding."""

    kind = "peer"

    def __init__(self, name: str, model: Any, eos_ids: list[int], prompt_lookup: int | None = None) -> None:
        self.name, self.model, self.eos_ids, self.prompt_lookup = name, model, eos_ids, prompt_lookup

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        from transformers import GenerationConfig, StoppingCriteriaList

        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.eos_ids,
            pad_token_id=self.eos_ids[0], prompt_lookup_num_tokens=self.prompt_lookup,
        )
        tokens = torch.tensor([prompt_ids], dtype=torch.long)
        clock = _TokenClock(len(prompt_ids))
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                tokens, attention_mask=torch.ones_like(tokens), generation_config=config,
                stopping_criteria=StoppingCriteriaList([clock]),
            )
        end = time.perf_counter()
        ids = cut_at_eos(out[0, len(prompt_ids) :].tolist(), self.eos_ids)[:max_new_tokens]
        first = clock.times[0] if clock.times else end
        return Generation(
            ids, finish_reason(ids, self.eos_ids), first - start, end - first, end - start,
            min(clock.lengths[0], len(ids)) if clock.lengths else len(ids), max(len(clock.times) - 1, 0),
        )


def load_hf_model(model_path: str, dtype: torch.dtype) -> Any:
    """The same checkpoint in transformers: a GGUF file (dequantized by HF) or a HF folder."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # per-call generation-flag warnings would drown the progress bar
    path = Path(model_path)
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval()


class LlamaCppRunner:
    """llama-cpp-python on the same GGUF file, greedy; optionally with its prompt-lookup drafter."""

    kind = "peer"

    def __init__(self, name: str, llama: Any, eos_ids: list[int]) -> None:
        self.name, self.llama, self.eos_ids = name, llama, eos_ids
        self.evals = 0
        self._count_evals(llama)

    def _count_evals(self, llama: Any) -> None:
        """Count target forwards: `Llama.generate` runs one `eval` per step (prompt, then each draft)."""
        evaluate: Callable[[Any], None] = llama.eval

        def counting_eval(tokens: Any) -> None:
            self.evals += 1
            evaluate(tokens)

        llama.eval = counting_eval

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        self.llama.reset()  # no prefix reuse from the previous request: every runner prefills in full
        self.evals = 0
        ids: list[int] = []
        start = time.perf_counter()
        first = start
        stream = self.llama.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
        for token in stream:
            ids.append(int(token))
            if len(ids) == 1:
                first = time.perf_counter()
            if ids[-1] in self.eos_ids or len(ids) >= max_new_tokens:
                break
        stream.close()
        end = time.perf_counter()
        return Generation(
            ids, finish_reason(ids, self.eos_ids), first - start, end - first, end - start, 1,
            max(self.evals - 1, 0),
        )


def load_llamacpp(model_path: str, threads: int, n_ctx: int, prompt_lookup: int | None) -> Any:
    """A llama.cpp `Llama` (raises ImportError when llama-cpp-python is not installed)."""
    from llama_cpp import Llama

    if Path(model_path).suffix.lower() != ".gguf":
        raise ValueError(f"llama.cpp needs a .gguf file, not {model_path!r}")
    draft = None
    if prompt_lookup:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=prompt_lookup)
    # With a draft model llama-cpp-python keeps logits for every position, but it sizes that
    # buffer by the logits_all argument: without logits_all=True prompts over n_batch overflow it.
    return Llama(
        model_path=model_path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
        draft_model=draft, logits_all=draft is not None, verbose=False,
    )


def build_peers(
    names: list[str], llm: LLM, dtype: torch.dtype, threads: int, n_ctx: int
) -> tuple[list[Runner], list[str]]:
    """Runners for the named peers, and a note for each peer that cannot run here."""
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ValueError(f"unknown peers {unknown}; valid: {', '.join(PEERS)}")
    runners: list[Runner] = []
    notes: list[str] = []
    hf_model = None
    for name in names:
        pld = PROMPT_LOOKUP_TOKENS if name.endswith("-pld") else None
        if name.startswith("hf"):
            hf_model = hf_model if hf_model is not None else load_hf_model(llm.model_path, dtype)
            runners.append(HFRunner(name, hf_model, llm.eos_ids, pld))
            continue
        try:
            runners.append(LlamaCppRunner(name, load_llamacpp(llm.model_path, threads, n_ctx, pld), llm.eos_ids))
        except ImportError:
            notes.append(f"peer {name} skipped: llama-cpp-python is not installed (pip install llama-cpp-python)")
        except ValueError as exc:
            notes.append(f"peer {name} skipped: {exc}")
    return runners, notes
