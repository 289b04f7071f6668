"""Throughput and latency of `meteor serve` with batching against batch size 1.

Real servers on loopback, one with the default batching (`--max-batch-size 8 --batch-window-ms 15`)
and one with `--max-batch-size 1`, both on the demo's model, for each worker placement asked for
(`--workers process thread`: the model in a process of its own, the default, or in a thread of the
server's process); 1, 4 and 16 concurrent clients (threads, one keep-alive HTTP connection each,
connected before the clock starts) send requests back to back with the world's test images as data
URLs, greedy, in two workloads: the world's test questions (1-2 token answers, `max_tokens` 8 as the
world runner allows) and captions ("Describe the image.", the stage-1 task: 15-64 token answers,
`max_tokens` 64). Per setting: requests per second over the whole run, p50 and p99 latency, the mean
batch size the server reports (/stats) and the CPU time per request of the server's processes
(HTTP side and model worker) and of the clients. Then the model alone (``ModelAlone``, unless
``--model-alone no``): the servers' batching worker in this process, given each workload's requests
all at once, at batch size 1 and at the batching server's ``--max-batch-size``: what the model's own
work allows batching to gain, which bounds the servers' ratio (``--model-alone only`` measures just
that). The clients use the standard library's
`http.client`, a tenth of httpx's CPU per request, since they share the machine with the servers
they measure. Rounds alternate the servers, so load from elsewhere on the machine falls on all of
them; each cell is the median over rounds.

    python benchmarks/bench_serve.py [--model DIR] [--world DIR] [--clients 1 4 16] [--rounds 3]
                                     [--requests 96] [--workloads questions captions]
                                     [--workers process thread] [--server-args '--threads 2']
                                     [--model-alone also|only|no] [--json out.json] [--markdown out.md]

    python benchmarks/bench_serve.py --vllm [--clients 16] [--rounds 3] [--k 16] [--max-tokens 16]
                                     [--client openai http] [--vllm-python .venv-vllm/bin/python]

--vllm compares, in one run, vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`,
from the environment `make vllm-env` builds, with the package's plugin) on all tokens (the same folder
with K′ = every patch per request), vLLM with Meteor at K, and `meteor serve` with Meteor at K, all on
one folder built here (``build_vllm_model``: a CLIP tower with 224-px views and a 3.4 M-parameter LLaMA,
448×448 images of 5 views, so visual tokens dominate the prompt). Clients stream greedy answers of
exactly ``--max-tokens`` tokens through the official `openai` client; per configuration:
requests/s, time to first token p50/p95, output tokens/s, vLLM's KV-cache blocks per request (from
its /metrics, alone and under load) and the CPU time per request of each server's processes.

Without --model it uses the full demo's K=16 model (meteor-demo/runs/k16/stage2/model, or
/tmp/demo_after/... when that exists); without a world folder, the model's demo world beside it.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

CANDIDATES = ("meteor-demo", "/tmp/demo_after", "/tmp/quick")
"""Demo folders searched for runs/k16/stage2/model (or the quick demo's first budget) and world/."""


def find_demo() -> tuple[Path, Path]:
    for root in map(Path, CANDIDATES):
        models = [root / "runs" / "k16" / "stage2" / "model", *sorted(root.glob("runs/*/stage2/model"))]
        model = next((m for m in models if (m / "meteor_config.json").is_file()), None)
        if model is not None and (root / "world" / "test.jsonl").is_file():
            return model, root / "world"
    raise FileNotFoundError("no demo model found: run `meteor demo` (or `meteor demo --quick --out /tmp/quick`), "
                            "or give --model and --world")


WORKLOADS = {"questions": (None, 8), "captions": ("Describe the image.", 64)}
"""name → (the text asked, or None for each test question's own; max_tokens). questions: the
world's test questions, answered in 1-2 tokens (8 allowed, the world runner's length); captions:
the stage-1 task, answers of 15-64 tokens."""


def requests_from_world(world: Path, count: int, workload: str, model_name: str) -> list[bytes]:
    """Request bodies for the world's first ``count`` test questions (distinct images)."""
    text, max_tokens = WORKLOADS[workload]
    bodies = []
    for line in (world / "test.jsonl").read_text().splitlines()[:count]:
        question = json.loads(line)
        image = base64.b64encode((world / "images" / question["image"]).read_bytes()).decode()
        bodies.append(json.dumps({"model": model_name, "temperature": 0, "max_tokens": max_tokens, "messages": [
            {"role": "user", "content": [{"type": "text", "text": text or question["question"]},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}]}
        ).encode())
    return bodies


class Server:
    """A server on a free loopback port: `meteor serve` on ``model`` with ``args``, or, given
    ``command`` (the port → the command line), another one (vLLM's OpenAI server)."""

    def __init__(self, model: Path, name: str, args: list[str], log: Path, command=None, env: dict | None = None):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.name, self.base = name, f"http://127.0.0.1:{self.port}"
        self.log = log
        if command is None:
            line = [sys.executable, "-m", "meteor", "serve", "--model", str(model), "--port", str(self.port),
                    "--model-name", "bench", "--no-ui", *args]
        else:
            line = command(self.port)
        with open(log, "w") as sink:
            self.process = subprocess.Popen(line, stdout=sink, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 300) -> None:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not healthy after {timeout} s")

    def get(self, path: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def metrics(self) -> dict:
        return json.loads(self.get("/stats")[1])

    def cpu_seconds(self) -> float:
        """CPU time so far of the server's process and its children (the model's worker)."""
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """CPU time so far of the server's own process (HTTP, images, tokenising) and of its children
        (meteor serve's model worker; vLLM's engine core and its worker)."""
        import psutil

        process = psutil.Process(self.process.pid)
        children = 0.0
        for child in process.children(recursive=True):
            try:
                children += sum(child.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
        return sum(process.cpu_times()[:2]), children

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


class ModelAlone:
    """The served model's own rate, with nothing around it: the server's batching worker
    (``BatchingWorker``, in this process, on the servers' torch threads) given every request of a
    measurement at once, as a saturated server's queue holds them, prepared as the server prepares them
    (``parse_chat_request``, ``meteor.serve.app.conversation_of``, the conversation's template) but
    with no HTTP, no JSON, no hand-over between processes. Batching over batch size 1 here is the most
    a pair of servers around this model can show: what a server adds per request is paid by both."""

    def __init__(self, model: Path, threads: int | None):
        from meteor.serve.worker import load_model

        self.model, self.processor = load_model(model)
        self.threads = threads if threads is not None else torch_threads_default()
        self.prompts: dict[str, list] = {}

    def prepare(self, workload: str, bodies: list[bytes]) -> None:
        from meteor.serve.app import conversation_of
        from meteor.serve.images import ImageResolver
        from meteor.serve.protocol import parse_chat_request

        resolver = ImageResolver(None, 1 << 40)
        prompts = []
        for body in bodies:
            request = parse_chat_request(json.loads(body), "bench", 1 << 20)
            conversation = conversation_of(request, self.processor, resolver)
            prompts.append((conversation.prompt_ids(self.processor, request.tokens_per_slice), conversation.images,
                            request))
        self.prompts[workload] = prompts

    def measure(self, workload: str, batch_size: int) -> dict:
        """Every prepared request of ``workload`` through a worker of ``batch_size``: requests per
        second (wall), CPU ms per request (this process), the batches it formed and the answers."""
        from meteor.serve.worker import BatchingWorker, Job, JobSpec

        prompts = self.prompts[workload]
        done = threading.Semaphore(0)
        worker = BatchingWorker(self.model, self.processor, max_batch_size=batch_size, batch_window=0.0,
                                queue_size=len(prompts), threads=self.threads)
        jobs = []
        for ids, images, request in prompts:
            spec = JobSpec(ids, images, request.max_tokens, request.stop, None, request.tokens_per_slice,
                           request.sampling)
            jobs.append(Job.from_spec(spec, self.processor.tokenizer,
                                      lambda event: done.release() if event[0] in ("done", "error") else None))
        for job in jobs:                        # all waiting before the worker looks, as in a full queue
            worker.submit(job)
        cpu, started = time.process_time(), time.perf_counter()
        worker.start(warmup=False)
        for _ in jobs:
            done.acquire()
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        worker.close()                          # after its last batch is counted
        stats = worker.stats()
        if stats["answered"] != len(jobs):
            raise RuntimeError(f"the model alone answered {stats['answered']} of {len(jobs)} requests: {stats}")
        return {"rps": len(jobs) / wall, "cpu_ms": 1000 * cpu / len(jobs), "batch_sizes": stats["batch_sizes"],
                "answers": [job.stream.text for job in jobs]}


def alone_rounds(alone: ModelAlone, workloads: list[str], batch_size: int, rounds: int) -> dict:
    """Batch size 1 and ``batch_size`` alternating over ``rounds`` (after one unmeasured run of
    each); per workload the median cell of each, their ratio, and how many answers of the last round
    differ between the two (greedy rows are independent, ``meteor.serve.streaming``: only float
    rounding of batched products can flip a near tie)."""
    results = {}
    for workload in workloads:
        runs: dict[int, list[dict]] = {1: [], batch_size: []}
        for size in runs:
            alone.measure(workload, size)
        for round_ in range(rounds):
            for size in (list(runs) if round_ % 2 == 0 else list(runs)[::-1]):
                runs[size].append(alone.measure(workload, size))
                cell = runs[size][-1]
                print(f"round {round_ + 1} · {workload:<9} · model alone · batch size {size:<2} {cell['rps']:6.2f} req/s  "
                      f"CPU/request {cell['cpu_ms']:.1f} ms  batches {cell['batch_sizes']}", flush=True)
        different = sum(a != b for a, b in zip(runs[1][-1]["answers"], runs[batch_size][-1]["answers"]))
        if different:
            print(f"{workload}: {different} of {len(runs[1][-1]['answers'])} answers differ between batch size 1 "
                  f"and {batch_size} (float rounding of batched products can flip a near tie)", flush=True)
        cells = {size: {key: statistics.median(cell[key] for cell in cells) for key in ("rps", "cpu_ms")}
                 for size, cells in runs.items()}
        results[workload] = {"batch_size": batch_size, "requests": len(alone.prompts[workload]),
                             "single": cells[1], "batched": cells[batch_size],
                             "ratio": cells[batch_size]["rps"] / cells[1]["rps"], "answers_differing": different,
                             "per_round": [b["rps"] / s["rps"] for s, b in zip(runs[1], runs[batch_size])]}
    return results


def run_clients(sessions: list, total: int, send, meter) -> tuple[float, tuple]:
    """One thread per session (each already connected) sends requests 0 … ``total`` - 1 back to
    back, each index taken by the next free client, through ``send(session, index)``. The clock
    starts when every thread is ready; ``meter()`` (a tuple of counters, e.g. CPU seconds) is read
    just before it starts and after it stops. Returns (wall seconds, the counters' change)."""
    lock = threading.Lock()
    counter = iter(range(total))
    start = threading.Barrier(len(sessions) + 1)

    def client(session) -> None:
        start.wait()
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            send(session, index)

    threads = [threading.Thread(target=client, args=(session,)) for session in sessions]
    for thread in threads:
        thread.start()
    before = meter()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return wall, tuple(after - earlier for after, earlier in zip(meter(), before))


def load(server: Server, bodies: list[bytes], clients: int, total: int) -> dict:
    """``clients`` threads send ``total`` requests back to back; RPS, latency percentiles and CPU
    time per request (the server's processes, and the clients: this process)."""
    import psutil

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    # every client connects before the clock starts: connecting is not what is measured
    connections = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=300) for _ in range(clients)]
    for connection in connections:
        connection.request("GET", "/health")
        connection.getresponse().read()
    headers = {"Content-Type": "application/json"}

    def send(connection, index: int) -> None:
        began = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", body=bodies[index % len(bodies)], headers=headers)
        response = connection.getresponse()
        text = response.read()
        elapsed = time.perf_counter() - began
        with lock:
            if response.status == 200:
                latencies.append(elapsed)
            else:
                failures.append(f"{response.status} {text[:200]!r}")

    before = server.metrics()
    me = psutil.Process()
    wall, (server_cpu, client_cpu) = run_clients(
        connections, total, send, lambda: (server.cpu_seconds(), sum(me.cpu_times()[:2])))
    for connection in connections:
        connection.close()
    after = server.metrics()
    sizes = {int(k): after["batch_sizes"].get(k, 0) - before["batch_sizes"].get(k, 0) for k in after["batch_sizes"]}
    batches = sum(sizes.values())
    ordered = sorted(latencies)
    return {"requests": len(latencies), "failures": failures, "seconds": round(wall, 3),
            "rps": len(latencies) / wall, "p50": percentile(ordered, 50), "p99": percentile(ordered, 99),
            "mean_batch": sum(k * v for k, v in sizes.items()) / batches if batches else None,
            "server_ms": 1000 * server_cpu / max(len(latencies), 1), "client_ms": 1000 * client_cpu / max(len(latencies), 1)}


def median_cell(cells: list[dict]) -> dict:
    """The median of each figure over rounds."""
    out = {key: statistics.median(cell[key] for cell in cells) for key in ("rps", "p50", "p99", "server_ms", "client_ms")}
    batches = [cell["mean_batch"] for cell in cells if cell["mean_batch"] is not None]
    out["mean_batch"] = statistics.median(batches) if batches else None
    return out


def percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def markdown(results: dict, meta: dict, alone: dict | None = None) -> str:
    lines = [f"Model: `{meta['model']}` ({meta['views']}); {meta['cpu']}; the model worker on "
             f"{meta['threads']} torch thread(s); batching server: `{' '.join(meta['batching'])}`; "
             + (f"both servers: `{' '.join(meta['server_args'])}`; " if meta.get("server_args") else "") +
             f"{meta['rounds']} rounds, medians; greedy.", ""]
    if results:
        lines += ["| workload | clients | worker | server | requests/s | p50 latency (s) | p99 latency (s) | mean batch "
                  "| server CPU ms/request | client CPU ms/request |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for workload, by_clients in results.items():
        for clients, modes in by_clients.items():
            for mode, cell in modes.items():
                worker, server = mode.split(": ")
                batch = "-" if cell["mean_batch"] is None else f"{cell['mean_batch']:.1f}"
                lines.append(f"| {workload} | {clients} | {worker} | {server} | {cell['rps']:.2f} | {cell['p50']:.2f} | "
                             f"{cell['p99']:.2f} | {batch} | {cell['server_ms']:.1f} | {cell['client_ms']:.1f} |")
    lines.append("")
    for workload, by_clients in results.items():
        for worker in meta["workers"]:
            ratios = ", ".join(f"{clients} client{'s' if clients > 1 else ''} {ratio(modes, worker):.2f}×"
                               for clients, modes in by_clients.items())
            lines.append(f"- {workload}, worker in a {worker}: batching / batch size 1, requests per second: {ratios}.")
    for workload, cell in (alone or {}).items():
        single, batched = cell["single"], cell["batched"]
        lines.append(f"- {workload}, the model alone (no HTTP; {cell['requests']} requests queued at once): batch size 1 "
                     f"{single['rps']:.2f} requests/s ({single['cpu_ms']:.1f} CPU ms each), batches of "
                     f"{cell['batch_size']} {batched['rps']:.2f}/s ({batched['cpu_ms']:.1f} ms): **{cell['ratio']:.2f}×** "
                     f"(per round: {', '.join(f'{r:.2f}×' for r in cell['per_round'])}), the most a pair of servers "
                     f"around this model can show.")
    return "\n".join(lines) + "\n"


def ratio(modes: dict, worker: str) -> float:
    return modes[f"{worker}: batching"]["rps"] / modes[f"{worker}: batch size 1"]["rps"]


# --- vLLM: the same folder on vLLM's OpenAI server (all tokens, Meteor at K) and on meteor serve ---------

VLLM_VISION = dict(image_size=224, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
"""The benchmark model's CLIP tower: 224-px views of 16×16 patches (256 tokens each)."""
VLLM_TEXT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=32)
"""Its LLaMA: head_dim 32 (vLLM's CPU attention takes no less), 3.4 M parameters."""
VLLM_IMAGE = (448, 448)
"""Its images: a 2×2 grid of 224-px slices plus the global view, 5 views of 256 patches, so that
K′ = 256 is every token of every view and visual tokens dominate the prompt."""
VLLM_QUESTION = "What is in the image?"


def build_vllm_model(folder: Path, tokens_per_slice: int) -> Path:
    """The benchmark's LLaVA-Meteor (built once, kept in ``folder``): real transformers parts
    (CLIPVisionModel, LlamaForCausalLM, a BPE tokenizer) from ``meteor.testing``, randomly
    initialised, K = ``tokens_per_slice``, saved with ``save_pretrained`` as a user saves one. The
    output layer's rows of the special tokens and of tokens that decode to nothing printable
    (a lone byte of a multi-byte character) are zeroed, so greedy answers never end early and every
    token streams a visible piece: every request decodes exactly max_tokens tokens on every server."""
    import torch
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from meteor.model.configuration import CompressorConfig, MeteorConfig
    from meteor.pretrained import build, save_pretrained
    from meteor.testing import tiny_clip_vision_config, tiny_llama_config, tiny_tokenizer

    recipe = json.dumps({"vision": VLLM_VISION, "text": VLLM_TEXT, "k": tokens_per_slice, "version": 1})
    if (folder / "bench_recipe.json").is_file() and (folder / "bench_recipe.json").read_text() == recipe:
        return folder
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    vision = CLIPVisionModel(tiny_clip_vision_config(**VLLM_VISION))
    language_model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **VLLM_TEXT))
    config = MeteorConfig(compressor=CompressorConfig(tokens_per_slice=tokens_per_slice, d_state=8, expand=2),
                          max_slices=6)
    model, processor = build(vision, language_model, tokenizer, config)
    silent = [i for i in range(len(tokenizer)) if i in tokenizer.all_special_ids
              or not tokenizer.decode([i]).strip() or "\ufffd" in tokenizer.decode([i])]
    with torch.no_grad():
        model.lm_head.weight[silent] = 0
    save_pretrained(folder, model, processor, overwrite=True)
    (folder / "bench_recipe.json").write_text(recipe)
    return folder


def vllm_images(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct drawn 448×448 PNGs as data URLs (shapes at random places and colours)."""
    import io
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    urls = []
    for _ in range(count):
        image = Image.new("RGB", VLLM_IMAGE, tuple(rng.randrange(40, 220) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randrange(0, 400), rng.randrange(0, 400)
            box = [x, y, x + rng.randrange(20, 160), y + rng.randrange(20, 160)]
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def stream_requests(urls: list[str], max_tokens: int, extra: dict) -> list[dict]:
    """Streamed chat requests, one image and the short question each; ``extra``: fields beyond
    OpenAI's (vLLM's ``mm_processor_kwargs``), sent as the openai client's ``extra_body``."""
    return [{"request": {"model": "bench", "temperature": 0, "max_tokens": max_tokens, "stream": True,
                         "stream_options": {"include_usage": True},
                         "messages": [{"role": "user", "content": [
                             {"type": "image_url", "image_url": {"url": url}},
                             {"type": "text", "text": VLLM_QUESTION}]}]},
             "extra": extra} for url in urls]


class KVPoller:
    """Samples vLLM's Prometheus gauges while a load runs: ``vllm:kv_cache_usage_perc`` times the
    engine's block count (``vllm:cache_config_info``'s num_gpu_blocks, less vLLM's null block) is
    the blocks in use; divided by ``vllm:num_requests_running``, the blocks a running request holds."""

    def __init__(self, server: "Server", interval: float = 0.1):
        self.server, self.interval = server, interval
        self.samples: list[tuple[int, int]] = []          # (blocks in use, requests running)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        info = self.scrape()
        self.blocks, self.block_size = info["num_gpu_blocks"], info["block_size"]

    def scrape(self) -> dict:
        text = self.server.get("/metrics")[1].decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("vllm:cache_config_info{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                out["num_gpu_blocks"], out["block_size"] = int(labels["num_gpu_blocks"]), int(labels["block_size"])
            elif line.startswith("vllm:kv_cache_usage_perc{"):
                out["usage"] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:num_requests_running{"):
                out["running"] = int(float(line.rsplit(" ", 1)[1]))
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.scrape()
            if now.get("running"):
                self.samples.append((round(now["usage"] * (self.blocks - 1)), now["running"]))
            self._stop.wait(self.interval)

    def __enter__(self) -> "KVPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def per_request(self) -> float | None:
        """Blocks in use per running request, over the samples taken while any ran."""
        blocks, running = sum(s[0] for s in self.samples), sum(s[1] for s in self.samples)
        return blocks / running if running else None

    def alone(self) -> int | None:
        """The most blocks one request held while it ran alone."""
        return max((s[0] for s in self.samples if s[1] == 1), default=None)


def stream_load(server: "Server", requests: list[dict], clients: int, total: int, kind: str) -> dict:
    """``clients`` threads (``kind`` "openai": the official client, one ``OpenAI`` each; "http":
    ``http.client``, one keep-alive connection each, reading the event stream line by line) send
    ``total`` streamed requests back to back. Time to first token: from sending to the first chunk
    with text. Requests/s, output tokens/s (from each stream's usage chunk), CPU per request."""
    import psutil

    records: list[tuple[float, float, int, int]] = []       # (ttft, latency, completion tokens, prompt tokens)
    failures: list[str] = []
    lock = threading.Lock()
    if kind == "openai":
        import openai

        sessions = [openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=900)
                    for _ in range(clients)]
        for session in sessions:
            session.models.list()                         # connected before the clock starts
    else:
        sessions = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=900) for _ in range(clients)]
        for session in sessions:
            session.request("GET", "/health")
            session.getresponse().read()

    def one_openai(session, spec: dict) -> tuple[float | None, int, int]:
        fields = dict(spec["request"])
        fields.pop("stream")
        first, usage = None, None
        began = time.perf_counter()
        for chunk in session.chat.completions.create(stream=True, extra_body=spec["extra"] or None, **fields):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - began
            if chunk.usage is not None:
                usage = chunk.usage
        return first, usage.completion_tokens, usage.prompt_tokens

    def one_http(session, spec: dict) -> tuple[float | None, int, int]:
        body = json.dumps({**spec["request"], **spec["extra"]}).encode()
        first, usage = None, None
        began = time.perf_counter()
        session.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = session.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{response.status} {response.read()[:300]!r}")
        while True:
            line = response.readline()
            if not line:
                break
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                first = time.perf_counter() - began
            if chunk.get("usage"):
                usage = chunk["usage"]
        response.read()
        return first, usage["completion_tokens"], usage["prompt_tokens"]

    one = one_openai if kind == "openai" else one_http

    def send(session, index: int) -> None:
        began = time.perf_counter()
        try:
            first, tokens, prompt = one(session, requests[index % len(requests)])
        except Exception as err:          # reported with the cell, which the caller refuses
            with lock:
                failures.append(f"{type(err).__name__}: {err}"[:300])
            return
        elapsed = time.perf_counter() - began
        with lock:
            if first is None:
                failures.append("no text streamed")
            else:
                records.append((first, elapsed, tokens, prompt))

    me = psutil.Process()
    load_before = os.getloadavg()[0]
    wall, (front, back, client_cpu) = run_clients(
        sessions, total, send, lambda: (*server.cpu_split(), sum(me.cpu_times()[:2])))
    for session in sessions:
        session.close()
    done = max(len(records), 1)
    return {"requests": len(records), "failures": failures, "seconds": round(wall, 3),
            "rps": len(records) / wall, "ttft_p50": percentile(sorted(r[0] for r in records), 50),
            "ttft_p95": percentile(sorted(r[0] for r in records), 95),
            "latency_p50": percentile(sorted(r[1] for r in records), 50),
            "output_tps": sum(r[2] for r in records) / wall,
            "completion_tokens": statistics.mean(r[2] for r in records) if records else 0,
            "prompt_tokens": statistics.mean(r[3] for r in records) if records else 0,
            "server_ms": 1000 * (front + back) / done, "front_ms": 1000 * front / done, "back_ms": 1000 * back / done,
            "client_ms": 1000 * client_cpu / done, "load": (load_before + os.getloadavg()[0]) / 2}


