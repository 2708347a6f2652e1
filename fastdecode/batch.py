"""Continuous batching: every running request shares each target forward.

One engine thread owns the model (its own, from start(), or the caller's, in run()). Between
steps, waiting requests join the running batch (up to `max_batch`) and finished or cancelled
ones leave it, giving back their KV cache. One step:

    every running request: its drafter proposes a tree ([root] + tree), or its prompt (prefill)
      --> ONE model.forward_batch over all of those segments
      --> per request: verify with its own Sampler, cache.keep, drafter.update, text delta

The per-request half is engine.py's own (`propose`, `tree_segment`, `commit_step`), and the
forward is bitwise independent of a request's batch mates (see `Transformer.forward_batch`), so
each request gets exactly the tokens `LLM.generate` gives it alone. Results reach the caller
through the request's `on_update`, called on the engine thread (the server hops them onto its
event loop).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastdecode.drafters import check_method
from fastdecode.drafters.base import Drafter, DraftRequest
from fastdecode.engine import check_prompt, commit_prefill, commit_step, prefill_segment, propose, start_prefill, tree_segment
from fastdecode.kv_cache import KVCache
from fastdecode.llm import LLM
from fastdecode.model import Segment
from fastdecode.output import RequestOutput, TextTracker
from fastdecode.sampling import Sampler, SamplingParams
from fastdecode.tree import DraftTree


class QueueFullError(RuntimeError):
    """More requests are waiting than the engine was told to hold."""


@dataclass
class Update:
    """What one step did for one request (the last one has `done` set)."""

    text: str  # new text: never half a UTF-8 character nor text that may still become a stop string
    new_tokens: int  # tokens emitted by this step
    output: RequestOutput  # the request so far (finish_reason set when done)
    time: float  # time.perf_counter() when the step ended
    done: bool = False
    error: str | None = None  # set when the engine failed on this request (the server answers 500)


@dataclass(eq=False)  # compared by identity
class Request:
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    method: str
    on_update: Callable[[Update], None]  # called on the engine thread; must not block
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating for this request (safe from any thread); its cache is freed before the next step."""
        self.cancelled = True


@dataclass(eq=False)
class _Running:
    request: Request
    out: RequestOutput
    tracker: TextTracker
    sampler: Sampler
    drafter: Drafter
    cache: KVCache
    prefilled: bool = False


