"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

Latencies are observed on the engine thread as updates are produced, so they do not include the
hop to the event loop. Inter-token latency: a step that emits k tokens after a gap of t seconds
counts as k observations of t / k (speculative steps emit several tokens at once).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fastdecode.batch import BatchEngine, Request, Update

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, engine: BatchEngine) -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("fastdecode_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fastdecode_inter_token_latency_seconds", "Time between generated tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("fastdecode_e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("fastdecode_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated = Counter("fastdecode_generation_tokens", "Generated tokens", registry=r)
        self.drafted = Counter("fastdecode_drafted_tokens", "Draft tokens sent to the target model", registry=r)
        self.accepted = Counter("fastdecode_accepted_tokens", "Draft tokens accepted (bonus tokens excluded)",
                                registry=r)
        self.requests = Counter("fastdecode_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        running = Gauge("fastdecode_requests_running", "Requests in the running batch", registry=r)
        running.set_function(lambda: engine.num_running)
        waiting = Gauge("fastdecode_requests_waiting", "Requests waiting to join the batch", registry=r)
        waiting.set_function(lambda: engine.num_waiting)

    def observe(self, request: Request, update: Update, last: float | None) -> float:
        """Record one update of `request`; `last` is the time of its previous tokens (None before
        the first). Returns the new `last`."""
        if update.new_tokens:
            if last is None:
                self.ttft.observe(update.time - request.submitted)
                self.prompt_tokens.inc(len(request.prompt_ids))
            else:
                gap = (update.time - last) / update.new_tokens
                for _ in range(update.new_tokens):
                    self.itl.observe(gap)
            self.generated.inc(update.new_tokens)
            last = update.time
        if update.done:
            m = update.output.metrics
            self.e2e.observe(update.time - request.submitted)
            self.drafted.inc(m.drafted)
            self.accepted.inc(max(0, m.tokens - 1 - m.steps))
            self.requests.labels(update.error and "error" or update.output.finish_reason or "unknown").inc()
        return last
