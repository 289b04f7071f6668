"""Where the model runs for the server, and the HTTP side's handle on each request given to it.

The HTTP side (``meteor.serve.app``) hands each prepared request to an engine as a ``JobSpec`` and
gets a ``Ticket`` back: the request's state as the model reports it (started, first token, text,
finished), its events delivered to the ticket's ``on_event``, and ``cancel()``. Two engines:

- ``ProcessEngine`` (the default, ``--worker process``): the model and its ``BatchingWorker`` live
  in a process of their own, started with ``spawn``, which loads the model (``load_model``) and
  sends its processor back. Requests go over a pipe as plain data; the worker's events come back
  as small messages. The model's thread then never waits for the interpreter lock that the HTTP
  side holds while it parses JSON, decodes images and writes responses, nor the other way round.
  If that process dies, every open request fails with a 500 and ``dead`` is set.
- ``ThreadEngine`` (``--worker thread``): the same worker in a thread of this process.

Both speak the same messages (``WorkerCore`` turns a worker's job events into them), so the HTTP
side, its metrics and its tests see one interface. The engine holds the queue bound: ``submit``
raises ``QueueFull`` once ``queue_size`` requests wait for the model.
"""

from __future__ import annotations

import io
import itertools
import logging
import multiprocessing
import os
import pickle
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from meteor.serve.protocol import APIError
from meteor.serve.worker import BatchingWorker, Job, JobSpec, QueueFull, load_model

log = logging.getLogger("meteor.serve")

Message = tuple
"""("started", id, batch size, monotonic time), ("first", id, time), ("text", id, piece),
("done", id, result dict), ("error", id, (status, message, param, code, type)),
("batch", requests, tokens, seconds), ("ready", warm-up seconds); from a worker process also
("loaded", processor) and ("failed", traceback text)."""


@dataclass(eq=False)
class Ticket:
    """One request given to the model, as the HTTP side sees it."""

    id: int
    spec: JobSpec
    on_event: Callable[[tuple[str, Any]], None]
    """Called in the engine's thread with ("text", piece), ("done", ticket) or ("error", APIError)."""
    arrived: float
    """``time.monotonic()`` when the HTTP request arrived (before its images were decoded)."""
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None
    ended: float | None = None
    batch_size: int = 0
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    """As ``AnswerStream.finish_reason``; "error" when the model failed."""
    encode_seconds: float | None = None
    selection: list | None = None
    tokens_after_cancel: int | None = None
    cancel_sent: bool = False
    _cancel: Callable[[int], None] | None = None

    def cancel(self) -> None:
        """Stop this request's answer (its client is gone): within one decode step when running."""
        if not self.cancel_sent and self.finish_reason is None and self._cancel is not None:
            self.cancel_sent = True
            self._cancel(self.id)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class WorkerCore:
    """A ``BatchingWorker`` driven by ``JobSpec``s and reporting ``Message``s to ``emit``: the
    part of an engine that runs beside the model (in its process)."""

    def __init__(self, model, processor, options: dict[str, Any], emit: Callable[[Message], None]):
        self.processor, self.emit = processor, emit
        self.worker = BatchingWorker(model, processor, options["max_batch_size"], options["batch_window"],
                                     # the engine bounds the queue; this one only must not refuse
                                     options["queue_size"] + options["max_batch_size"], options["threads"],
                                     on_batch=lambda size, tokens, seconds: emit(("batch", size, tokens, seconds)))
        self.jobs: dict[int, Job] = {}
        self.lock = threading.Lock()

    def start(self, warmup: bool) -> None:
        self.worker.start(warmup=warmup)
        threading.Thread(target=self._announce, name="meteor-ready", daemon=True).start()

    def _announce(self) -> None:
        self.worker.ready.wait()
        self.emit(("ready", self.worker.warmup_seconds))

    def submit(self, id_: int, spec: JobSpec) -> None:
        job = Job.from_spec(spec, self.processor.tokenizer, lambda event: self._event(id_, event))
        with self.lock:
            self.jobs[id_] = job
        try:
            self.worker.submit(job)
        except QueueFull as err:
            self._forget(id_)
            self.emit(("error", id_, (429, str(err), None, "queue_full", "rate_limit_error")))

    def cancel(self, id_: int) -> None:
        with self.lock:
            job = self.jobs.get(id_)
        if job is not None:
            job.stream.cancel()

    def close(self) -> None:
        self.worker.close()

    def _forget(self, id_: int) -> Job | None:
        with self.lock:
            return self.jobs.pop(id_, None)

    def _event(self, id_: int, event: tuple[str, Any]) -> None:
        kind, value = event
        if kind == "text":
            self.emit(("text", id_, value))
        elif kind == "started":
            self.emit(("started", id_, value.batch_size, value.started))
        elif kind == "first":
            self.emit(("first", id_, time.monotonic()))
        elif kind == "done":
            self._forget(id_)
            stream = value.stream
            after = (None if stream.cancelled_at_tokens is None or stream.finish_reason != "cancelled"
                     else len(stream.token_ids) - stream.cancelled_at_tokens)
            self.emit(("done", id_, {"text": stream.text, "completion_tokens": len(stream.token_ids),
                                     "finish_reason": stream.finish_reason, "selection": value.selection,
                                     "encode_seconds": value.timing.encode_seconds if value.timing else None,
                                     "tokens_after_cancel": after, "ended": time.monotonic()}))
        elif kind == "error":
            self._forget(id_)
            self.emit(("error", id_, (value.status, value.message, value.param, value.code, value.type)))