class BatchEngine:
    def __init__(self, llm: LLM, max_batch: int = 8, max_waiting: int = 64, prefill_chunk: int = 128) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} must be an integer >= 1")
        if not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting={max_waiting!r} must be an integer >= 0")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk!r} must be an integer >= 1")
        self.llm, self.max_batch, self.max_waiting = llm, max_batch, max_waiting
        # a long prompt joins this many tokens per step, so running requests keep getting tokens while
        # it prefills (chunked prefill; bit-exact when the model has exact rows, else whole prompts)
        self.prefill_chunk = prefill_chunk if llm.model.exact_rows else None
        self.tokenizer_lock = threading.Lock()  # the HF tokenizer is shared by the engine and callers
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[_Running] = []
        self._free_caches: list[KVCache] = []  # grows up to max_batch, then is reused
        self._idle_drafters: dict[str, list[Drafter]] = {}  # drafters keep memory across requests
        self._stopping = False
        self._looping = False  # the loop runs (on its own thread, or on the caller's in run())
        self._thread = threading.Thread(target=self._loop, name="fastdecode-engine", daemon=True)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._looping

    @property
    def num_caches(self) -> int:
        """KV caches allocated so far (never more than max_batch)."""
        return len(self._free_caches) + len(self._running)

    def start(self) -> "BatchEngine":
        """Run the loop on a thread of its own."""
        self._looping = True
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the loop on the calling thread until stop() (from another thread).

        Forwards are 2-3x slower on a thread other than the one that loaded the model and ran its
        first forwards (OpenMP keeps a thread pool per thread that starts parallel regions; measured
        in docs/server.md), so `fastdecode serve` runs the engine here, on the main thread."""
        self._looping = True
        self._loop()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def encode(self, prompt: str | list[int]) -> tuple[str, list[int]]:
        """(text, token ids) of a prompt given as text or token ids; raises ValueError if it cannot run."""
        with self.tokenizer_lock:
            if isinstance(prompt, str):
                text, ids = prompt, self.llm.tokenizer.encode(prompt, add_special_tokens=True)
            else:
                ids = list(prompt)
                check_prompt(ids, self.llm.model.max_len, self.llm.config.vocab_size)
                text = self.llm.tokenizer.decode(ids)
        check_prompt(ids, self.llm.model.max_len, self.llm.config.vocab_size)
        return text, ids

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        with self.tokenizer_lock:
            return self.llm.apply_chat_template(messages)

    def submit(self, request: Request) -> Request:
        """Queue a request; raises ValueError for a bad one, QueueFullError when too many wait."""
        check_method(request.method)
        check_prompt(request.prompt_ids, self.llm.model.max_len, self.llm.config.vocab_size)
        with self._cond:
            if not self.alive or self._stopping:
                raise RuntimeError("the engine is not running")
            free_slots = max(0, self.max_batch - len(self._running))
            waiting = sum(not r.cancelled for r in self._waiting)
            if waiting >= self.max_waiting + free_slots:
                raise QueueFullError(
                    f"{waiting} requests are already waiting (limit {self.max_waiting}); retry later"
                )
            self._waiting.append(request)
            self._cond.notify()
        return request

    def _loop(self) -> None:
        try:
            self._loop_steps()
        finally:
            self._looping = False

    def _loop_steps(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    break
                self._waiting = deque(r for r in self._waiting if not r.cancelled)
                self._leave([seq for seq in self._running if seq.request.cancelled])
                while self._waiting and len(self._running) < self.max_batch:
                    self._running.append(self._join(self._waiting.popleft()))
            if self._running:
                try:
                    self._step()
                except Exception as exc:  # a bug, not bad input (that is refused in submit): fail the batch
                    self._fail_all(f"{type(exc).__name__}: {exc}")

    def _join(self, request: Request) -> _Running:
        cache = self._take_cache(request.prompt_ids)
        idle = self._idle_drafters.setdefault(request.method, [])
        drafter = idle.pop() if idle else self.llm.new_drafter(request.method)
        out = RequestOutput(request.prompt, list(request.prompt_ids))
        tracker = TextTracker(self.llm.tokenizer, request.params, self.llm.eos_ids, out)
        sampler = Sampler(request.params, request.prompt_ids, self.llm.config.vocab_size)
        start_prefill(cache, request.prompt_ids, self.llm.prefix_cache, out)
        drafter.begin(list(request.prompt_ids), DraftRequest(sampler, cache))
        return _Running(request, out, tracker, sampler, drafter, cache)

    def _take_cache(self, prompt_ids: list[int]) -> KVCache:
        """A free cache, the one sharing the longest prefix with the prompt when prefixes are reused
        (a new one while none is free: the pool grows to max_batch)."""
        if not self._free_caches:
            return self.llm.model.new_cache()
        best = max(range(len(self._free_caches)), key=lambda i: self._free_caches[i].shared(prompt_ids))
        return self._free_caches.pop(best)

    def _leave(self, done: list[_Running]) -> None:
        """Remove requests from the batch, giving back their cache and drafter."""
        for seq in done:
            self._running.remove(seq)
            seq.drafter.end(list(seq.out.token_ids))
            self._idle_drafters[seq.request.method].append(seq.drafter)
            seq.cache.remember(seq.out.prompt_token_ids + seq.out.token_ids)
            self._free_caches.append(seq.cache)

    def draft_budget(self, running: int, method: str) -> int:
        """Draft nodes per request of `method` when `running` requests share a step: the LLM's
        budget for the method split between them. Alone, a draft node rides on a forward that reads
        all the weights anyway; in a batch the rows already keep the matmuls busy, so each node
        costs nearly a full row (int4, 8 requests: 1 row each 24.6 ms, 4 rows each 89 ms) for well
        under one token."""
        return self.llm.budget(method) // max(running, 1)

    def _step(self) -> None:
        segments: list[Segment] = []
        plans: list[tuple[_Running, int, DraftTree] | None] = []  # None: a prefill chunk
        finished: list[_Running] = []
        for seq in self._running:
            if not seq.prefilled:
                segments.append(prefill_segment(seq.out.prompt_token_ids, seq.cache, self.prefill_chunk))
                plans.append(None)
                continue
            room = seq.cache.max_len - seq.cache.length - 1  # slots left beside the root's
            if room < 0:
                seq.tracker.finish("length")
                finished.append(seq)
                continue
            tree = propose(seq.drafter, seq.out, self.draft_budget(len(self._running), seq.request.method), room)
            root = seq.out.token_ids[-1]
            segments.append(tree_segment(root, tree, seq.cache))
            plans.append((seq, root, tree))
        busy = [seq for seq in self._running if seq not in finished]
        logits = self.llm.model.forward_batch(segments)
        with self.tokenizer_lock:
            for seq in finished:  # out of context room
                self._publish(seq, 0, True)
            for seq, plan, rows, segment in zip(busy, plans, logits, segments):
                before = len(seq.out.token_ids)
                try:
                    if plan is None and seq.cache.length + len(segment.tokens) < len(seq.out.prompt_token_ids):
                        seq.cache.append(len(segment.tokens))  # a prefill chunk, more to come
                        continue
                    if plan is None:
                        seq.prefilled = True
                        done = commit_prefill(rows, seq.sampler, seq.tracker, seq.cache)
                    else:
                        done = commit_step(rows, plan[1], plan[2], seq.sampler, seq.tracker, seq.drafter, seq.cache)
                except Exception as exc:  # this request's sampling failed: fail it alone
                    finished.append(seq)
                    self._publish(seq, 0, True, f"{type(exc).__name__}: {exc}")
                    continue
                if done:
                    finished.append(seq)
                self._publish(seq, len(seq.out.token_ids) - before, done)
        self._leave(finished)

    def _publish(self, seq: _Running, new_tokens: int, done: bool, error: str | None = None) -> None:
        text = "" if error else seq.tracker.delta()
        update = Update(text, new_tokens, seq.out, time.perf_counter(), done, error)
        try:
            seq.request.on_update(update)
        except Exception:  # the consumer is gone (e.g. its event loop closed): stop working for it
            seq.request.cancel()

    def _fail_all(self, message: str) -> None:
        for seq in list(self._running):
            update = Update("", 0, seq.out, time.perf_counter(), True, message)
            try:
                seq.request.on_update(update)
            except Exception:
                pass
            seq.cache.truncate(0)
        self._leave(list(self._running))
