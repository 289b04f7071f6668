"""The model worker: one thread owns the model and answers requests in batches (in the server's
process, or in a process of its own: ``meteor.serve.engine``).

Requests wait in one bounded queue (``submit`` refuses one more with ``QueueFull``: the server
answers 429 instead of growing without limit). The worker takes the oldest waiting request and the
requests that can share its batch, up to ``max_batch_size``: it starts as soon as that many are
waiting, or once the oldest has waited ``batch_window`` seconds. A request that arrives alone
(nothing waiting, and no request in the window before it) starts at once: one client sending
requests back to back pays no window, and a busy server never waits. Requests share a batch when they have the same
visual tokens per view (K′: their prompts are laid out with it); their prompts, images, answer
lengths and decoding may all differ (each row samples with its own temperature, top-p and random
generator, or greedily: ``meteor.serve.streaming.RowSampler``). Within a batch every row ends on
its own (end token, its own ``max_tokens``, a stop string, its deadline, its client gone: within
one decode step), and its text streams out as it is generated
(``meteor.serve.streaming.generate_streamed``).

Each batch is logged ("batch of 8 …"), counted in ``stats()`` and reported to ``on_batch``. Before
serving, the worker warms up with one tiny generate, which compiles the CPU selective-scan kernel
on a machine that has not built it yet; ``ready`` is set after it (``/health`` reports healthy).

``load_model`` is the one place a served model is loaded.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from meteor.serve.streaming import AnswerStream, BatchTiming, Conversation, Sampling, generate_streamed
from meteor.serve.visualize import image_selections
from meteor.serve.protocol import APIError

log = logging.getLogger("meteor.serve")


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting requests already."""


def load_model(model_dir: str | os.PathLike):
    """The served model (in eval mode) and its processor, from a saved model folder."""
    from transformers.utils import logging as hf_logging

    from meteor.pretrained import load_pretrained

    hf_logging.disable_progress_bar()
    model, processor = load_pretrained(model_dir)
    model.eval()
    return model, processor


@dataclass(eq=False)
class JobSpec:
    """What one request asks of the model, in plain data (it crosses to a worker process)."""

    prompt_ids: list[int]
    images: list
    """The prompt's ``SlicedImage``s, in the order of their tags."""
    max_tokens: int
    stop: tuple[str, ...] = ()
    deadline: float | None = None
    """``time.monotonic()`` after which the answer ends as a timeout (one clock for every process
    of the machine)."""
    tokens_per_slice: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    want_selection: bool = False
    stream_text: bool = False
    """Send the text as it comes (a streamed answer); otherwise only the finished answer."""


@dataclass(eq=False)
class Job:
    """One request for the worker: a prompt laid out with K′ = ``tokens_per_slice``, its images,
    how to decode, and where its events go."""

    prompt_ids: list[int]
    images: list
    stream: AnswerStream
    """Carries the answer's length limit, stop strings, deadline and cancellation."""
    tokens_per_slice: int | None
    sampling: Sampling
    on_event: Callable[[tuple[str, Any]], None]
    """Called in the worker thread with ("started", job) when its batch starts, ("first", job) at
    its first token, ("text", piece) as text comes (when the stream has ``on_text``), and last
    ("done", job) (also when cancelled while waiting) or ("error", APIError)."""
    want_selection: bool = False
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None
    """``time.monotonic()`` when its batch started."""
    crowded: bool = True
    """Whether others were waiting or had just arrived when this one came (set by ``submit``):
    only then is it worth waiting the window for company."""
    selection: list | None = None
    """The images' ``ViewSelection``s (``want_selection``), image after image."""
    batch_size: int = 0
    """How many requests the batch that answered this one had."""
    timing: BatchTiming | None = None

    @classmethod
    def from_spec(cls, spec: JobSpec, tokenizer, on_event: Callable[[tuple[str, Any]], None]) -> "Job":
        """A job for ``spec``: its answer stream sends text only when ``spec.stream_text`` (each
        piece wakes whoever listens)."""
        stream = AnswerStream(tokenizer, spec.max_tokens, spec.stop, deadline=spec.deadline,
                              on_text=(lambda piece: on_event(("text", piece))) if spec.stream_text else None)
        return cls(spec.prompt_ids, spec.images, stream, spec.tokens_per_slice, spec.sampling, on_event,
                   want_selection=spec.want_selection)

    def key(self) -> tuple:
        """Requests with equal keys can share a batch: the same K′ (decoding is per row)."""
        return (self.tokens_per_slice,)


