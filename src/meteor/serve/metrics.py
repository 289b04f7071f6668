"""What the server counts: Prometheus metrics (``prometheus_client``) at ``/metrics``, and the same
counts as JSON at ``/stats`` (or ``/metrics?format=json``).

Names follow vLLM's (``vllm:`` there, ``meteor:`` here), so dashboards built for one read the other:

- ``meteor:num_requests_running`` / ``meteor:num_requests_waiting`` (gauges): requests in a batch
  now / waiting for one.
- ``meteor:time_to_first_token_seconds``, ``meteor:e2e_request_latency_seconds`` (histograms):
  from the HTTP request's arrival (image decoding included) to its first answer token / its end.
- ``meteor:request_queue_time_seconds`` (histogram): from the queue to the start of its batch.
- ``meteor:batch_size`` (histogram): requests per batch the model generated.
- ``meteor:prompt_tokens_total``, ``meteor:visual_tokens_total`` (the image tokens among the prompt
  tokens), ``meteor:completion_tokens_total`` (counters), for requests the model ran.
- ``meteor:request_success_total{finished_reason="stop"|"length"}``: requests answered;
  ``meteor:request_failure_total{reason="timeout"|"cancelled"|"error"}``: requests the model took
  that ended otherwise (past ``--request-timeout``, their client gone, the model failed).
- ``meteor:http_errors_total{status}``: error responses by HTTP status (4xx refusals and 5xx).
- ``meteor:warmup_seconds`` (gauge) and the server process's own ``process_*`` metrics; with the
  model in its own process, that process's as ``meteor_worker_process_*``.

Every series exists from the start, at 0. A request that ends with a timeout is never counted as
answered.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter as PromCounter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from meteor.serve.engine import Message, Ticket

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
SUCCESS = ("stop", "length")
FAILURE = ("timeout", "cancelled", "error")
STATUSES = (400, 401, 404, 405, 408, 413, 415, 429, 500, 503)
"""The error statuses the server answers, each counted from 0 (others are added when they occur)."""
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's counts, fed by the HTTP side (``http_error``) and by the engine's messages
    (``on_message``, which ``meteor.serve.engine.Engine`` calls in its thread)."""

    def __init__(self, max_batch_size: int, visual_tokens: Callable[[list[int]], int],
                 counts: Callable[[], tuple[int, int]], worker_pid: Callable[[], int | None] | None = None):
        self.visual_tokens = visual_tokens
        self.registry = registry = CollectorRegistry()
        self.running = Gauge("meteor:num_requests_running", "Requests in a batch the model is generating.",
                             registry=registry)
        self.waiting = Gauge("meteor:num_requests_waiting", "Requests waiting for a batch.", registry=registry)
        self.running.set_function(lambda: counts()[1])
        self.waiting.set_function(lambda: counts()[0])
        self.ttft = Histogram("meteor:time_to_first_token_seconds", "From a request's arrival to its first "
                              "answer token.", buckets=LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("meteor:e2e_request_latency_seconds", "From a request's arrival to its end.",
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.queue = Histogram("meteor:request_queue_time_seconds", "From the queue to the start of the "
                               "request's batch.", buckets=LATENCY_BUCKETS, registry=registry)
        self.batch = Histogram("meteor:batch_size", "Requests per generated batch.",
                               buckets=_batch_buckets(max_batch_size), registry=registry)
        self.prompt_tokens = PromCounter("meteor:prompt_tokens", "Prompt tokens (visual ones included) of the "
                                         "requests the model ran.", registry=registry)
        self.visual = PromCounter("meteor:visual_tokens", "Visual tokens among the prompt tokens.", registry=registry)
        self.completion_tokens = PromCounter("meteor:completion_tokens", "Answer tokens generated.",
                                             registry=registry)
        self.success = PromCounter("meteor:request_success", "Requests answered, by why the answer ended.",
                                   ["finished_reason"], registry=registry)
        self.failure = PromCounter("meteor:request_failure", "Requests the model took that ended without "
                                   "their answer: past --request-timeout, client gone, model error.",
                                   ["reason"], registry=registry)
        self.errors = PromCounter("meteor:http_errors", "Error responses, by HTTP status.", ["status"],
                                  registry=registry)
        self.warmup = Gauge("meteor:warmup_seconds", "How long the model's warm-up generate took.", registry=registry)
        for reason in SUCCESS:
            self.success.labels(reason)
        for reason in FAILURE:
            self.failure.labels(reason)
        for status in STATUSES:
            self.errors.labels(str(status))
        ProcessCollector(registry=registry)
        if worker_pid is not None:
            ProcessCollector(namespace="meteor_worker", pid=lambda: worker_pid() or "self", registry=registry)
        self._lock = threading.Lock()
        self._counts: Counter = Counter({name: 0 for name in JSON_COUNTS})
        self._batch_sizes: Counter = Counter()
        self._batch_seconds: float | None = None

    # --- feeding -------------------------------------------------------------------------------------
    def on_message(self, message: Message, ticket: Ticket | None) -> None:
        kind = message[0]
        if kind == "batch":
            size, seconds = message[1], message[3]
            self.batch.observe(size)
            with self._lock:
                self._batch_sizes[size] += 1
                self._batch_seconds = seconds if self._batch_seconds is None else \
                    0.8 * self._batch_seconds + 0.2 * seconds
            return
        if kind == "ready":
            self.warmup.set(message[1] or 0.0)
            return
        if ticket is None:
            return
        if kind == "started":
            self.queue.observe(max(ticket.started - ticket.submitted, 0.0))
        elif kind == "first":
            self.ttft.observe(max(ticket.first_token - ticket.arrived, 0.0))
        elif kind in ("done", "error"):
            self._finished(ticket)

    def _finished(self, ticket: Ticket) -> None:
        self.e2e.observe(max((ticket.ended or ticket.arrived) - ticket.arrived, 0.0))
        reason = ticket.finish_reason
        with self._lock:
            if ticket.started is not None:
                prompt = len(ticket.spec.prompt_ids)
                visual = self.visual_tokens(ticket.spec.prompt_ids)
                self.prompt_tokens.inc(prompt)
                self.visual.inc(visual)
                self.completion_tokens.inc(ticket.completion_tokens)
                self._counts.update(prompt_tokens=prompt, visual_tokens=visual,
                                    completion_tokens=ticket.completion_tokens)
            if reason in SUCCESS:
                self.success.labels(reason).inc()
                self._counts["answered"] += 1
            else:
                self.failure.labels(reason if reason in FAILURE else "error").inc()
                self._counts[{"timeout": "timeouts", "cancelled": "cancelled"}.get(reason, "failed")] += 1

    def submitted(self) -> None:
        with self._lock:
            self._counts["requests"] += 1

    def http_error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()
        if status == 429:
            with self._lock:
                self._counts["rejected_queue_full"] += 1

    # --- reading -------------------------------------------------------------------------------------
    def recent_batch_seconds(self) -> float:
        """How long recent batches took (a moving average; 1 s before the first)."""
        with self._lock:
            return 1.0 if self._batch_seconds is None else self._batch_seconds

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)

    def json(self, **extra: Any) -> dict[str, Any]:
        """The counts as JSON: the server's settings and state (``extra``), then the counts."""
        with self._lock:
            sizes = dict(sorted(self._batch_sizes.items()))
            counts = dict(self._counts)
        batches = sum(sizes.values())
        return {**extra, "batches": batches, "batch_sizes": sizes,
                "mean_batch_size": round(sum(k * v for k, v in sizes.items()) / batches, 3) if batches else None,
                **counts}


JSON_COUNTS = ("requests", "answered", "timeouts", "cancelled", "failed", "rejected_queue_full", "prompt_tokens",
               "visual_tokens", "completion_tokens")
"""The JSON view's counts, each from 0: ``requests`` given to the model, then how they ended
(``answered``: an end token, a stop string or their length), 429s, and tokens."""


def _batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    sizes = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, max_batch_size}
    return tuple(float(s) for s in sorted(sizes) if s <= max_batch_size)
