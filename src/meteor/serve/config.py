"""Every option of ``meteor serve``, declared once with its default (``meteor serve --help`` is
generated from this class)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ServeConfig:
    """The server's address, batching and limits."""

    host: str = "127.0.0.1"
    """Address to bind. The default answers this machine only; 0.0.0.0 answers the network (give
    --api-key-env then)."""
    port: int = 8000
    model_name: str | None = None
    """The model's id in /v1/models and the name requests must give as "model" (default: the model
    folder's name)."""
    image_root: str | None = None
    """A folder whose files requests may name as images (a path or file:// URL under it). Without
    it, images must come inline as data:image/...;base64 URLs; http(s) URLs are always refused (the
    server fetches nothing)."""
    api_key_env: str | None = None
    """An environment variable holding the API key: requests to /v1 must send "Authorization:
    Bearer KEY", and the web UI asks for it as its password. Default: no authentication."""
    max_batch_size: int = 8
    """Most requests generated together in one batch."""
    batch_window_ms: float = 15.0
    """How long the oldest waiting request waits for others to join its batch (milliseconds); a
    full batch starts at once."""
    queue_size: int = 64
    """Most requests waiting for the model; one more is answered 429 instead of waiting."""
    max_body_mb: float = 20.0
    """Largest request body (megabytes, 10^6 bytes); larger ones are answered 413. Also the web
    UI's largest upload."""
    max_image_pixels: int = 40_000_000
    """Largest image (width × height, read from its header before decoding: Pillow's
    decompression-bomb guard at this limit); larger ones are answered 400."""
    limit_images_per_request: int = 8
    """Most images one request may carry (vLLM's --limit-mm-per-prompt); more are answered 400.
    With --max-image-pixels it bounds the decoding one request can ask for."""
    max_prompt_tokens: int = 4096
    """Longest prompt, visual tokens included; longer ones are answered 400."""
    max_tokens_limit: int = 1024
    """Largest max_tokens a request may ask for, and the answer length of a request that gives
    none."""
    request_timeout: float = 120.0
    """Seconds a request may take from arrival (queueing included); then it is answered 408 (or a
    stream ends with an error event) and its generation stops."""
    threads: int | None = None
    """Torch threads of the model worker. Default: all of torch's but one (at least one), which
    is left to the HTTP side (requests, images, tokenising; each of those runs single-threaded)."""
    worker: Literal["process", "thread"] = "process"
    """Where the model runs: "process", a process of its own, so that generating never waits for
    the interpreter lock the HTTP side holds (and the other way round); "thread", a thread of the
    server's process (one interpreter: less memory, slower under load)."""
    ui: bool = True
    """Mount the web UI (Gradio) at /ui."""

    def __post_init__(self) -> None:
        for name, low in (("port", 0), ("max_batch_size", 1), ("queue_size", 1), ("max_image_pixels", 1),
                          ("max_prompt_tokens", 1), ("max_tokens_limit", 1),
                          ("limit_images_per_request", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number ≥ {low}, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a whole number ≥ 1 (or none: torch's but one), got {self.threads!r}")
        if self.worker not in ("process", "thread"):
            raise ValueError(f"worker must be 'process' or 'thread', got {self.worker!r}")
        if not self.batch_window_ms >= 0:
            raise ValueError(f"batch_window_ms must be ≥ 0 (0: no waiting for others), got {self.batch_window_ms!r}")
        for name, unit in (("max_body_mb", "megabytes"), ("request_timeout", "seconds")):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of {unit}, got {getattr(self, name)!r}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1_000_000)
