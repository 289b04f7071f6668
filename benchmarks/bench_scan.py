"""Selective scan, per instruction-set path: the fused CPU kernel vs the per-step PyTorch loop and the floor.

    python benchmarks/bench_scan.py                      # FGF shape, 2 threads, every path this CPU runs
    python benchmarks/bench_scan.py --paths avx2         # one path (METEOR_SCAN_ISA=avx2 for its rows)
    python benchmarks/bench_scan.py --previous OLD.cpp   # also time an earlier kernel source, same run
    python benchmarks/bench_scan.py --batch 1 --skip-loop --skip-memory

Shape: batch 7 (slices), L = 2·576 + 1 = 1153, d_inner 2048, N 16 by default (the FGF shape), fp32,
called as the Mamba block calls it: delta_softplus=True with D, z and delta_bias. Every path this CPU
runs (``meteor.model.ops._build.cpu_isas()``: avx512, avx2, default) is forced in turn with
``METEOR_SCAN_ISA``, so one run on an AVX-512 machine also measures the AVX2 and baseline code.

Reported per path: forward (no grad), forward with delta and z as the transposed views the Mamba block
passes, forward + backward; the per-step PyTorch loop (``selective_scan_ref``, the reference) over the
same calls; and the floor: the scan's ~9 flops per (batch, channel, step, state) at the fp32 matmul rate
measured in the same run (a 2048³ product, timed in the same rounds). Times are the minimum over the
repeats (medians are printed too): every case runs once per round, so all see the same conditions.

Extra peak memory is measured in a fresh subprocess per case: after the inputs exist (and the kernel
is loaded and warmed up), the process's peak RSS is reset (``echo 5 > /proc/self/clear_refs``), the case
runs once, and VmHWM minus the RSS before is the extra peak. That counts every byte the op touches,
whoever allocated it (torch, the kernel's own buffers, glibc), which allocator statistics would not.

``--previous SOURCE`` compiles another version of ``csrc/selective_scan.cpp`` (e.g. from
``git show OLD:src/meteor/model/ops/csrc/selective_scan.cpp``) with ``--previous-cflags`` (default: the
flags the kernel used to be built with) and times it through the same autograd wrapper, for a
before/after comparison on one machine in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from meteor.model.ops import ENV_VAR, ISA_ENV_VAR, selective_scan, selective_scan_ref
from meteor.model.ops import _build
from meteor.model.ops.selective_scan import scan_with

FLOPS_PER_ELEMENT = 9  # dt*A, exp (~3), dt*B*u (2), state update (2), C*h accumulate (1)
PREVIOUS_CFLAGS = "-O3 -march=native -ffp-contract=fast -fopenmp"


def make_inputs(batch: int, dim: int, length: int, dstate: int, requires_grad: bool = False, seed: int = 0,
                mamba_layout: bool = False):
    """Inputs shaped and scaled like a Mamba block's at initialisation (A = -[1..N], dt in [1e-3, 1e-1]).

    mamba_layout: delta and z as transposed (batch, L, d_inner) tensors, as
    meteor.model.projectors.top_down.mamba produces them.
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


# ------------------------------------------------------------------------------------------------
# What is timed: a scan implementation (fn) on one path


@contextlib.contextmanager
def isa_forced(isa: str | None):
    """METEOR_SCAN_ISA=isa for the duration (None: leave it as it is)."""
    if isa is None:
        yield
        return
    before = os.environ.get(ISA_ENV_VAR)
    os.environ[ISA_ENV_VAR] = isa
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ISA_ENV_VAR, None)
        else:
            os.environ[ISA_ENV_VAR] = before


def call(fn, t):
    return fn(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], delta_bias=t["delta_bias"],
              delta_softplus=True)


_shared: dict = {}


def shared_inputs(shape, requires_grad: bool = False, mamba_layout: bool = False):
    """One set of inputs per kind, shared by every case that uses that kind (the FGF shape's inputs are
    200 MB, and the loop's forward + backward needs another 6 GB)."""
    key = (tuple(shape), requires_grad, mamba_layout)
    if key not in _shared:
        _shared[key] = make_inputs(*shape, requires_grad=requires_grad, mamba_layout=mamba_layout)
    return _shared[key]


def forward(fn, shape, isa=None, grad: bool = False, mamba_layout: bool = False):
    inputs = shared_inputs(shape, grad, mamba_layout)

    def run():
        with isa_forced(isa), torch.set_grad_enabled(grad):
            return call(fn, inputs)
    return run