VLLM_FIGURES = ("rps", "ttft_p50", "ttft_p95", "latency_p50", "output_tps", "server_ms", "front_ms", "back_ms",
                "client_ms", "load",
                "prompt_tokens", "completion_tokens")


def vllm_command(python: str, model: Path, extra: list[str]):
    """vLLM's OpenAI server on the folder, as a deployment starts it (``vllm serve`` fails on the
    CPU build: the module is run instead). Prefix caching and the multimodal processor cache are off:
    the benchmark sends a few images over and over, and a cache would skip the prefills measured."""
    return lambda port: [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                         "--served-model-name", "bench", "--dtype", "float32", "--max-model-len", "2048",
                         "--limit-mm-per-prompt", json.dumps({"image": 1}), "--trust-request-mm-kwargs",
                         "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0",
                         "--disable-uvicorn-access-log", "--host", "127.0.0.1", "--port", str(port), *extra]


def run_vllm(args) -> int:
    """vLLM on all tokens, vLLM with Meteor at K and meteor serve with Meteor at K, alternating."""
    k = args.k
    folder = build_vllm_model(args.vllm_model, k)
    from meteor.model.configuration_llava_meteor import LlavaMeteorConfig  # noqa: F401  (the folder loads)
    from meteor.processing.slicing import plan_slices

    side = VLLM_VISION["image_size"] // 14
    every = side * side
    plan = plan_slices(*VLLM_IMAGE, 6, 14, VLLM_VISION["image_size"])
    assert all(rows * cols == every for rows, cols in plan.view_patches), plan
    urls = vllm_images(args.images)
    python = str(args.vllm_python)
    if not Path(python).is_file():
        raise SystemExit(f"no vLLM python at {python}: run `make vllm-env`, or give --vllm-python")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("VLLM_PLUGINS", None)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    vllm = Server(folder, "vLLM", [], logs / "bench_serve_vllm.log",
                  command=vllm_command(python, folder, [*shlex.split(args.vllm_args), "--max-num-seqs",
                                                         str(max(args.clients))]), env=env)
    serve = Server(folder, "meteor serve", [*args.server_args, *args.batching], logs / "bench_serve_meteor.log")
    configs = {   # name → (server, the request's extra fields)
        "vLLM, all tokens": (vllm, {"mm_processor_kwargs": {"tokens_per_slice": every}}),
        f"vLLM, Meteor K={k}": (vllm, {}),
        f"meteor serve, Meteor K={k}": (serve, {}),
    }
    requests = {name: stream_requests(urls, args.max_tokens, extra) for name, (_, extra) in configs.items()}
    runs = {kind: {c: {name: [] for name in configs} for c in args.clients} for kind in args.client}
    kv = {name: {"alone": None, "loaded": []} for name, (server, _) in configs.items() if server is vllm}
    started = time.monotonic()
    try:
        for server in (vllm, serve):
            server.wait(timeout=1800)
        print(f"servers up in {time.monotonic() - started:.0f} s", flush=True)
        for name, (server, _) in configs.items():          # warm: first requests pay allocations and compiles
            stream_load(server, requests[name], 4, 8, args.client[0])
        for name in kv:                                    # one request alone: the blocks it holds
            with KVPoller(vllm, interval=0.02) as poller:
                cell = stream_load(vllm, requests[name], 1, 1, "http")
            kv[name]["alone"] = poller.alone()
            kv[name]["block_size"], kv[name]["prompt_tokens"] = poller.block_size, cell["prompt_tokens"]
        for round_ in range(args.rounds):
            for kind in args.client:
                for clients in args.clients:
                    order = list(configs)[round_ % len(configs):] + list(configs)[:round_ % len(configs)]
                    for name in order:
                        server, _ = configs[name]
                        total = max(args.requests, 2 * clients)
                        if name in kv:
                            with KVPoller(vllm) as poller:
                                cell = stream_load(server, requests[name], clients, total, kind)
                            cell["kv_blocks"] = poller.per_request()
                            kv[name]["loaded"].append(cell["kv_blocks"])
                        else:
                            cell = stream_load(server, requests[name], clients, total, kind)
                        if cell["failures"]:
                            raise RuntimeError(f"{name}, {clients} clients: {cell['failures'][:3]}")
                        runs[kind][clients][name].append(cell)
                        print(f"round {round_ + 1} · {kind:<6} · {clients:>2} clients · {name:<26} "
                              f"{cell['rps']:6.2f} req/s  TTFT p50 {cell['ttft_p50']:.2f} s p95 {cell['ttft_p95']:.2f} s  "
                              f"{cell['output_tps']:6.1f} tok/s  CPU/request server {cell['front_ms']:.0f}+{cell['back_ms']:.0f} ms "
                              f"clients {cell['client_ms']:.0f} ms  load {cell['load']:.1f}", flush=True)
    finally:
        for server in (vllm, serve):
            server.stop()
    results = {kind: {c: {name: {key: statistics.median(cell[key] for cell in cells) for key in VLLM_FIGURES}
                          for name, cells in by_name.items()} for c, by_name in by_clients.items()}
               for kind, by_clients in runs.items()}
    meta = {"model": str(folder), "cpu": _cpu(), "rounds": args.rounds, "requests": args.requests,
            "max_tokens": args.max_tokens, "k": k, "every": every, "views": len(plan.view_patches),
            "batching": args.batching, "server_args": args.server_args, "vllm_args": args.vllm_args, "kv": kv,
            "vllm": subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                                   text=True, env=env).stdout.strip()}
    table = vllm_markdown(results, runs, meta)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results, "runs": runs}, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(table)
    return 0


