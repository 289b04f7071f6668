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
(HTTP side and model worker) and of the clients. The clients use the standard library's
`http.client`, a tenth of httpx's CPU per request, since they share the machine with the servers
they measure. Rounds alternate the servers, so load from elsewhere on the machine falls on all of
them; each cell is the median over rounds.

    python benchmarks/bench_serve.py [--model DIR] [--world DIR] [--clients 1 4 16] [--rounds 3]
                                     [--requests 96] [--workloads questions captions]
                                     [--workers process thread] [--json out.json] [--markdown out.md]

Without --model it uses the full demo's K=16 model (meteor-demo/runs/k16/stage2/model, or
/tmp/demo_after/... when that exists); without a world folder, the model's demo world beside it.
"""

from __future__ import annotations

import argparse
import base64
import http.client
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
        import psutil

        process = psutil.Process(self.process.pid)
        return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def load(server: Server, bodies: list[bytes], clients: int, total: int) -> dict:
    """``clients`` threads send ``total`` requests back to back; RPS, latency percentiles and CPU
    time per request (the server's processes, and the clients: this process)."""
    import psutil

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(total))
    # every client connects before the clock starts: connecting is not what is measured
    connections = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=300) for _ in range(clients)]
    for connection in connections:
        connection.request("GET", "/health")
        connection.getresponse().read()
    start = threading.Barrier(clients + 1)
    headers = {"Content-Type": "application/json"}

    def client(connection) -> None:
        start.wait()
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
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
    threads = [threading.Thread(target=client, args=(connection,)) for connection in connections]
    for thread in threads:
        thread.start()
    me = psutil.Process()
    server_cpu, client_cpu = server.cpu_seconds(), sum(me.cpu_times()[:2])
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    server_cpu, client_cpu = server.cpu_seconds() - server_cpu, sum(me.cpu_times()[:2]) - client_cpu
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


def markdown(results: dict, meta: dict) -> str:
    lines = [f"Model: `{meta['model']}` ({meta['views']}); {meta['cpu']}; the model worker on "
             f"{meta['threads']} torch thread(s); batching server: `{' '.join(meta['batching'])}`; "
             f"{meta['rounds']} rounds, medians; greedy.", "",
             "| workload | clients | worker | server | requests/s | p50 latency (s) | p99 latency (s) | mean batch "
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
    return "\n".join(lines) + "\n"


def ratio(modes: dict, worker: str) -> float:
    return modes[f"{worker}: batching"]["rps"] / modes[f"{worker}: batch size 1"]["rps"]


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
    parser.add_argument("--workers", nargs="+", default=["process"], choices=["process", "thread"],
                        help="where the servers run the model (meteor serve --worker); each gets its pair of servers")
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
    servers = {}
    for worker in args.workers:
        servers[f"{worker}: batching"] = Server(model, f"{worker}: batching", ["--worker", worker, *args.batching],
                                                logs / f"bench_serve_{worker}_batching.log")
        servers[f"{worker}: batch size 1"] = Server(model, f"{worker}: batch size 1",
                                                    ["--worker", worker, "--max-batch-size", "1"],
                                                    logs / f"bench_serve_{worker}_single.log")
    runs: dict[str, dict[int, dict[str, list[dict]]]] = {
        w: {c: {m: [] for m in servers} for c in args.clients} for w in args.workloads}
    try:
        for server in servers.values():
            server.wait()
        for server in servers.values():        # warm both: first requests pay allocations
            load(server, bodies[args.workloads[0]], 4, 8)
        threads = next(iter(servers.values())).metrics().get("threads")
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
                              f"mean batch {cell['mean_batch'] or 0:.1f}  CPU/request server {cell['server_ms']:.1f} ms "
                              f"clients {cell['client_ms']:.1f} ms", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    results = {w: {c: {m: median_cell(cells) for m, cells in modes.items()} for c, modes in by_clients.items()}
               for w, by_clients in runs.items()}
    from meteor.model.configuration import MeteorConfig

    config = MeteorConfig.load(model)
    meta = {"model": str(model), "views": f"K={config.compressor.tokens_per_slice} per view, up to "
            f"{config.max_slices} slices + global", "cpu": _cpu(), "threads": threads,
            "rounds": args.rounds, "batching": args.batching, "workers": args.workers,
            "workloads": {w: WORKLOADS[w] for w in args.workloads}}
    table = markdown(results, meta)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results, "runs": runs}, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(table)
    return 0


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