SELECTION_CACHE_BYTES = 256 << 20
"""Memory for the vision outputs of recent batches that reported a selection (least recently used
dropped first)."""


class BatchingWorker:
    def __init__(self, model, processor, max_batch_size: int = 8, batch_window: float = 0.015,
                 queue_size: int = 64, threads: int | None = None,
                 on_batch: Callable[[int, int, float], None] | None = None):
        if max_batch_size < 1 or queue_size < 1 or batch_window < 0:
            raise ValueError(f"max_batch_size and queue_size must be ≥ 1 and batch_window ≥ 0, got "
                             f"{max_batch_size}, {queue_size}, {batch_window}")
        self.model, self.processor = model, processor
        self.threads = threads if threads is not None else max(1, torch.get_num_threads() - 1)
        """Torch threads the worker thread generates with."""
        self.max_batch_size, self.batch_window, self.queue_size = max_batch_size, batch_window, queue_size
        self.ready = threading.Event()
        """Set once the warm-up generate is done."""
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.on_batch = on_batch
        """Called in the worker thread after each batch with (requests, new tokens, seconds)."""
        self._batch_sizes: Counter = Counter()
        self._counts = Counter({name: 0 for name in COUNTS})
        self._last_arrival: float | None = None
        self._busy = False
        self.warmup_seconds: float | None = None
        self._selection_cache = None
        """A ``FeatureCache`` in memory, made by the first batch that reports a selection."""

    # --- the request side ----------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; ``QueueFull`` when ``queue_size`` requests are waiting already."""
        with self._cond:
            if len(self._pending) >= self.queue_size:
                self._counts["rejected_queue_full"] += 1
                raise QueueFull(f"{len(self._pending)} requests are waiting, the most this server queues "
                                f"(meteor serve --queue-size); try again shortly")
            job.crowded = bool(self._pending) or (self._last_arrival is not None
                                                  and job.arrived - self._last_arrival <= self.batch_window)
            self._last_arrival = job.arrived
            self._pending.append(job)
            self._counts["requests"] += 1
            self._cond.notify()

    def stats(self) -> dict[str, Any]:
        """Counts since start (every count present from the start, at 0): ``answered`` are the
        requests that ended with their answer (an end token, a stop string or their length)."""
        with self._cond:
            sizes = dict(sorted(self._batch_sizes.items()))
            batches = sum(sizes.values())
            return {"ready": self.ready.is_set(), "queued": len(self._pending), "busy": self._busy,
                    "max_batch_size": self.max_batch_size, "batch_window_ms": self.batch_window * 1000,
                    "queue_size": self.queue_size, "threads": self.threads, "batches": batches, "batch_sizes": sizes,
                    "mean_batch_size": round(sum(k * v for k, v in sizes.items()) / batches, 3) if batches else None,
                    "warmup_seconds": self.warmup_seconds, **dict(self._counts)}

    # --- the thread ----------------------------------------------------------------------------
    def start(self, warmup: bool = True) -> "BatchingWorker":
        self._thread = threading.Thread(target=self._loop, args=(warmup,), name="meteor-model-worker", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self, warmup: bool) -> None:
        torch.set_num_threads(self.threads)
        if warmup:
            self._warm_up()
        self.ready.set()
        while True:
            try:
                batch = self._gather()
            except Exception as err:     # a bug here must not leave every request waiting forever
                log.exception("the worker's queue failed")
                self._fail_pending(err)
                continue
            if batch is None:
                return
            self._run(batch)

    def _fail_pending(self, err: Exception) -> None:
        with self._cond:
            jobs, self._pending = list(self._pending), deque()
            self._counts["failed"] += len(jobs)
        for job in jobs:
            job.on_event(("error", APIError(500, f"the worker's queue failed: {type(err).__name__}: {err}", None,
                                            "generation_failed", "server_error")))

    def _warm_up(self) -> None:
        """One tiny generate through the same path as the requests: it loads (or, once per
        machine, compiles) the CPU selective-scan kernel and fills the allocator's caches."""
        from PIL import Image

        started = time.perf_counter()
        log.info("warming up: one tiny generate (the first on a machine compiles the CPU selective-scan kernel, ~30 s)")
        size = self.processor.base_size
        image = self.processor.prepare_image(Image.new("RGB", (size, size), (128, 128, 128)))
        conversation = Conversation()
        conversation.ask("Describe the image.", [image], self.processor.config.image_token)
        stream = AnswerStream(self.processor.tokenizer, 2)
        with torch.no_grad():
            generate_streamed(self.model, self.processor, [(conversation.prompt_ids(self.processor), [image])], [stream])
        self.warmup_seconds = round(time.perf_counter() - started, 2)
        log.info("warm-up done in %.1f s: ready", self.warmup_seconds)

    def _gather(self) -> list[Job] | None:
        """Wait for the oldest request's batch (module docstring); None when closing."""
        with self._cond:
            while True:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return None
                self._drop_finished()
                if not self._pending:
                    continue
                oldest = self._pending[0]
                key = oldest.key()
                mates = [job for job in self._pending if job.key() == key][:self.max_batch_size]
                left = oldest.arrived + self.batch_window - time.monotonic() if oldest.crowded else 0.0
                if len(mates) >= self.max_batch_size or left <= 0:
                    for job in mates:
                        self._pending.remove(job)
                    self._busy = True
                    return mates
                self._cond.wait(left)

    def _drop_finished(self) -> None:
        """Requests cancelled or past their deadline while waiting leave the queue unanswered by
        the model (a timeout is reported to its client as an error, a cancellation as "done")."""
        for job in [job for job in self._pending if job.stream.check()]:
            self._pending.remove(job)
            if job.stream.finish_reason == "timeout":
                self._counts["timeouts"] += 1
                job.on_event(("error", APIError(408, "the request timed out while waiting for the model "
                                                     "(meteor serve --request-timeout)", None, "timeout",
                                                "timeout_error")))
            else:
                self._counts["cancelled"] += 1
                job.on_event(("done", job))

    def _selection_cache_for(self, jobs: list[Job]):
        """A batch that reports a selection encodes its views twice (the selection, then the
        answer): the worker's memory feature cache, used for that batch, lets the vision tower run
        once per view (the tower's fingerprint is hashed once per worker)."""
        if not any(job.want_selection for job in jobs):
            return None
        if self._selection_cache is None:
            from meteor.model.feature_cache import FeatureCache

            self._selection_cache = FeatureCache(max_memory_bytes=SELECTION_CACHE_BYTES)
        return self._selection_cache

    def _run(self, jobs: list[Job]) -> None:
        """Generate the batch; each job's "done" goes out as soon as its own answer ends."""
        timing = BatchTiming(time.perf_counter())
        started = time.monotonic()
        for job in jobs:
            job.batch_size, job.timing, job.started = len(jobs), timing, started
            job.stream.on_end = lambda job=job: job.on_event(("done", job))
            job.stream.on_first_token = lambda job=job: job.on_event(("first", job))
            job.on_event(("started", job))
        try:
            cache = self._selection_cache_for(jobs)
            with torch.no_grad():
                for job in jobs:
                    if job.want_selection:
                        job.selection = image_selections(self.model, self.processor, job.images, job.prompt_ids,
                                                         job.tokens_per_slice, cache)
                generate_streamed(self.model, self.processor, [(j.prompt_ids, j.images) for j in jobs],
                                  [j.stream for j in jobs], jobs[0].tokens_per_slice, [j.sampling for j in jobs],
                                  timing, cache)
        except Exception as err:       # one bad batch must not stop the server
            log.exception("batch of %d failed", len(jobs))
            with self._cond:
                self._busy = False
                self._counts["failed"] += len(jobs)
            for job in jobs:
                if not job.stream.done:
                    job.stream.on_end = None
                    job.on_event(("error", APIError(500, f"generation failed: {type(err).__name__}: {err}", None,
                                                    "generation_failed", "server_error")))
            return
        tokens = sum(len(j.stream.token_ids) for j in jobs)
        seconds = time.perf_counter() - timing.started
        reasons = Counter(j.stream.finish_reason for j in jobs)
        log.info("batch of %d (K′=%s): %d new tokens in %.2f s, %.0f tokens/s", len(jobs),
                 jobs[0].tokens_per_slice or "model's", tokens, seconds, tokens / max(seconds, 1e-9))
        with self._cond:
            self._busy = False
            self._batch_sizes[len(jobs)] += 1
            self._counts["completion_tokens"] += tokens
            self._counts["answered"] += reasons["stop"] + reasons["length"]
            self._counts["timeouts"] += reasons["timeout"]
            self._counts["cancelled"] += reasons["cancelled"]
        if self.on_batch is not None:
            self.on_batch(len(jobs), tokens, seconds)


COUNTS = ("requests", "answered", "timeouts", "cancelled", "failed", "rejected_queue_full", "completion_tokens")
"""What ``BatchingWorker.stats`` counts, each from 0."""
