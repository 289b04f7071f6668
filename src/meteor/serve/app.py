"""The HTTP side of ``meteor serve``: an OpenAI-compatible FastAPI app around the model's engine.

Routes: ``POST /v1/chat/completions`` (plain or ``stream: true`` server-sent events, ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (503 until the worker's warm-up is done, and
while shutting down), ``GET /metrics`` (Prometheus text; ``?format=json`` or ``GET /stats``: JSON;
``meteor.serve.metrics`` lists them) and the web UI at ``/ui``. Every refusal is OpenAI's error JSON
with a 4xx status: 400 (a malformed request, naming the field), 401 (API key), 404 (model or route),
408 (timeout), 413 (body size), 415 (a body not sent as JSON), 429 (queue full, with
``Retry-After``), 503 (shutting down, with ``Retry-After``); a failure of the model itself, or of
the server, is a 500 with the same JSON and the server keeps serving.

A request's images are decoded, sliced and tokenised in a pool of threads, one request's images one
after another in one thread: a request with many large images keeps one thread busy while the
others serve everyone else, and its decoding counts against its own deadline. A client that goes
away (its connection closes) cancels its request, streamed or not: its row stops within one decode
step. On SIGTERM the server stops taking chat requests (503) and ends once those in flight are done
(``meteor.serve.server``).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from meteor.model.configuration import ConfigError
from meteor.processing.conversation import ConversationError
from meteor.serve.config import ServeConfig
from meteor.serve.engine import Engine, Ticket
from meteor.serve.images import ImageResolver, allow_pixels
from meteor.serve.metrics import CONTENT_TYPE, Metrics
from meteor.serve.protocol import APIError, ChatRequest, chunk, completion, completion_id, invalid, parse_chat_request, usage
from meteor.serve.streaming import Conversation
from meteor.serve.worker import JobSpec, QueueFull

PREPARE_THREADS = {"process": 4, "thread": 1}
"""Threads that prepare requests (decode, slice, tokenise). With the model in its own process, a
few, so that one request's large images do not hold up the others (Pillow and torch release the
interpreter lock while they work). With the model in a thread of this process, one: every other
Python thread contends with the model's thread for the lock at each of its many small tensor ops
(6× slower generation on 2 busy cores)."""


@dataclass
class Prompt:
    ids: list[int]
    images: list
    tokens_per_slice: int | None
    """K′ for the batch key and layout (None: the model's K)."""


class Server:
    """What the routes and the web UI share: the engine, its processor, the limits and the metrics."""

    def __init__(self, engine: Engine, config: ServeConfig, model_name: str, api_key: str | None = None,
                 metrics: Metrics | None = None):
        self.engine, self.processor, self.config = engine, engine.processor, config
        self.model_name, self.api_key = model_name, api_key
        self.metrics = metrics or Metrics(config.max_batch_size, self.visual_tokens, engine.counts)
        if engine.on_message is None:
            engine.on_message = self.metrics.on_message
        allow_pixels(config.max_image_pixels)
        self.images = ImageResolver(config.image_root, config.max_image_pixels)
        self.preparation = ThreadPoolExecutor(PREPARE_THREADS[engine.kind], thread_name_prefix="meteor-prepare",
                                              initializer=torch.set_num_threads, initargs=(1,))
        self.created = int(time.time())
        self.draining = False
        """Set on SIGTERM: chat requests are answered 503 while those in flight finish."""
        self.in_flight = 0
        """Chat requests being answered now."""

    def visual_tokens(self, ids: list[int]) -> int:
        return ids.count(self.processor.image_token_id)

    async def off_loop(self, fn, *args, **kwargs):
        """Run CPU work of a request (decoding images, slicing, tokenising, drawing) off the event
        loop, in the preparation threads (``PREPARE_THREADS``)."""
        return await asyncio.get_running_loop().run_in_executor(self.preparation, functools.partial(fn, *args, **kwargs))

    # --- requests → prompts ----------------------------------------------------------------------
    def prompt(self, request: ChatRequest, deadline: float | None = None) -> Prompt:
        """Images decoded and sliced, one after another, the conversation laid out in the model's
        template (runs in a preparation thread). Past ``deadline``, a 408."""
        prompt = self.layout(conversation_of(request, self.processor, self.images, deadline), request.tokens_per_slice)
        _check_deadline(deadline, "while its images were decoded")
        return prompt

    def layout(self, conversation: Conversation, tokens_per_slice: int | None) -> Prompt:
        k = self.check_tokens_per_slice(tokens_per_slice, conversation.images)
        try:
            ids = conversation.prompt_ids(self.processor, k)
        except ConversationError as err:
            raise invalid(str(err), "messages") from None
        if len(ids) > self.config.max_prompt_tokens:
            raise invalid(f"the prompt is {len(ids)} tokens ({ids.count(self.processor.image_token_id)} of them "
                          f"visual), above this server's limit of {self.config.max_prompt_tokens} (meteor serve "
                          f"--max-prompt-tokens); send fewer or smaller images, or fewer turns, or a smaller "
                          f"tokens_per_slice", "messages", "context_length_exceeded")
        return Prompt(ids, conversation.images, k)

    def check_tokens_per_slice(self, k: int | None, images) -> int | None:
        """K′ checked against the projector and every view's patch count (``MeteorConfig.resolve_tokens_per_slice``,
        as every entry point checks it); None for the model's K."""
        if k is None or k == self.processor.config.compressor.tokens_per_slice:
            return None
        try:
            return self.processor.tokens_per_slice(k, images)
        except ConfigError as err:
            raise invalid(str(err), "tokens_per_slice") from err

    # --- prompts → the model ---------------------------------------------------------------------
    def submit(self, prompt: Prompt, request: ChatRequest, deadline: float, arrived: float | None = None,
               want_selection: bool = False) -> tuple[Ticket, asyncio.Queue]:
        """Give the prompt to the model; its events arrive on the returned asyncio queue (429 with
        ``Retry-After`` when the queue is full)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(event: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        # Only a streamed answer sends its pieces: each one wakes the event loop.
        spec = JobSpec(prompt.ids, prompt.images, request.max_tokens, request.stop, deadline, prompt.tokens_per_slice,
                       request.sampling, want_selection, stream_text=request.stream)
        try:
            ticket = self.engine.submit(spec, post, arrived if arrived is not None else time.monotonic())
        except QueueFull as err:
            raise APIError(429, str(err), None, "queue_full", "rate_limit_error",
                           headers={"Retry-After": str(self.retry_after())}) from None
        self.metrics.submitted()
        return ticket, events

    def retry_after(self) -> int:
        """Seconds until the queue has room, about: the waiting batches at the recent batch time."""
        waiting, _ = self.engine.counts()
        batches = math.ceil((waiting + 1) / self.config.max_batch_size)
        return max(1, min(60, math.ceil(batches * self.metrics.recent_batch_seconds())))

    def counts(self, ticket: Ticket) -> dict[str, int]:
        ids = ticket.spec.prompt_ids
        return usage(len(ids), ticket.completion_tokens, self.visual_tokens(ids))

    def extension(self, ticket: Ticket, request: ChatRequest) -> dict[str, Any]:
        """The response's fields beyond OpenAI's: ``meteor`` (batch size, K′, timings) and, when
        asked for, ``selection`` (kept patches per view of every image)."""
        k = ticket.spec.tokens_per_slice
        k = k if k is not None else self.processor.config.compressor.tokens_per_slice
        queued = None if ticket.started is None else round(ticket.started - ticket.submitted, 4)
        out: dict[str, Any] = {"meteor": {"batch_size": ticket.batch_size, "tokens_per_slice": k,
                                          "queue_seconds": queued,
                                          "encode_seconds": None if ticket.encode_seconds is None
                                          else round(ticket.encode_seconds, 4)}}
        if request.return_selection:
            out["selection"] = selection_json(ticket.selection or [], ticket.spec.images)
        return out

    def stats(self) -> dict[str, Any]:
        waiting, running = self.engine.counts()
        config = self.config
        return self.metrics.json(
            ready=self.engine.ready.is_set(), draining=self.draining, worker=self.engine.kind, queued=waiting,
            running=running, busy=running > 0, max_batch_size=config.max_batch_size,
            batch_window_ms=config.batch_window_ms, queue_size=config.queue_size,
            threads=self.engine.options["threads"], warmup_seconds=self.engine.warmup_seconds)


def conversation_of(request: ChatRequest, processor, images: ImageResolver, deadline: float | None = None) -> Conversation:
    """The request's turns as a ``Conversation``: each user turn's images decoded by ``images`` and
    sliced by ``processor``, one after another (past ``deadline``, a 408)."""
    conversation = Conversation()
    try:
        for message in request.messages:
            if message.role == "human":
                sliced = []
                for part in message.images:
                    _check_deadline(deadline, "while its images were decoded")
                    sliced.append(processor.prepare_image(images.load(part)))
                conversation.ask(message.text, sliced, processor.config.image_token)
            else:
                conversation.answer(message.text)
    except ConversationError as err:
        raise invalid(str(err), "messages") from None
    return conversation


def _check_deadline(deadline: float | None, where: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise _timeout_error(f"the request took longer than this server allows {where} "
                             f"(meteor serve --request-timeout)")


def selection_json(selections, images) -> list[dict[str, Any]]:
    """Per view: its image (index among the conversation's images), view index (slices row by
    row, then global), patch grid, the region of the image it shows and the kept raster indices."""
    return [{"image": s.image_index, "view": s.view_index, "is_global": s.is_global, "grid": list(s.grid),
             "region": list(images[s.image_index].plan.view_regions[s.view_index]),
             "kept": [] if s.indices is None else s.indices.tolist()} for s in selections]


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _timeout_error(message: str = "the request took longer than this server allows "
                                   "(meteor serve --request-timeout)") -> APIError:
    return APIError(408, message, None, "timeout", "timeout_error")


JSON_TYPES = ("application/json",)


def _error_response(err: APIError) -> JSONResponse:
    headers = dict(err.headers or {})
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(err.body(), status_code=err.status, headers=headers or None)


class Draining:
    """ASGI middleware: counts the chat requests in flight and, once the server drains (SIGTERM),
    answers new ones 503 with ``Retry-After``."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/chat/"):
            return await self.app(scope, receive, send)
        if self.server.draining:
            self.server.metrics.http_error(503)
            refusal = APIError(503, "the server is shutting down; send the request again (to another replica, "
                                    "or once it has restarted)", None, "server_shutting_down", "server_error",
                               headers={"Retry-After": "5", "Connection": "close"})
            return await _error_response(refusal)(scope, receive, send)
        self.server.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.server.in_flight -= 1


