"""``meteor serve``: start the model's engine (its process loads the model and warms up), serve the
app with uvicorn, drain on SIGTERM."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import uvicorn

from meteor.serve.config import ServeConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def api_key(config: ServeConfig) -> str | None:
    """The key named by ``--api-key-env``, read once at start; refused when unset or empty."""
    if config.api_key_env is None:
        return None
    key = os.environ.get(config.api_key_env, "")
    if not key.strip():
        raise ValueError(f"--api-key-env {config.api_key_env}: that environment variable is unset or empty; "
                         f"export it with the key clients must send")
    return key.strip()


def build_server(model_dir: str | os.PathLike, config: ServeConfig, warmup: bool = True):
    """The engine (the model loaded and its worker started, ``config.worker`` says where) and the
    ``Server`` the app and UI share."""
    import torch

    from meteor.serve.engine import ProcessEngine, ThreadEngine

    key = api_key(config)
    options = {"max_batch_size": config.max_batch_size, "batch_window": config.batch_window_ms / 1000,
               "queue_size": config.queue_size,
               "threads": config.threads if config.threads is not None else max(1, torch.get_num_threads() - 1)}
    # the worker process starts first: it loads the model while this one imports the web stack
    engine = ProcessEngine(model_dir, options, warmup) if config.worker == "process" else None

    from meteor.serve.app import Server
    from meteor.serve.metrics import Metrics
    from meteor.serve.worker import load_model

    metrics = Metrics(config.max_batch_size, lambda ids: ids.count(engine.processor.image_token_id),
                      lambda: engine.counts() if engine is not None else (0, 0),
                      worker_pid=(lambda: engine.process.pid) if config.worker == "process" else None)
    if engine is None:
        model, processor = load_model(model_dir)
        engine = ThreadEngine(model, processor, options, warmup, metrics.on_message)
    else:
        engine.on_message = metrics.on_message
        engine.wait_loaded()
    name = config.model_name or Path(model_dir).resolve().name
    return Server(engine, config, name, key, metrics)


def serve(model_dir: str | os.PathLike, config: ServeConfig = ServeConfig()) -> int:
    """Run the server until interrupted. ``/health`` answers 503 until the warm-up generate (which
    compiles the CPU scan kernel on a new machine) is done. The first SIGTERM (or Ctrl+C) drains:
    chat requests are answered 503 while those in flight finish (at most ``--request-timeout``),
    then the server exits; a second one stops it at once. Returns 1 when the model's process died."""
    from meteor.serve.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    log = logging.getLogger("meteor.serve")
    if config.host not in LOOPBACK and config.api_key_env is None:
        log.warning("binding %s without --api-key-env: anyone who can reach this machine can use the model", config.host)
    server = build_server(model_dir, config)
    app = create_app(server)
    log.info("serving %r on http://%s:%d (OpenAI API at /v1, web UI at /ui%s; the model in a %s)", server.model_name,
             config.host, config.port, "" if config.ui else ": off", config.worker)
    try:
        DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False),
                       server).run()
    finally:
        server.engine.close()
    return 1 if server.engine.dead is not None else 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM or SIGINT drains (``serve``) instead of closing the
    listening socket: a client that connects meanwhile gets a 503 it can act on, not a refused
    connection."""

    def __init__(self, config: uvicorn.Config, server):
        super().__init__(config)
        self.meteor = server
        self.drain_until: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.meteor.draining:
            return super().handle_exit(sig, frame)
        self.meteor.draining = True
        self.drain_until = time.monotonic() + self.meteor.config.request_timeout + 5
        logging.getLogger("meteor.serve").info(
            "signal %d: draining: new chat requests get 503, the %d in flight finish first (a second signal "
            "stops at once)", sig, self.meteor.in_flight)

    async def on_tick(self, counter: int) -> bool:
        if not self.should_exit:
            if self.meteor.draining and (self.meteor.in_flight == 0 or time.monotonic() > self.drain_until):
                self.should_exit = True
            elif self.meteor.engine.dead is not None:
                self.should_exit = True
        return await super().on_tick(counter)