def vllm_markdown(results: dict, runs: dict, meta: dict) -> str:
    k, every = meta["k"], meta["every"]
    lines = [f"Model: {meta['views']} views of {every} patches per {VLLM_IMAGE[0]}×{VLLM_IMAGE[1]} image, K={k}; "
             f"{meta['cpu']}; vLLM {meta['vllm']}; {meta['rounds']} rounds, medians; greedy, "
             f"{meta['max_tokens']} tokens per answer, streamed.", "",
             "| client | clients | configuration | prompt tokens | requests/s | TTFT p50 (s) | TTFT p95 (s) "
             "| output tokens/s | KV blocks / request (alone; loaded) | server CPU ms/request (HTTP process + "
             "engine/worker) | client CPU ms/request | load average |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, by_clients in results.items():
        for clients, by_name in by_clients.items():
            for name, cell in by_name.items():
                blocks = "-"
                if name in meta["kv"]:
                    loaded = [b for b in meta["kv"][name]["loaded"] if b is not None]
                    blocks = f"{meta['kv'][name]['alone']}; {statistics.median(loaded):.1f}" if loaded else \
                        f"{meta['kv'][name]['alone']}"
                lines.append(f"| {kind} | {clients} | {name} | {cell['prompt_tokens']:.0f} | {cell['rps']:.2f} | "
                             f"{cell['ttft_p50']:.2f} | {cell['ttft_p95']:.2f} | {cell['output_tps']:.1f} | {blocks} | "
                             f"{cell['server_ms']:.0f} ({cell['front_ms']:.0f} + {cell['back_ms']:.0f}) | "
                             f"{cell['client_ms']:.1f} | {cell['load']:.1f} |")
    lines.append("")
    for kind, by_clients in runs.items():
        for clients, by_name in by_clients.items():
            names = list(by_name)
            all_tokens, meteor_vllm, meteor_serve = (by_name[n] for n in names)
            for label, top, bottom in ((f"vLLM-Meteor / meteor serve", meteor_vllm, meteor_serve),
                                       (f"vLLM-Meteor K={k} / vLLM all tokens", meteor_vllm, all_tokens)):
                per_round = [a["rps"] / b["rps"] for a, b in zip(top, bottom)]
                median = statistics.median(c["rps"] for c in top) / statistics.median(c["rps"] for c in bottom)
                lines.append(f"- {kind}, {clients} clients, {label}, requests/s: {median:.2f}× (per round: "
                             + ", ".join(f"{r:.2f}×" for r in per_round) + ")")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--world", type=Path, default=None)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--clients", type=int, nargs="+", default=None, help="default 1 4 16 (--vllm: 16)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per measurement at 4 or more clients (a quarter at 1, at least 4 per client); "
                             "default 96 (--vllm: 48, at least 2 per client)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batching", default=None,
                        help="the batching server's flags, as one string (--batching='--max-batch-size 16'); default "
                             "'--max-batch-size 8 --batch-window-ms 15' (--vllm: the most clients as the batch size, "
                             "as vLLM's --max-num-seqs)")
    parser.add_argument("--server-args", default="",
                        help="flags for every meteor serve server (both of each pair; with --vllm, the one meteor serve), "
                             "as one string (--server-args='--threads 2'); default none")
    parser.add_argument("--workers", nargs="+", default=["process"], choices=["process", "thread"],
                        help="where the servers run the model (meteor serve --worker); each gets its pair of servers")
    parser.add_argument("--model-alone", choices=["also", "only", "no"], default="also",
                        help="also (default): after the servers, the model alone (ModelAlone: the batching worker "
                             "with no HTTP), batch size 1 against the batching server's --max-batch-size; only: that "
                             "alone, no servers; no: the servers only")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    vllm = parser.add_argument_group("--vllm", "vLLM's OpenAI server against meteor serve on one folder")
    vllm.add_argument("--vllm", action="store_true",
                      help="compare vLLM on all tokens, vLLM with Meteor at K and meteor serve with Meteor at K")
    vllm.add_argument("--vllm-python", type=Path,
                      default=Path(os.environ.get("METEOR_VLLM_PYTHON", Path(__file__).resolve().parent.parent
                                                  / ".venv-vllm" / "bin" / "python")),
                      help="a python with vllm-cpu and this package (`make vllm-env`; $METEOR_VLLM_PYTHON)")
    vllm.add_argument("--vllm-model", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench_serve_vllm_model",
                      help="where the benchmark's model is built (once) and served from")
    vllm.add_argument("--vllm-args", default="", help="more flags for vLLM's server, as one string")
    vllm.add_argument("--k", type=int, default=16, help="the model's K, tokens kept per view")
    vllm.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    vllm.add_argument("--images", type=int, default=16, help="distinct images the requests cycle through")
    vllm.add_argument("--client", nargs="+", default=["openai"], choices=["openai", "http"],
                      help="the clients: the official openai package, and/or http.client (less CPU per request)")
    args = parser.parse_args()
    try:
        args.server_args = shlex.split(args.server_args)
    except ValueError as err:
        parser.error(f"--server-args: {err} (give the flags as one quoted string, e.g. --server-args='--threads 2')")
    if args.vllm:
        args.clients = args.clients or [16]
        args.requests = args.requests or 48
        args.batching = shlex.split(args.batching or f"--max-batch-size {max(args.clients)} --batch-window-ms 15")
        return run_vllm(args)
    args.batching = shlex.split(args.batching or "--max-batch-size 8 --batch-window-ms 15")
    try:
        batch_size = _flag(args.batching, "--max-batch-size") or 8
        threads = _flag(args.server_args, "--threads")
    except ValueError as err:
        parser.error(f"{err} (e.g. --batching='--max-batch-size 8', --server-args='--threads 1')")
    args.clients = args.clients or [1, 4, 16]
    args.requests = args.requests or 96
    model, world = args.model, args.world
    if model is None or world is None:
        found_model, found_world = find_demo()
        model, world = model or found_model, world or found_world
    bodies = {w: requests_from_world(world, max(args.requests, 64), w, "bench") for w in args.workloads}
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    servers = {}
    for worker in (args.workers if args.model_alone != "only" else []):
        servers[f"{worker}: batching"] = Server(model, f"{worker}: batching", ["--worker", worker, *args.server_args, *args.batching],
                                                logs / f"bench_serve_{worker}_batching.log")
        servers[f"{worker}: batch size 1"] = Server(model, f"{worker}: batch size 1",
                                                    ["--worker", worker, *args.server_args, "--max-batch-size", "1"],
                                                    logs / f"bench_serve_{worker}_single.log")
    runs: dict[str, dict[int, dict[str, list[dict]]]] = {
        w: {c: {m: [] for m in servers} for c in args.clients} for w in args.workloads}
    try:
        for server in servers.values():
            server.wait()
        for server in servers.values():        # warm both: first requests pay allocations
            load(server, bodies[args.workloads[0]], 4, 8)
        threads = next(iter(servers.values())).metrics().get("threads") if servers else threads
        for round_ in range(args.rounds if servers else 0):
            for workload in args.workloads:
                for clients in args.clients:
                    order = list(servers) if round_ % 2 == 0 else list(servers)[::-1]
                    for mode in order:
                        total = max(args.requests if clients > 1 else args.requests // 4, 4 * clients)
                        cell = load(servers[mode], bodies[workload], clients, total)
                        if cell["failures"]:
                            raise RuntimeError(f"{mode}, {clients} clients: {cell['failures'][:3]}")
                        runs[workload][clients][mode].append(cell)
                        print(f"round {round_ + 1} · {workload:<9} · {clients:>2} clients · {mode:<12} "
                              f"{cell['rps']:6.2f} req/s  p50 {cell['p50']:.2f} s  p99 {cell['p99']:.2f} s  "
                              f"mean batch {cell['mean_batch'] or 0:.1f}  CPU/request server {cell['server_ms']:.1f} ms "
                              f"clients {cell['client_ms']:.1f} ms", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    results = {w: {c: {m: median_cell(cells) for m, cells in modes.items()} for c, modes in by_clients.items()}
               for w, by_clients in runs.items()} if servers else {}
    alone = None
    if args.model_alone != "no":
        model_alone = ModelAlone(model, threads)
        for workload in args.workloads:
            model_alone.prepare(workload, bodies[workload][:args.requests])
        alone = alone_rounds(model_alone, args.workloads, batch_size, args.rounds)
        threads = model_alone.threads
    from meteor.model.configuration import MeteorConfig

    config = MeteorConfig.load(model)
    meta = {"model": str(model), "views": f"K={config.compressor.tokens_per_slice} per view, up to "
            f"{config.max_slices} slices + global", "cpu": _cpu(), "threads": threads,
            "rounds": args.rounds, "batching": args.batching, "server_args": args.server_args, "workers": args.workers,
            "workloads": {w: WORKLOADS[w] for w in args.workloads}}
    table = markdown(results, meta, alone)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results, "runs": runs, "model_alone": alone},
                                        indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(table)
    return 0


def _flag(flags: list[str], name: str) -> int | None:
    """The whole-number value of ``name`` in a server's flags (``--name N`` or ``--name=N``), or None."""
    for i, flag in enumerate(flags):
        value = flags[i + 1] if flag == name and i + 1 < len(flags) else \
            flag.split("=", 1)[1] if flag.startswith(name + "=") else None
        if value is not None:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name} must be a whole number ≥ 1, got {value!r}")
            return int(value)
    return None


def torch_threads_default() -> int:
    """The model worker's torch threads when ``--threads`` is not given (``BatchingWorker``'s default)."""
    import torch

    return max(1, torch.get_num_threads() - 1)


def _cpu() -> str:
    """The CPU's model, its instruction set (AVX-512 or not) and the core count."""
    name, flags = None, set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and name is None:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name or 'unknown CPU'} ({isa}) ×{os.cpu_count()}"


if __name__ == "__main__":
    raise SystemExit(main())
