"""JIT build of the CPU selective-scan kernel (``csrc/selective_scan.cpp``), one build per instruction set.

The kernel is written on PyTorch's portable SIMD type and compiled once per instruction set, the way
PyTorch compiles its own CPU kernels (``ISA_FLAGS``): ``avx512`` (AVX-512 F/BW/VL/DQ + FMA),
``avx2`` (AVX2 + FMA) and ``default`` (the architecture's baseline: SSE2 on x86-64, NEON on
aarch64; the only one built on other architectures). Nothing in a build depends on the machine that
compiled it beyond those flags (no ``-march=native``), so a cache shared between machines stays legal.

Which one runs (``selected_isa()``): ``METEOR_SCAN_ISA=auto`` (default) takes the best the CPU runs,
no higher than PyTorch's own choice (``torch.backends.cpu.get_cpu_capability()``, which
``ATEN_CPU_CAPABILITY`` lowers); ``METEOR_SCAN_ISA=avx512|avx2|default`` (``scalar`` is an alias of
``default``) forces one, and a path this CPU cannot run is refused with an error naming those it can.

Each build is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja + the system C++
compiler) into torch's extensions directory (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), and says so on stderr while it compiles (~30 s on a 2-core machine;
later processes load it in well under a second). The module name carries the instruction set and a
hash of the source, the flags, the torch version and the Python environment (``sys.prefix``, the
torch install, the include paths), so editing the source or upgrading torch builds a fresh copy, and
two virtual environments on one machine keep separate builds instead of rebuilding each other's.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent / "csrc" / "selective_scan.cpp"
ISA_ENV_VAR = "METEOR_SCAN_ISA"
ISAS = ("avx512", "avx2", "default")  # best first
ALIASES = {"scalar": "default"}

# -O3 and no -march: the instruction set comes from ISA_FLAGS alone.
# -ffp-contract=fast: a * b + c fused into FMAs where the ISA has them (one rounding instead of two;
#   the polynomials are written for it). No -ffast-math: the exp and softplus are explicit polynomials
#   already, and fast-math would also let the compiler reorder sums.
# -fopenmp: at::parallel_for is header code that only runs in parallel when compiled with OpenMP; the
#   library links libgomp.so.1, the same soname torch's wheel loads, so one OpenMP runtime is shared.
BASE_CFLAGS = ["-O3", "-ffp-contract=fast", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
# The flags and macros PyTorch's build gives its AVX-512 / AVX2 / DEFAULT kernel copies (the macros
# select at::vec::Vectorized's implementation and put it in a namespace of its own).
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}
# What the CPU must report (torch.cpu.get_capabilities(), cpuinfo's names) to run each build: the
# same tests PyTorch's dispatcher makes.
ISA_NEEDS = {"avx512": ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "fma3"), "avx2": ("avx2", "fma3"),
             "default": ()}
_X86 = ("x86_64", "amd64", "i386", "i686")

_lock = threading.Lock()
_modules: dict[str, ModuleType] = {}
_errors: dict[str, BaseException] = {}


# ------------------------------------------------------------------------------------------------
# Which instruction sets exist, which this CPU runs, which runs


def compiled_isas() -> tuple[str, ...]:
    """The builds that exist for this architecture: all three on x86, ``default`` elsewhere."""
    return ISAS if platform.machine().lower() in _X86 else ("default",)


def cpu_isas() -> tuple[str, ...]:
    """The builds this CPU can run, best first (from torch's cpuinfo-based CPU description)."""
    try:
        caps = torch.cpu.get_capabilities()
    except AttributeError:  # torch before get_capabilities: fall back to the dispatcher's own choice
        capability = torch.backends.cpu.get_cpu_capability().lower()
        caps = {"avx512_f": True, "avx512_bw": True, "avx512_vl": True, "avx512_dq": True, "fma3": True,
                "avx2": True} if capability.startswith("avx512") else {"avx2": True, "fma3": True} \
            if capability == "avx2" else {}
    return tuple(isa for isa in compiled_isas() if all(caps.get(flag, False) for flag in ISA_NEEDS[isa]))


def torch_isa() -> str:
    """PyTorch's own choice for its CPU kernels, as one of ISAS (``ATEN_CPU_CAPABILITY`` lowers it)."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return "avx512" if capability.startswith("avx512") else "avx2" if capability == "avx2" else "default"


def auto_isa() -> str:
    """The best build this CPU runs, no higher than PyTorch's own choice."""
    ceiling = ISAS.index(torch_isa())
    return next(isa for isa in cpu_isas() if ISAS.index(isa) >= ceiling)


def cpu_name() -> str:
    try:
        name = torch.cpu.get_capabilities().get("cpu_name")
    except AttributeError:
        name = None
    return str(name or platform.processor() or platform.machine())


def selected_isa() -> str:
    """The build ``selective_scan`` runs on CPU: ``$METEOR_SCAN_ISA`` when set (and runnable), else
    ``auto_isa()``. Raises ValueError for an unknown name, RuntimeError for a build this CPU cannot run."""
    value = os.environ.get(ISA_ENV_VAR, "auto").strip().lower() or "auto"
    value = ALIASES.get(value, value)
    if value == "auto":
        return auto_isa()
    if value not in ISAS:
        raise ValueError(f"{ISA_ENV_VAR}={value!r} is not one of auto, {', '.join(ISAS)} (or scalar, an alias "
                         "of default)")
    runnable = cpu_isas()
    if value not in runnable:
        why = (f"this CPU ({cpu_name()}) lacks {'/'.join(ISA_NEEDS[value])}" if value in compiled_isas()
               else f"there is no {value} build on {platform.machine()}")
        raise RuntimeError(f"{ISA_ENV_VAR}={value} asks for the {value} selective-scan kernel, but {why}; "
                           f"this machine runs: {', '.join(runnable)}. Unset {ISA_ENV_VAR} (auto) or pick one "
                           "of those.")
    return value


# ------------------------------------------------------------------------------------------------
# Build cache


def cflags(isa: str) -> list[str]:
    return BASE_CFLAGS + ISA_FLAGS[isa]


def environment_key() -> str:
    """What distinguishes this Python environment's build from another's on the same machine: the
    prefix, the interpreter's version, the torch install and every include path the build names (not
    the interpreter's path: ``python`` and ``python3`` in one environment share a build)."""
    from torch.utils import cpp_extension

    parts = [sys.prefix, sys.version, str(Path(torch.__file__).parent), torch.__version__,
             sysconfig.get_paths().get("include", ""), *cpp_extension.include_paths(),
             os.environ.get("CXX", "c++"), platform.machine()]
    return "\n".join(parts)


def extension_name(isa: str) -> str:
    """Name under which the ``isa`` build is cached; changes with anything that changes the binary or
    the environment it was built for."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(cflags(isa) + LDFLAGS).encode(), environment_key().encode()):
        key.update(part)
        key.update(b"\0")
    return f"meteor_selective_scan_{isa}_{key.hexdigest()[:12]}"


def build_directory(isa: str) -> Path:
    """The folder the ``isa`` build lives in (``$TORCH_EXTENSIONS_DIR/<python>_<device>/<name>``)."""
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(extension_name(isa), verbose=False))


def is_built(isa: str | None = None) -> bool:
    """Whether the ``isa`` build (default: the selected one) is already compiled for this environment."""
    isa = isa or selected_isa()
    return any(build_directory(isa).glob(f"{extension_name(isa)}*.so"))


def load_isa(isa: str, verbose: bool = False) -> ModuleType:
    """Compile (first use in this environment) or load the ``isa`` build and return the module.

    The module exposes ``forward`` and ``backward`` (contracts in ``csrc/selective_scan.cpp``),
    ``release_cached_memory()``, ``isa`` and ``lanes`` (floats per vector). Loading a build the CPU
    cannot run is refused (it would die on an illegal instruction). A build failure is remembered and
    re-raised on later calls in this process rather than recompiling each time; ``RuntimeError``
    carries the compiler's output.
    """
    from torch.utils import cpp_extension

    if isa not in ISAS:
        raise ValueError(f"unknown instruction set {isa!r}; expected one of {', '.join(ISAS)}")
    if isa not in cpu_isas():
        raise RuntimeError(f"this CPU ({cpu_name()}) cannot run the {isa} selective-scan kernel; it runs: "
                           f"{', '.join(cpu_isas())}")
    with _lock:
        if isa in _modules:
            return _modules[isa]
        if isa in _errors:
            raise RuntimeError(f"the meteor selective-scan kernel ({isa}) failed to build earlier: "
                               f"{_errors[isa]}") from _errors[isa]
        try:
            if not is_built(isa):
                print(f"meteor: compiling the selective-scan kernel for {isa} (first use in this environment, "
                      f"~30 s) into {build_directory(isa)} ...", file=sys.stderr, flush=True)
            # copies: cpp_extension.load appends torch's own flags to the lists it is given
            module = cpp_extension.load(name=extension_name(isa), sources=[str(SOURCE)], extra_cflags=cflags(isa),
                                        extra_ldflags=list(LDFLAGS), verbose=verbose)
        except Exception as exc:  # compiler missing, ninja missing, compile error: all reported the same way
            _errors[isa] = exc
            raise
        if module.isa != isa:
            raise RuntimeError(f"the {isa} build of the selective-scan kernel reports {module.isa!r}: "
                               f"check ISA_FLAGS in {__file__}")
        _modules[isa] = module
        return module


def build_extension(verbose: bool = False, isa: str | None = None) -> ModuleType:
    """Compile (first call) or load the selected CPU selective-scan build (``selected_isa()``, or
    ``isa`` when given) and return the module; see ``load_isa``."""
    return load_isa(isa or selected_isa(), verbose=verbose)


def release_cached_memory() -> None:
    """Hand the idle output blocks every loaded build keeps for reuse back to the OS."""
    for module in list(_modules.values()):
        module.release_cached_memory()


def error_gist(exc: BaseException, max_lines: int = 6) -> str:
    """The few lines of a build failure worth showing in a warning (compiler errors first)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return " | ".join((errors or lines)[:max_lines])