def forward_backward(fn, shape, isa=None):
    inputs = shared_inputs(shape, requires_grad=True)
    gout = torch.randn(shape[0], shape[1], shape[2], generator=torch.Generator().manual_seed(1))

    def run():
        with isa_forced(isa):
            call(fn, inputs).backward(gout)
        for t in inputs.values():
            t.grad = None  # the next case starts without gradients to accumulate into
    return run


def previous_kernels(source: str, cflags: str):
    """An earlier kernel source, compiled (cached) under a name of its own."""
    from torch.utils import cpp_extension

    flags = cflags.split()
    key = hashlib.sha256(Path(source).read_bytes() + " ".join(flags).encode() + _build.environment_key().encode())
    return cpp_extension.load(name=f"meteor_scan_previous_{key.hexdigest()[:12]}", sources=[source],
                              extra_cflags=flags, extra_ldflags=["-fopenmp"])


def previous_fn(source: str, cflags: str):
    kernels = previous_kernels(source, cflags)
    return lambda *args, **kwargs: scan_with(kernels, *args, **kwargs)


def matmul(n: int = 2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return lambda: a @ b


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_cases(cases: dict, repeats: dict) -> dict:
    """Minimum and median seconds per case; every case runs once per round (up to its repeats)."""
    samples = {name: [] for name in cases}
    for name, fn in cases.items():  # warm-up: builds/loads the kernels, starts threads, fills the pools
        fn()
    for round_ in range(max(repeats.values())):
        for name, fn in cases.items():
            if round_ < repeats[name]:
                samples[name].append(_timed(fn))
    return {name: (min(s), statistics.median(s)) for name, s in samples.items()}


def machine() -> str:
    model = _build.cpu_name()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model} ({platform.machine()}; torch's capability {torch.backends.cpu.get_cpu_capability()}; "
            f"paths this CPU runs: {', '.join(_build.cpu_isas())}), {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


# ------------------------------------------------------------------------------------------------
# Peak memory, one case per fresh process


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(case: str, shape, threads: int, previous: str | None, previous_cflags: str) -> None:
    """case: "<impl>:<fwd|fwd+bwd>", impl = an ISA, "loop" or "previous"."""
    torch.set_num_threads(threads)
    impl, what = case.split(":")
    isa = impl if impl in _build.ISAS else None
    fn = selective_scan_ref if impl == "loop" else previous_fn(previous, previous_cflags) if impl == "previous" \
        else selective_scan
    if impl != "loop":  # load and warm up the kernel (threads, code pages) before the baseline
        with isa_forced(isa):
            call(fn, make_inputs(1, 16, 8, shape[3], requires_grad=True)).sum().backward()
    run = forward_backward(fn, shape, isa) if what == "fwd+bwd" else forward(fn, shape, isa)
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
               str(args.threads), "--previous-cflags", args.previous_cflags]
    if args.previous:
        command += ["--previous", args.previous]
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
    parser.add_argument("--paths", default="", help="comma-separated ISAs to time (default: all this CPU runs)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each fast path")
    parser.add_argument("--slow-repeats", type=int, default=3,
                        help="timed runs of the loop and of the default (baseline) path")
    parser.add_argument("--skip-loop", action="store_true", help="do not time the per-step PyTorch loop")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--previous", help="an earlier csrc/selective_scan.cpp to time beside the current one")
    parser.add_argument("--previous-cflags", default=PREVIOUS_CFLAGS, help="flags for --previous")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.batch, args.dim, args.length, args.dstate)
    if args.memory_child:
        memory_child(args.memory_child, shape, args.threads, args.previous, args.previous_cflags)
        return

    torch.set_num_threads(args.threads)
    os.environ[ENV_VAR] = "cpp"  # a kernel that fails to build stops the benchmark instead of falling back
    runnable = _build.cpu_isas()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()] or list(runnable)
    for path in paths:
        if path not in runnable:
            raise SystemExit(f"--paths {path}: this CPU runs only {', '.join(runnable)}")
    load_seconds = {}
    for path in paths:
        start = time.perf_counter()
        _build.load_isa(path)
        load_seconds[path] = time.perf_counter() - start

    cases, repeats = {"matmul": matmul()}, {"matmul": args.repeats}
    for path in paths:
        slow = path == "default"
        cases |= {f"{path} forward": forward(selective_scan, shape, path),
                  f"{path} forward (Mamba layouts)": forward(selective_scan, shape, path, mamba_layout=True),
                  f"{path} fwd+bwd": forward_backward(selective_scan, shape, path)}
        repeats |= {f"{path} forward": args.slow_repeats if slow else args.repeats,
                    f"{path} forward (Mamba layouts)": args.slow_repeats if slow else args.repeats,
                    f"{path} fwd+bwd": args.slow_repeats if slow else args.repeats}
    if args.previous:
        fn = previous_fn(args.previous, args.previous_cflags)
        cases |= {"previous forward": forward(fn, shape), "previous fwd+bwd": forward_backward(fn, shape)}
        repeats |= {"previous forward": args.repeats, "previous fwd+bwd": args.repeats}
    if not args.skip_loop:
        cases |= {"loop forward": forward(selective_scan_ref, shape),
                  "loop fwd+bwd": forward_backward(selective_scan_ref, shape)}
        repeats |= {"loop forward": args.slow_repeats, "loop fwd+bwd": args.slow_repeats}
    times = time_cases(cases, repeats)

    gflops = 2 * 2048**3 / times["matmul"][0] / 1e9
    flops = FLOPS_PER_ELEMENT * args.batch * args.dim * args.length * args.dstate
    floor = flops / (gflops * 1e9)
    print(f"machine: {machine()}")
    print(f"shape: batch {args.batch}, d_inner {args.dim}, L {args.length}, N {args.dstate}, fp32; "
          "delta_softplus, D, z, delta_bias")
    print(f"fp32 matmul {gflops:.0f} GFLOP/s (2048³, same rounds) -> floor {floor * 1e3:.1f} ms "
          f"for the scan's {flops / 1e9:.2f} GFLOP")
    print("kernel builds: " + ", ".join(f"{p} {'compiled' if s > 5 else 'loaded'} in {s:.1f} s"
                                        for p, s in load_seconds.items()))
    if torch.backends.cpu.get_cpu_capability().lower().startswith("avx512") and "avx2" in paths:
        print("(this CPU has AVX-512: the avx2 and default rows run those builds, forced with METEOR_SCAN_ISA)")
    print()

    def ms(name, which=0):
        return times[name][which] * 1e3

    loop_f = times.get("loop forward", (None,))[0]
    loop_fb = times.get("loop fwd+bwd", (None,))[0]
    print("| path | forward ms (median) | Mamba layouts ms | fwd+bwd ms (median) | loop / fwd | loop / fwd+bwd "
          "| fwd / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = [(p, f"{p} forward", f"{p} forward (Mamba layouts)", f"{p} fwd+bwd") for p in paths]
    if args.previous:
        rows.append(("previous kernel", "previous forward", None, "previous fwd+bwd"))
    for label, f, fm, fb in rows:
        ratio_f = f"{loop_f / times[f][0]:.1f}×" if loop_f else ""
        ratio_fb = f"{loop_fb / times[fb][0]:.1f}×" if loop_fb else ""
        mamba = f"{ms(fm):.1f}" if fm else ""
        print(f"| {label} | {ms(f):.1f} ({ms(f, 1):.1f}) | {mamba} | {ms(fb):.1f} ({ms(fb, 1):.1f}) | {ratio_f} "
              f"| {ratio_fb} | {times[f][0] / floor:.2f}× |")
    if loop_f:
        print(f"| loop (selective_scan_ref) | {ms('loop forward'):.0f} ({ms('loop forward', 1):.0f}) | "
              f"| {ms('loop fwd+bwd'):.0f} ({ms('loop fwd+bwd', 1):.0f}) | | | |")
    print(f"| floor | {floor * 1e3:.1f} | | | | | |")

    if args.skip_memory:
        return
    print()
    print("| case (fresh process, one call) | extra peak MB | / inputs' size |")
    print("|---|---:|---:|")
    impls = list(paths) + (["previous"] if args.previous else []) + ([] if args.skip_loop else ["loop"])
    for impl in impls:
        for what in ("fwd", "fwd+bwd"):
            measured = measure_memory(f"{impl}:{what}", args)
            if measured:
                extra, inputs_bytes = measured
                print(f"| {impl} {what} | {extra / 1e6:.0f} | {extra / inputs_bytes:.2f}× "
                      f"(inputs {inputs_bytes / 1e6:.0f} MB) |")


if __name__ == "__main__":
    main()
