"""``meteor serve``: LLaVA-Meteor behind OpenAI's chat-completions protocol, with a web UI.

- ``config.ServeConfig``: every option and limit, with its default.
- ``protocol``: requests checked field by field, responses and stream chunks, OpenAI's errors.
- ``images``: inline data URLs or files under ``--image-root``; nothing is fetched.
- ``worker.BatchingWorker``: one thread owns the model; a bounded queue; batches gathered in a
  short window and grouped by tokens per view and decoding.
- ``app``: the FastAPI routes; ``ui``: the Gradio UI at /ui; ``server.serve``: the entry point.

FastAPI, uvicorn and Gradio come with the ``serve`` extra (``pip install "llava-meteor[serve]"``).
"""

from meteor.serve.config import ServeConfig

__all__ = ["ServeConfig", "serve"]


def serve(*args, **kwargs):
    """``meteor.serve.server.serve`` (imported on call: the web stack loads only when serving)."""
    from meteor.serve.server import serve as run

    return run(*args, **kwargs)
