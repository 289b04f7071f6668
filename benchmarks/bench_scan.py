"""Selective scan: the per-step reference loop vs the fast path, at the FGF shape by default.

    python benchmarks/bench_scan.py                         # batch 7, L 1153, d_inner 2048, N 16, 2 threads
    python benchmarks/bench_scan.py --repeats 15 --ref-repeats 3
    python benchmarks/bench_scan.py --batch 1 --skip-reference --skip-memory

The scan is called as the Mamba block calls it: delta_softplus=True with D, z and delta_bias (one row
also passes delta and z as the transposed views meteor.model.projectors.top_down.mamba makes, read without copies). Times are
the minimum over repeats (the median is printed too: the machine is shared, so the minimum is the
figure least disturbed by other work); the paths alternate within each repeat so they see the same
conditions. The floor is the scan's ~9 flops per (batch, channel, step, state) at the fp32 matmul rate
measured in the same run (PERFORMANCE.md: ≈ 2.4 GFLOP ≈ 12 ms at the FGF shape).

Extra peak memory is measured in a fresh subprocess per case: after the inputs exist (and the kernel
is loaded and warmed up), the process's peak RSS is reset (`echo 5 > /proc/self/clear_refs`), the case
runs once, and VmHWM minus the RSS before is the extra peak. That counts every byte the op touches,
whoever allocated it (torch, the kernel's own buffers, glibc), which allocator statistics would not.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from meteor.model.ops import build_extension, scan_backend, selective_scan, selective_scan_ref

FLOPS_PER_ELEMENT = 9  # dt*A, exp (~3), dt*B*u (2), state update (2), C*h accumulate (1): PERFORMANCE.md's count


def make_inputs(batch: int, dim: int, length: int, dstate: int, requires_grad: bool = False, seed: int = 0,
                mamba_layout: bool = False):
    """Inputs shaped and scaled like a Mamba block's at initialisation (A = -[1..N], dt in [1e-3, 1e-1]).

    mamba_layout: delta and z as transposed (batch, L, d_inner) tensors, as meteor.model.projectors.top_down.mamba produces them.
    """
    gen = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=gen) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    tensors = {
        "u": torch.randn(batch, dim, length, generator=gen),
        "delta": torch.randn(batch, dim, length, generator=gen) * 0.1,
        "A": -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, dstate, length, generator=gen),
        "C": torch.randn(batch, dstate, length, generator=gen),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=gen),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus, as Mamba initialises it
    }
    if mamba_layout:
        for name in ("delta", "z"):
            tensors[name] = tensors[name].transpose(1, 2).contiguous().transpose(1, 2)
    return {k: v.requires_grad_(requires_grad) for k, v in tensors.items()}


def call(fn, t):
    return fn(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], delta_bias=t["delta_bias"],
              delta_softplus=True)


def forward(fn, shape, grad: bool = False, mamba_layout: bool = False):
    inputs = make_inputs(*shape, requires_grad=grad, mamba_layout=mamba_layout)
    if grad:
        return lambda: call(fn, inputs)
    return lambda: torch.no_grad()(call)(fn, inputs)


def forward_backward(fn, shape):
    inputs = make_inputs(*shape, requires_grad=True)
    gout = torch.randn(shape[0], shape[1], shape[2], generator=torch.Generator().manual_seed(1))
    return lambda: call(fn, inputs).backward(gout)


def matmul_gflops(repeats: int = 5, n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_cases(cases: dict, repeats: dict) -> dict:
    """Minimum and median seconds per case; cases alternate within each round."""
    samples = {name: [] for name in cases}
    for name, fn in cases.items():  # warm-up: builds/loads the kernel, starts threads, fills the pool
        fn()
    for round_ in range(max(repeats.values())):
        for name, fn in cases.items():
            if round_ < repeats[name]:
                samples[name].append(_timed(fn))
    return {name: (min(s), statistics.median(s)) for name, s in samples.items()}


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# ------------------------------------------------------------------------------------------------
# Peak memory, one case per fresh process


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(case: str, shape, threads: int) -> None:
    torch.set_num_threads(threads)
    fn = selective_scan_ref if case.startswith("reference") else selective_scan
    if fn is selective_scan:
        build_extension()
        call(selective_scan, make_inputs(1, 16, 8, shape[3], requires_grad=True)).sum().backward()  # warm up
    run = forward_backward(fn, shape) if case.endswith("fwd+bwd") else forward(fn, shape, grad=case.endswith("grad"))
    inputs_bytes = sum(t.numel() * t.element_size() for t in make_inputs(*shape).values())
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    result = run()
    peak = _status("VmHWM")
    del result
    print(json.dumps({"extra": peak - before, "inputs": inputs_bytes}))


def measure_memory(case: str, args) -> tuple[int, int] | None:
    command = [sys.executable, __file__, "--memory-child", case, "--batch", str(args.batch), "--dim",
               str(args.dim), "--length", str(args.length), "--dstate", str(args.dstate), "--threads",
               str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  (memory for {case} not measured: {done.stderr.strip().splitlines()[-1:]})")
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["extra"], result["inputs"]


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=7, help="slices (FGF: 7)")
    parser.add_argument("--dim", type=int, default=2048, help="d_inner (FGF: 2048)")
    parser.add_argument("--length", type=int, default=1153, help="L (FGF: 2·576 + 1)")
    parser.add_argument("--dstate", type=int, default=16, help="N")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of the fast path")
    parser.add_argument("--ref-repeats", type=int, default=2, help="timed runs of the reference loop")
    parser.add_argument("--skip-reference", action="store_true", help="time only the fast path")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.batch, args.dim, args.length, args.dstate)
    if args.memory_child:
        memory_child(args.memory_child, shape, args.threads)
        return

    torch.set_num_threads(args.threads)
    backend = scan_backend("cpu")
    start = time.perf_counter()
    build_extension()
    load_seconds = time.perf_counter() - start
    gflops = matmul_gflops()
    floor_ms = FLOPS_PER_ELEMENT * args.batch * args.dim * args.length * args.dstate / gflops / 1e6

    cases = {"fast forward": forward(selective_scan, shape),
             "fast forward (grad)": forward(selective_scan, shape, grad=True),
             "fast forward (Mamba layouts)": forward(selective_scan, shape, mamba_layout=True),
             "fast fwd+bwd": forward_backward(selective_scan, shape)}
    repeats = {name: args.repeats for name in cases}
    if not args.skip_reference:
        cases |= {"reference forward": forward(selective_scan_ref, shape),
                  "reference fwd+bwd": forward_backward(selective_scan_ref, shape)}
        repeats |= {"reference forward": args.ref_repeats, "reference fwd+bwd": args.ref_repeats}
    times = time_cases(cases, repeats)

    print(f"machine: {machine()}")
    print(f"shape: batch {args.batch}, d_inner {args.dim}, L {args.length}, N {args.dstate}; "
          f"delta_softplus, D, z, delta_bias; fast path = {backend} ({build_extension().simd}), "
          f"extension load {load_seconds:.1f} s")
    print(f"fp32 matmul {gflops:.0f} GFLOP/s -> floor {floor_ms:.1f} ms "
          f"({FLOPS_PER_ELEMENT * args.batch * args.dim * args.length * args.dstate / 1e9:.2f} GFLOP)")
    print()
    print("| case | min ms | median ms | reference / fast | fast / floor |")
    print("|---|---:|---:|---:|---:|")
    for name, (best, median) in times.items():
        ref_name = "reference forward" if "forward" in name else "reference fwd+bwd"
        speedup = ""
        if name.startswith("fast") and ref_name in times:
            speedup = f"{times[ref_name][0] / best:.1f}×"
        floor = f"{best * 1e3 / floor_ms:.1f}×" if name.startswith("fast forward") else ""
        print(f"| {name} | {best * 1e3:.1f} | {median * 1e3:.1f} | {speedup} | {floor} |")

    if args.skip_memory:
        return
    print()
    print("| case (fresh process, one call) | extra peak MB | / inputs' size |")
    print("|---|---:|---:|")
    memory_cases = ["fast forward", "fast forward grad", "fast fwd+bwd"]
    if not args.skip_reference:
        memory_cases += ["reference forward", "reference fwd+bwd"]
    for case in memory_cases:
        measured = measure_memory(case, args)
        if measured:
            extra, inputs_bytes = measured
            print(f"| {case} | {extra / 1e6:.0f} | {extra / inputs_bytes:.2f}× (inputs {inputs_bytes / 1e6:.0f} MB) |")


if __name__ == "__main__":
    main()
