"""Throughput and latency of `meteor serve` with batching against batch size 1.

Two real servers on loopback, one with the default batching (`--max-batch-size 8 --batch-window-ms
15`) and one with `--max-batch-size 1`, both on the demo's model; 1, 4 and 16 concurrent clients
(threads, one HTTP connection each, connected before the clock starts) send requests back to back
with the world's test images as data URLs, greedy, in two workloads: the world's test questions
(1-2 token answers, `max_tokens` 8 as the world runner allows) and captions ("Describe the
image.", the stage-1 task: 15-64 token answers, `max_tokens` 64). Per setting: requests per
second over the whole run, p50 and p99 latency, and the mean batch size the server reports
(/metrics). Rounds alternate the two servers, so load from elsewhere on the machine falls on both;
each cell is the median over rounds.

    python benchmarks/bench_serve.py [--model DIR] [--world DIR] [--clients 1 4 16] [--rounds 3]
                                     [--requests 96] [--workloads questions captions]
                                     [--json out.json] [--markdown out.md]

Without --model it uses the full demo's K=16 model (meteor-demo/runs/k16/stage2/model, or
/tmp/demo_after/... when that exists); without a world folder, the model's demo world beside it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
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
    def __init__(self, model: Path, name: str, args: list[str], log: Path):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.name, self.base = name, f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "w") as sink:
            self.process = subprocess.Popen([sys.executable, "-m", "meteor", "serve", "--model", str(model), "--port",
                                             str(self.port), "--model-name", "bench", "--no-ui", *args],
                                            stdout=sink, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 300) -> None:
        import httpx

        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not healthy after {timeout} s")

    def metrics(self) -> dict:
        import httpx

        return httpx.get(self.base + "/metrics", timeout=10).json()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def load(server: Server, bodies: list[bytes], clients: int, total: int) -> dict:
    """``clients`` threads send ``total`` requests back to back; RPS and latency percentiles."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(total))
    # every client connects before the clock starts: creating httpx clients and their first
    # connections is not what is measured
    https = [httpx.Client(timeout=300, headers={"Content-Type": "application/json"}) for _ in range(clients)]
    for http in https:
        http.get(server.base + "/health")
    start = threading.Barrier(clients + 1)

    def client(http) -> None:
        start.wait()
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            began = time.perf_counter()
            response = http.post(server.base + "/v1/chat/completions", content=bodies[index % len(bodies)])
            elapsed = time.perf_counter() - began
            with lock:
                if response.status_code == 200:
                    latencies.append(elapsed)
                else:
                    failures.append(f"{response.status_code} {response.text[:200]}")

    before = server.metrics()
    threads = [threading.Thread(target=client, args=(http,)) for http in https]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    for http in https:
        http.close()
    after = server.metrics()
    sizes = {int(k): after["batch_sizes"].get(k, 0) - before["batch_sizes"].get(k, 0) for k in after["batch_sizes"]}
    batches = sum(sizes.values())
    ordered = sorted(latencies)
    return {"requests": len(latencies), "failures": failures, "seconds": round(wall, 3),
            "rps": len(latencies) / wall, "p50": percentile(ordered, 50), "p99": percentile(ordered, 99),
            "mean_batch": sum(k * v for k, v in sizes.items()) / batches if batches else None}


def median_cell(cells: list[dict]) -> dict:
    """The median of each figure over rounds."""
    out = {key: statistics.median(cell[key] for cell in cells) for key in ("rps", "p50", "p99")}
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


def markdown(results: dict, meta: dict) -> str:
    lines = [f"Model: `{meta['model']}` ({meta['views']}); {meta['cpu']}; the model worker on "
             f"{meta['threads']} torch thread(s); batching server: `{' '.join(meta['batching'])}`; "
             f"{meta['rounds']} rounds, medians; greedy.", "",
             "| workload | clients | server | requests/s | p50 latency (s) | p99 latency (s) | mean batch |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for workload, by_clients in results.items():
        for clients, modes in by_clients.items():
            for mode, cell in modes.items():
                batch = "-" if cell["mean_batch"] is None else f"{cell['mean_batch']:.1f}"
                lines.append(f"| {workload} | {clients} | {mode} | {cell['rps']:.2f} | {cell['p50']:.2f} | "
                             f"{cell['p99']:.2f} | {batch} |")
    lines.append("")
    for workload, by_clients in results.items():
        ratios = ", ".join(f"{clients} client{'s' if clients > 1 else ''} {ratio(modes):.2f}×"
                           for clients, modes in by_clients.items())
        lines.append(f"- {workload}: batching / batch size 1, requests per second: {ratios}.")
    return "\n".join(lines) + "\n"


def ratio(modes: dict) -> float:
    return modes["batching"]["rps"] / modes["batch size 1"]["rps"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--world", type=Path, default=None)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=96,
                        help="requests per measurement at 4 or more clients (a quarter at 1, at least 4 per client)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batching", default="--max-batch-size 8 --batch-window-ms 15",
                        help="the batching server's flags, as one string (--batching='--max-batch-size 16')")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    args.batching = shlex.split(args.batching)
    model, world = args.model, args.world
    if model is None or world is None:
        found_model, found_world = find_demo()
        model, world = model or found_model, world or found_world
    bodies = {w: requests_from_world(world, max(args.requests, 64), w, "bench") for w in args.workloads}
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    servers = {"batching": Server(model, "batching", list(args.batching), logs / "bench_serve_batching.log"),
               "batch size 1": Server(model, "batch size 1", ["--max-batch-size", "1"], logs / "bench_serve_single.log")}
    runs: dict[str, dict[int, dict[str, list[dict]]]] = {
        w: {c: {m: [] for m in servers} for c in args.clients} for w in args.workloads}
    try:
        for server in servers.values():
            server.wait()
        for server in servers.values():        # warm both: first requests pay allocations
            load(server, bodies[args.workloads[0]], 4, 8)
        threads = servers["batching"].metrics().get("threads")
        for round_ in range(args.rounds):
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
                              f"mean batch {cell['mean_batch'] or 0:.1f}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    results = {w: {c: {m: median_cell(cells) for m, cells in modes.items()} for c, modes in by_clients.items()}
               for w, by_clients in runs.items()}
    from meteor.model.configuration import MeteorConfig

    config = MeteorConfig.load(model)
    meta = {"model": str(model), "views": f"K={config.compressor.tokens_per_slice} per view, up to "
            f"{config.max_slices} slices + global", "cpu": _cpu(), "threads": threads,
            "rounds": args.rounds, "batching": args.batching, "workloads": {w: WORKLOADS[w] for w in args.workloads}}
    table = markdown(results, meta)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results, "runs": runs}, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(table)
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ×{os.cpu_count()}"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    raise SystemExit(main())