def create_app(server: Server):
    """The FastAPI app (and the web UI when ``server.config.ui``)."""
    app = FastAPI(title="LLaVA-Meteor", description="OpenAI-compatible chat completions for LLaVA-Meteor",
                  docs_url=None, redoc_url=None)
    config = server.config
    metrics = server.metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        metrics.http_error(err.status)
        return _error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(err.status_code)
        message = (f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail))
        metrics.http_error(err.status_code)
        return JSONResponse(APIError(err.status_code, message, None, code).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        metrics.http_error(400)
        return JSONResponse(invalid(f"invalid request: {err.errors()}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        # a bug of ours: the client still gets OpenAI's error JSON (the traceback goes to the log)
        metrics.http_error(500)
        return JSONResponse(APIError(500, f"the server failed on this request ({type(err).__name__}); the "
                                          f"server log has the details", None, "internal_error", "server_error").body(),
                            status_code=500)

    def authorize(request: Request) -> None:
        if server.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), server.api_key.encode()):
            raise APIError(401, "incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                           None, "invalid_api_key")

    async def read_json(request: Request) -> Any:
        given = request.headers.get("content-type", "")
        if given.split(";")[0].strip().lower() not in JSON_TYPES:
            raise APIError(415, f"the request body must be JSON sent with the header 'Content-Type: application/json' "
                                f"(got {given[:60] or 'no Content-Type'!r})", None, "unsupported_media_type")
        limit = config.max_body_bytes
        too_large = APIError(413, f"the request body is larger than this server's limit of {config.max_body_mb:g} MB "
                                  f"(meteor serve --max-body-mb); send smaller images", None, "request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large
        try:
            return json.loads(body)
        except RecursionError:
            raise invalid("the request body nests arrays or objects deeper than this server reads; a chat "
                          "request needs a few levels", None, "invalid_json") from None
        except (ValueError, UnicodeDecodeError) as err:     # JSONDecodeError, and numbers of > 4,300 digits
            raise invalid(f"the request body is not valid JSON ({str(err)[:200]})", None, "invalid_json") from None

    @app.get("/health")
    async def health():
        if server.engine.dead is not None:
            return JSONResponse({"status": "worker_exited", "model": server.model_name}, status_code=503)
        if server.draining:
            return JSONResponse({"status": "shutting_down", "model": server.model_name}, status_code=503)
        if not server.engine.ready.is_set():
            return JSONResponse({"status": "warming_up", "model": server.model_name}, status_code=503)
        return {"status": "ok", "model": server.model_name}

    @app.get("/metrics")
    async def prometheus(request: Request, format: str = "prometheus"):
        authorize(request)
        if format == "json" or request.headers.get("accept", "").startswith("application/json"):
            return server.stats()
        if format != "prometheus":
            raise invalid(f"format must be 'prometheus' (the default) or 'json', got {format[:40]!r}", "format")
        return Response(metrics.prometheus(), media_type=CONTENT_TYPE)

    @app.get("/stats")
    async def stats(request: Request):
        authorize(request)
        return server.stats()

    def model_card() -> dict[str, Any]:
        compressor = server.processor.config.compressor
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "meteor",
                "meteor": {"tokens_per_slice": compressor.tokens_per_slice, "projector": compressor.projector,
                           "template": server.processor.config.template,
                           "max_slices": server.processor.config.max_slices}}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request):
        authorize(request)
        if name != server.model_name:
            raise APIError(404, f"the model {name[:80]!r} does not exist here: this server serves "
                                f"{server.model_name!r}", "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        deadline = arrived + config.request_timeout
        authorize(request)
        chat = parse_chat_request(await read_json(request), server.model_name, config.max_tokens_limit,
                                  config.limit_images_per_request)
        prompt = await server.off_loop(server.prompt, chat, deadline)
        ticket, events = server.submit(prompt, chat, deadline, arrived, want_selection=chat.return_selection)
        if chat.stream:
            return StreamingResponse(_stream(server, ticket, events, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                event = asyncio.ensure_future(events.get())
                finished, _ = await asyncio.wait({event, gone}, timeout=max(deadline - time.monotonic(), 0) + 5,
                                                 return_when=asyncio.FIRST_COMPLETED)
                if event not in finished:
                    event.cancel()
                    ticket.cancel()
                    if gone in finished:       # nobody to answer
                        return Response(status_code=499)
                    raise _timeout_error()
                kind, value = event.result()
                if kind == "error":
                    raise value
                if kind == "done":
                    break
        finally:
            gone.cancel()
        if ticket.finish_reason == "timeout":
            raise _timeout_error()
        return completion(completion_id(), server.model_name, ticket.text, ticket.finish_reason,
                          server.counts(ticket), server.extension(ticket, chat))

    if config.ui:
        from meteor.serve.ui import mount_ui

        app = mount_ui(app, server)
    return Draining(app, server)


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed its connection (the body has been read by then, so
    what the server receives next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(server: Server, ticket: Ticket, events: asyncio.Queue, chat: ChatRequest) -> AsyncIterator[str]:
    """OpenAI's chunks: the role, the text as it comes, the finish reason, the usage when asked for
    (``stream_options.include_usage``), then ``data: [DONE]``. A client that goes away cancels its row."""
    id_, created, model = completion_id(), int(time.time()), server.model_name
    try:
        yield _sse(chunk(id_, model, created, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield _sse(chunk(id_, model, created, {"content": value}))
                continue
            if kind == "error":
                yield _sse(value.body())
            elif ticket.finish_reason == "timeout":
                yield _sse(_timeout_error().body())
            else:
                yield _sse(chunk(id_, model, created, {}, ticket.finish_reason,
                                 extra=server.extension(ticket, chat)))
                if chat.include_usage:
                    yield _sse(chunk(id_, model, created, None, counts=server.counts(ticket)))
            break
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()
