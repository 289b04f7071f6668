"""``meteor serve``: LLaVA-Meteor behind OpenAI's chat-completions protocol, with a web UI.

- ``config.ServeConfig``: every option and limit, with its default.
- ``protocol``: requests checked field by field, responses and stream chunks, OpenAI's errors.
- ``images``: inline data URLs or files under ``--image-root``; nothing is fetched.
- ``worker.BatchingWorker``: one thread owns the model; batches gathered in a short window and
  grouped by tokens per view, each row decoding (and sampling) on its own; ``worker.load_model``.
- ``engine``: where that worker runs (a process of its own, or a thread) and the HTTP side's handle
  on each request; ``metrics``: the Prometheus metrics at /metrics and their JSON at /stats.
- ``app``: the FastAPI routes; ``ui``: the Gradio UI at /ui; ``server.serve``: the entry point.

FastAPI, uvicorn, Gradio and prometheus_client come with the ``serve`` extra
(``pip install "llava-meteor[serve]"``).
"""

from meteor.serve.config import ServeConfig

__all__ = ["ServeConfig", "serve"]


def serve(*args, **kwargs):
    """``meteor.serve.server.serve`` (imported on call: the web stack loads only when serving)."""
    from meteor.serve.server import serve as run

    return run(*args, **kwargs)
