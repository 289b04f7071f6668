"""The HTTP side of ``meteor serve``: an OpenAI-compatible FastAPI app around the batching worker.

Routes: ``POST /v1/chat/completions`` (plain or ``stream: true`` server-sent events, ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (503 until the worker's warm-up is done),
``GET /metrics`` (the worker's batch sizes and counts) and the web UI at ``/ui``. Every refusal is
OpenAI's error JSON with a 4xx status: 400 (a malformed request, naming the field), 401 (API key),
404 (model or route), 408 (timeout), 413 (body size), 429 (queue full); a failure of the model
itself is a 500 and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from meteor.processing.conversation import ConversationError
from meteor.serve.streaming import AnswerStream, Conversation
from meteor.serve.config import ServeConfig
from meteor.serve.images import ImageResolver
from meteor.serve.protocol import APIError, ChatRequest, chunk, completion, completion_id, invalid, parse_chat_request, usage
from meteor.serve.worker import BatchingWorker, Job, QueueFull


@dataclass
class Prompt:
    ids: list[int]
    images: list
    tokens_per_slice: int | None
    """K′ for the batch key and layout (None: the model's K)."""


class Server:
    """What the routes and the web UI share: the model's processor, the worker and the limits."""

    def __init__(self, model, processor, config: ServeConfig, model_name: str, worker: BatchingWorker,
                 api_key: str | None = None):
        self.model, self.processor, self.config = model, processor, config
        self.model_name, self.worker, self.api_key = model_name, worker, api_key
        self.images = ImageResolver(config.image_root, config.max_image_pixels)
        self.preparation = ThreadPoolExecutor(1, thread_name_prefix="meteor-prepare",
                                              initializer=torch.set_num_threads, initargs=(1,))
        self.created = int(time.time())

    async def off_loop(self, fn, *args, **kwargs):
        """Run CPU work of a request (decoding images, slicing, tokenising, drawing) off the event
        loop, in the one preparation thread. One thread, with one torch thread: every other Python
        thread contends with the model worker for the GIL at each of its many small tensor ops, and
        two OpenMP teams on the same cores wait on each other (6× slower generation on 2 busy cores)."""
        return await asyncio.get_running_loop().run_in_executor(self.preparation, functools.partial(fn, *args, **kwargs))

    # --- requests → prompts ----------------------------------------------------------------------
    def prompt(self, request: ChatRequest) -> Prompt:
        """Images decoded and sliced, the conversation laid out in the model's template (runs in a
        thread: decoding and tokenising are CPU work)."""
        conversation = Conversation()
        token = self.processor.config.image_token
        try:
            for message in request.messages:
                if message.role == "human":
                    images = [self.processor.prepare_image(self.images.load(part)) for part in message.images]
                    conversation.ask(message.text, images, token)
                else:
                    conversation.answer(message.text)
        except ConversationError as err:
            raise invalid(str(err), "messages") from None
        return self.layout(conversation, request.tokens_per_slice)

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
        """K′ checked against the projector and every view's patch count; None for the model's K."""
        compressor = self.processor.config.compressor
        if k is None or k == compressor.tokens_per_slice:
            return None
        if compressor.projector in ("mlp", "resampler"):
            raise invalid(f"this model's {compressor.projector!r} projector cannot keep another number of tokens "
                          f"per view than it was trained with ({compressor.tokens_per_slice or 'all'}); leave "
                          f"tokens_per_slice out", "tokens_per_slice")
        for number, image in enumerate(images):
            fewest = min(rows * cols for rows, cols in image.plan.view_patches)
            if k > fewest:
                raise invalid(f"tokens_per_slice {k} is more than the {fewest} patches of a view of image "
                              f"{number} ({image.plan.image_size[0]}×{image.plan.image_size[1]} px): give at "
                              f"most {fewest}", "tokens_per_slice")
        return k

    # --- prompts → the worker --------------------------------------------------------------------
    def submit(self, prompt: Prompt, request: ChatRequest, deadline: float,
               want_selection: bool = False) -> tuple[Job, asyncio.Queue]:
        """Queue a job whose events arrive on the returned asyncio queue (429 when full)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(event: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        # Only a streamed answer sends its pieces: each one wakes the event loop, which then
        # competes with the model worker for the GIL.
        stream = AnswerStream(self.processor.tokenizer, request.max_tokens, request.stop, deadline=deadline,
                              on_text=(lambda piece: post(("text", piece))) if request.stream else None)
        job = Job(prompt.ids, prompt.images, stream, prompt.tokens_per_slice, request.sampling, post,
                  want_selection=want_selection)
        try:
            self.worker.submit(job)
        except QueueFull as err:
            raise APIError(429, str(err), None, "queue_full", "rate_limit_error") from None
        return job, events

    def counts(self, job: Job) -> dict[str, int]:
        return usage(len(job.prompt_ids), len(job.stream.token_ids), job.prompt_ids.count(self.processor.image_token_id))

    def extension(self, job: Job, request: ChatRequest) -> dict[str, Any]:
        """The response's fields beyond OpenAI's: ``meteor`` (batch size, K′, timings) and, when
        asked for, ``selection`` (kept patches per view of every image)."""
        k = job.tokens_per_slice if job.tokens_per_slice is not None else self.processor.config.compressor.tokens_per_slice
        out: dict[str, Any] = {"meteor": {"batch_size": job.batch_size, "tokens_per_slice": k,
                                          "encode_seconds": round(job.timing.encode_seconds, 4) if job.timing else None}}
        if request.return_selection:
            out["selection"] = selection_json(job.selection or [], job.images)
        return out


def selection_json(selections, images) -> list[dict[str, Any]]:
    """Per view: its image (index among the conversation's images), view index (slices row by
    row, then global), patch grid, the region of the image it shows and the kept raster indices."""
    return [{"image": s.image_index, "view": s.view_index, "is_global": s.is_global, "grid": list(s.grid),
             "region": list(images[s.image_index].plan.view_regions[s.view_index]),
             "kept": [] if s.indices is None else s.indices.tolist()} for s in selections]


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _timeout_error() -> APIError:
    return APIError(408, "the request took longer than this server allows (meteor serve --request-timeout)",
                    None, "timeout", "timeout_error")


def create_app(server: Server):
    """The FastAPI app (and the web UI when ``server.config.ui``)."""
    app = FastAPI(title="LLaVA-Meteor", description="OpenAI-compatible chat completions for LLaVA-Meteor",
                  docs_url=None, redoc_url=None)
    config = server.config

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(err.status_code)
        message = (f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail))
        return JSONResponse(APIError(err.status_code, message, None, code).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return JSONResponse(invalid(f"invalid request: {err.errors()}").body(), status_code=400)

    def authorize(request: Request) -> None:
        if server.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), server.api_key.encode()):
            raise APIError(401, "incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                           None, "invalid_api_key")

    async def read_json(request: Request) -> Any:
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
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise invalid(f"the request body is not valid JSON ({err})", None, "invalid_json") from None

    @app.get("/health")
    async def health():
        if not server.worker.ready.is_set():
            return JSONResponse({"status": "warming_up", "model": server.model_name}, status_code=503)
        return {"status": "ok", "model": server.model_name}

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        return server.worker.stats()

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
            raise APIError(404, f"the model {name!r} does not exist here: this server serves {server.model_name!r}",
                           "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        deadline = time.monotonic() + config.request_timeout
        authorize(request)
        chat = parse_chat_request(await read_json(request), server.model_name, config.max_tokens_limit)
        prompt = await server.off_loop(server.prompt, chat)
        job, events = server.submit(prompt, chat, deadline, want_selection=chat.return_selection)
        if chat.stream:
            return StreamingResponse(_stream(server, job, events, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                kind, value = await asyncio.wait_for(events.get(), max(deadline - time.monotonic(), 0) + 5)
                if kind == "error":
                    raise value
                if kind == "done":
                    break
        except asyncio.TimeoutError:
            job.stream.cancel()
            raise _timeout_error() from None
        if job.stream.finish_reason == "timeout":
            raise _timeout_error()
        return completion(completion_id(), server.model_name, job.stream.text, job.stream.finish_reason,
                          server.counts(job), server.extension(job, chat))

    if config.ui:
        from meteor.serve.ui import mount_ui

        app = mount_ui(app, server)
    return app


async def _stream(server: Server, job: Job, events: asyncio.Queue, chat: ChatRequest) -> AsyncIterator[str]:
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
            elif job.stream.finish_reason == "timeout":
                yield _sse(_timeout_error().body())
            else:
                yield _sse(chunk(id_, model, created, {}, job.stream.finish_reason,
                                 extra=server.extension(job, chat)))
                if chat.include_usage:
                    yield _sse(chunk(id_, model, created, None, counts=server.counts(job)))
            break
        yield "data: [DONE]\n\n"
    finally:
        job.stream.cancel()
