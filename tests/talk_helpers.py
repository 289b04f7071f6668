"""Shared by the chat, serve, browser and explain tests: a tiny model whose answers depend on the
question and the image, test images, and a real ``meteor serve`` process on loopback."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from meteor.pretrained import save_pretrained


def talkative_model(seed: int = 0):
    """``tiny_model`` with its LLM's matrices drawn at std 0.1 instead of 0.02: a random LLaMA
    that small answers almost every prompt alike; this one's greedy answers differ with the
    question and the image (14 of 16 test prompts), so comparing answers compares something."""
    from meteor.testing import tiny_model

    model, processor = tiny_model(seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.language_model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.eval()
    return model, processor


def save_talkative_model(folder: Path) -> Path:
    model, processor = talkative_model()
    save_pretrained(folder, model, processor)
    return folder


def noise_image(seed: int, size: tuple[int, int] = (112, 112)) -> Image.Image:
    """(width, height) of seeded colour noise: every patch differs, so every selection does."""
    width, height = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_kernel() -> None:
    """Build (or load) the CPU scan kernel here first: a server process stopped while it compiles
    would leave torch's build lock behind for every later process."""
    from meteor.model.ops._build import build_extension

    build_extension()


@contextlib.contextmanager
def meteor_server(model_dir: Path, args: Sequence[str] = (), env: dict[str, str] | None = None,
                  log: Path | None = None, timeout: float = 180) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """Run ``python -m meteor serve --model DIR --port P ARGS`` until ``/health`` answers 200;
    yields (base URL, the process, its log file), and stops it afterwards."""
    import httpx

    ensure_kernel()
    port = free_port()
    log = log or model_dir.parent / f"serve-{port}.log"
    environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "meteor", "serve", "--model", str(model_dir),
                                    "--port", str(port), *args], stdout=sink, stderr=subprocess.STDOUT,
                                   env=environment)
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"meteor serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"meteor serve did not report healthy in {timeout} s:\n{log.read_text()}")
            time.sleep(0.3)
        yield base, process, log
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
