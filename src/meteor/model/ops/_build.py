"""JIT build of the CPU selective-scan kernel (``csrc/selective_scan.cpp``).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (ninja + the system C++
compiler) into torch's extensions directory (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). The module name carries a hash of the source, the flags, the torch
version and the CPU model, so editing the source, upgrading torch, or sharing the cache with a
machine whose ``-march=native`` differs builds a fresh copy instead of loading a stale or illegal one.
The first build takes about 25 s on this 2-core machine; later processes load the cached library in
well under a second.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent / "csrc" / "selective_scan.cpp"

# -O3 -march=native: the kernel is written for AVX-512 registers when the CPU has them.
# -ffp-contract=fast: a * b + c fused into FMAs (one rounding instead of two, and the polynomials are
#   written for it). GCC 12 already does this for C++ but not in ISO C modes, and other compilers
#   differ, so it is stated. No -ffast-math: the exp and softplus are explicit polynomials already,
#   and fast-math would also let the compiler reorder sums.
# -fopenmp: at::parallel_for is header code that only runs in parallel when compiled with OpenMP; the
#   library links libgomp.so.1, the same soname torch's wheel loads, so one OpenMP runtime is shared.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_error: BaseException | None = None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line  # the first of the two: enough to tell machines apart
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extension_name(cflags: list[str] = CFLAGS) -> str:
    """Name under which the compiled module is cached; changes with anything that changes the binary."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(cflags + LDFLAGS).encode(), torch.__version__.encode(),
                 _cpu_model().encode()):
        key.update(part)
    return f"meteor_selective_scan_{key.hexdigest()[:12]}"


def is_built(cflags: list[str] = CFLAGS) -> bool:
    """Whether the kernel with these flags is already compiled in torch's extensions directory."""
    from torch.utils import cpp_extension

    name = extension_name(cflags)
    folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    return any(folder.glob(f"{name}*.so"))


def compile_variant(cflags: list[str], verbose: bool = False) -> ModuleType:
    """Compile and load the kernel with other flags, uncached in this process (tests use it to build the
    portable, non-AVX-512 code with ``-DMETEOR_SCAN_PORTABLE``). Says so on stderr when it compiles."""
    from torch.utils import cpp_extension

    if not is_built(cflags):
        print("meteor: compiling the CPU selective-scan kernel, once per machine (~30 s) ...",
              file=sys.stderr, flush=True)
    # copies: cpp_extension.load appends torch's own flags to the lists it is given
    return cpp_extension.load(name=extension_name(cflags), sources=[str(SOURCE)], extra_cflags=list(cflags),
                              extra_ldflags=list(LDFLAGS), verbose=verbose)


def build_extension(verbose: bool = False) -> ModuleType:
    """Compile (first call) or load the CPU selective-scan extension and return the module.

    The module exposes ``forward`` and ``backward`` (contracts in ``csrc/selective_scan.cpp``) and
    ``simd`` ("avx512" or "generic-vector"). A failure is remembered and re-raised on later calls in
    this process rather than recompiling each time. Raises ``RuntimeError`` carrying the compiler's
    output when the build fails.
    """
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(f"the meteor selective-scan extension failed to build earlier: {_error}") from _error
        try:
            _module = compile_variant(CFLAGS, verbose=verbose)
        except Exception as exc:  # compiler missing, ninja missing, compile error: all reported the same way
            _error = exc
            raise
        return _module


def error_gist(exc: BaseException, max_lines: int = 6) -> str:
    """The few lines of a build failure worth showing in a warning (compiler errors first)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return " | ".join((errors or lines)[:max_lines])
