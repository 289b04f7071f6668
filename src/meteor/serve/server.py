"""``meteor serve``: load a saved model, start the worker (warm-up first), serve the app with uvicorn."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

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
    """The model, its worker (started) and the ``Server`` the app and UI share."""
    from transformers.utils import logging as hf_logging

    from meteor.pretrained import load_pretrained
    from meteor.serve.app import Server
    from meteor.serve.worker import BatchingWorker

    key = api_key(config)
    hf_logging.disable_progress_bar()
    model, processor = load_pretrained(model_dir)
    model.eval()
    worker = BatchingWorker(model, processor, config.max_batch_size, config.batch_window_ms / 1000,
                            config.queue_size, config.threads).start(warmup=warmup)
    name = config.model_name or Path(model_dir).resolve().name
    return Server(model, processor, config, name, worker, key)


def serve(model_dir: str | os.PathLike, config: ServeConfig = ServeConfig()) -> int:
    """Run the server until interrupted. ``/health`` answers 503 until the warm-up generate (which
    compiles the CPU scan kernel on a new machine) is done."""
    import uvicorn

    from meteor.serve.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    log = logging.getLogger("meteor.serve")
    if config.host not in LOOPBACK and config.api_key_env is None:
        log.warning("binding %s without --api-key-env: anyone who can reach this machine can use the model", config.host)
    server = build_server(model_dir, config)
    app = create_app(server)
    log.info("serving %r on http://%s:%d (OpenAI API at /v1, web UI at /ui%s)", server.model_name, config.host,
             config.port, "" if config.ui else ": off")
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)
    finally:
        server.worker.close()
    return 0