class _Pickler(pickle.Pickler):
    """Pickles CPU tensors as numpy arrays (protocol 5): seven times faster than torch's own
    reduction for a request's image views, which cross to the worker process with every request."""

    def reducer_override(self, obj):
        if type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.dtype in _NUMPY_DTYPES:
            return torch.from_numpy, (obj.detach().numpy(),)
        return NotImplemented


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                 torch.uint8, torch.bool)


def dumps(message: Message) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    return buffer.getvalue()


class Engine:
    """What both engines share: the tickets, the queue bound, the messages applied to tickets."""

    kind = ""

    def __init__(self, options: dict[str, Any], on_message: Callable[[Message, Ticket | None], None] | None = None):
        self.options = options
        self.queue_size = options["queue_size"]
        self.on_message = on_message
        """Called after each message is applied, with its ticket (None for batch and ready
        messages): the server's metrics."""
        self.processor = None
        self.ready = threading.Event()
        self.warmup_seconds: float | None = None
        self.dead: str | None = None
        """Why the model can no longer answer (its process exited), or None."""
        self._tickets: dict[int, Ticket] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # --- the HTTP side ---------------------------------------------------------------------------
    def submit(self, spec: JobSpec, on_event: Callable[[tuple[str, Any]], None], arrived: float) -> Ticket:
        """Queue ``spec``; ``QueueFull`` when ``queue_size`` requests wait for the model already."""
        if self.dead is not None:
            raise APIError(503, f"the model worker is not running ({self.dead}); the server must be restarted",
                           None, "worker_exited", "server_error")
        with self._lock:
            waiting = sum(1 for t in self._tickets.values() if t.started is None)
            if waiting >= self.queue_size:
                raise QueueFull(f"{waiting} requests are waiting, the most this server queues "
                                f"(meteor serve --queue-size); try again shortly")
            ticket = Ticket(next(self._ids), spec, on_event, arrived, _cancel=self._send_cancel)
            self._tickets[ticket.id] = ticket
        try:
            self._send_submit(ticket)
        except Exception:
            with self._lock:
                self._tickets.pop(ticket.id, None)
            raise
        return ticket

    def counts(self) -> tuple[int, int]:
        """(waiting, running) requests now."""
        with self._lock:
            waiting = sum(1 for t in self._tickets.values() if t.started is None)
            return waiting, len(self._tickets) - waiting

    # --- messages from the model's side ------------------------------------------------------------
    def _apply(self, message: Message) -> None:
        kind = message[0]
        if kind in ("batch", "ready"):
            if kind == "ready":
                self.warmup_seconds = message[1]
                self.ready.set()
            if self.on_message is not None:
                self.on_message(message, None)
            return
        with self._lock:
            ticket = self._tickets.get(message[1])
            if ticket is not None and kind in ("done", "error"):
                del self._tickets[message[1]]
        if ticket is None:
            return
        if kind == "started":
            ticket.batch_size, ticket.started = message[2], message[3]
        elif kind == "first":
            ticket.first_token = message[2]
        elif kind == "text":
            ticket.text += message[2]
        elif kind == "done":
            result = message[2]
            ticket.text, ticket.completion_tokens = result["text"], result["completion_tokens"]
            ticket.selection, ticket.encode_seconds = result["selection"], result["encode_seconds"]
            ticket.tokens_after_cancel, ticket.ended = result["tokens_after_cancel"], result["ended"]
            ticket.finish_reason = result["finish_reason"]
            if ticket.tokens_after_cancel is not None and ticket.cancel_sent:
                log.info("request %d: client gone: its row stopped %d token(s) later (%d in all)", ticket.id,
                         ticket.tokens_after_cancel, ticket.completion_tokens)
        elif kind == "error":
            ticket.ended, ticket.finish_reason = time.monotonic(), "error"
            status = message[2][0]
            if status == 408:
                ticket.finish_reason = "timeout"
        if self.on_message is not None:
            self.on_message(message, ticket)
        if kind == "text":
            ticket.on_event(("text", message[2]))
        elif kind == "done":
            ticket.on_event(("done", ticket))
        elif kind == "error":
            ticket.on_event(("error", APIError(*message[2])))

    def _fail_all(self, reason: str) -> None:
        """The model's side is gone: every open request ends with a 500."""
        self.dead = reason
        with self._lock:
            open_tickets = list(self._tickets.values())
        for ticket in open_tickets:
            self._apply(("error", ticket.id, (500, f"the model worker stopped: {reason}", None, "worker_exited",
                                              "server_error")))

    # --- for subclasses ----------------------------------------------------------------------------
    def _send_submit(self, ticket: Ticket) -> None:
        raise NotImplementedError

    def _send_cancel(self, id_: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class ThreadEngine(Engine):
    """The model in a thread of this process."""

    kind = "thread"

    def __init__(self, model, processor, options: dict[str, Any], warmup: bool = True, on_message=None):
        super().__init__(options, on_message)
        self.processor = processor
        self.core = WorkerCore(model, processor, options, self._apply)
        self.core.start(warmup)

    def _send_submit(self, ticket: Ticket) -> None:
        self.core.submit(ticket.id, ticket.spec)

    def _send_cancel(self, id_: int) -> None:
        self.core.cancel(id_)

    def close(self) -> None:
        self.core.close()


class ProcessEngine(Engine):
    """The model in a process of its own (the module docstring says why)."""

    kind = "process"

    def __init__(self, model_dir: str | os.PathLike, options: dict[str, Any], warmup: bool = True, on_message=None,
                 load_timeout: float = 600):
        super().__init__(options, on_message)
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._send_lock = threading.Lock()
        self.process = context.Process(target=_worker_main, args=(str(model_dir), options, warmup, child),
                                       name="meteor-model-worker", daemon=True)
        self.process.start()
        child.close()
        self.model_dir, self.load_timeout = model_dir, load_timeout

    def wait_loaded(self) -> "ProcessEngine":
        """Wait for the worker to load the model; its processor then comes over (the model is read
        once, by the process that uses it). The server imports its own modules meanwhile."""
        if self.processor is not None:
            return self
        if not self._conn.poll(self.load_timeout):
            self.process.kill()
            raise TimeoutError(f"the model worker did not load {self.model_dir} in {self.load_timeout:.0f} s")
        message = self._receive()
        if message[0] == "failed":
            self.process.join(10)
            raise RuntimeError(f"the model worker could not load {self.model_dir}:\n{message[1]}")
        self.processor = message[1]
        self._reader = threading.Thread(target=self._read, name="meteor-worker-reader", daemon=True)
        self._reader.start()
        return self

    def _receive(self) -> Message:
        return pickle.loads(self._conn.recv_bytes())

    def _send(self, message: Message) -> None:
        data = dumps(message)
        with self._send_lock:
            self._conn.send_bytes(data)

    def _read(self) -> None:
        while True:
            try:
                message = self._receive()
            except (EOFError, OSError):
                break
            try:
                self._apply(message)
            except Exception:          # a bug in one message must not stop every later one
                log.exception("could not apply the model worker's message %r", message[:2])
        self.process.join(5)
        if not getattr(self, "_closing", False):
            log.error("the model worker process exited (code %s): open requests fail, /health reports 503",
                      self.process.exitcode)
            self._fail_all(f"its process exited with code {self.process.exitcode}")

    def _send_submit(self, ticket: Ticket) -> None:
        try:
            self._send(("submit", ticket.id, ticket.spec))
        except (OSError, ValueError) as err:
            raise APIError(503, f"the model worker is not running ({err})", None, "worker_exited",
                           "server_error") from None

    def _send_cancel(self, id_: int) -> None:
        try:
            self._send(("cancel", id_))
        except (OSError, ValueError):
            pass

    def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        try:
            self._send(("close",))
        except (OSError, ValueError):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()


def _worker_main(model_dir: str, options: dict[str, Any], warmup: bool, conn) -> None:
    """The worker process: load the model, send the processor, answer until told to close (or
    until the server's end of the pipe closes)."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[worker]: %(message)s", stream=sys.stderr)
    send_lock = threading.Lock()

    def send(message: Message) -> None:
        data = dumps(message)
        with send_lock:
            try:
                conn.send_bytes(data)
            except (OSError, ValueError):     # the server is gone: nothing to tell
                pass

    try:
        model, processor = load_model(model_dir)
    except BaseException:
        send(("failed", traceback.format_exc()))
        return
    send(("loaded", processor))
    core = WorkerCore(model, processor, options, send)
    core.start(warmup)
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break
        if message[0] == "submit":
            core.submit(message[1], message[2])
        elif message[0] == "cancel":
            core.cancel(message[1])
        elif message[0] == "close":
            break
    core.close()
