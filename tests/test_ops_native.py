"""The selective-scan kernel's block-level arithmetic built outside PyTorch: NEON under qemu, x86 SIMD natively.

On aarch64 the kernel's baseline build is PyTorch's ``Vectorized<float>`` on NEON (4 lanes), with its
own exp (``exp2v``'s aarch64 branch). No ARM machine is at hand, so this test does what an ARM server
would run, under emulation: ``tests/native/scan_block_check.cpp`` includes
``csrc/selective_scan.cpp`` unchanged, is cross-compiled for aarch64 with the kernel's own flags
(``_build.BASE_CFLAGS``, ``-DCPU_CAPABILITY=DEFAULT``: what ``_build`` gives on aarch64) and runs
under ``qemu-aarch64``; it checks exp2, softplus, the silu gate, the forward recurrence (specialised
N = 16 and generic N = 5, with its checkpoints) and the backward (du, ddt, dA, dB, dC, dD) against
double-precision references. The same program built natively checks the x86 SIMD builds this CPU
runs (AVX2, AVX-512) too, for what tests/test_ops.py (those builds through the real extension against
the PyTorch reference) does not reach: exp2 over its whole range and the silu gate at |z| up to 3e38.

It needs Debian's ``g++-aarch64-linux-gnu`` and ``qemu-user`` (``.ci/run`` installs them); where they are
missing the test is skipped and says which. The program links statically with libtorch's symbols left
unresolved: it only calls the kernel's header-level arithmetic, never into libtorch.
"""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from meteor.model.ops import _build

HERE = Path(__file__).parent
CHECK = HERE / "native" / "scan_block_check.cpp"
CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"


def compile_check(compiler: str, flags: list[str], out: Path) -> None:
    torch_dir = Path(torch.__file__).parent
    includes = [_build.SOURCE.parent, torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include",
                Path(sysconfig.get_paths()["include"])]
    command = [compiler, "-std=c++17", *_build.BASE_CFLAGS, *flags, "-DTORCH_EXTENSION_NAME=scan_block_check",
               *(f"-I{path}" for path in includes), str(CHECK), "-o", str(out),
               "-static", "-Wl,--unresolved-symbols=ignore-all"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr[-4000:]}"


def run_check(command: list[str], header: str) -> None:
    """Runs the check program: its first line names the build, then all ten checks say ok."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    print(done.stdout)
    lines = done.stdout.splitlines()
    assert lines and lines[0] == header, done.stdout + done.stderr
    checks = [line for line in lines[1:] if line.strip()]
    assert len(checks) == 10 and all(" ok " in line for line in checks), done.stdout
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_neon_build_matches_double_precision_references_under_qemu(tmp_path):
    missing = [tool for tool in (CXX, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: apt-get install g++-aarch64-linux-gnu qemu-user)")
    binary = tmp_path / "scan_block_check"
    compile_check(CXX, _build.ISA_FLAGS["default"], binary)
    run_check([QEMU, str(binary)], "build default, 4 lanes")  # NEON: 4 float lanes


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_x86_simd_builds_match_double_precision_references(isa, tmp_path):
    if isa not in _build.cpu_isas():
        pytest.skip(f"this CPU does not run the {isa} build")
    binary = tmp_path / "scan_block_check"
    compile_check("g++", _build.ISA_FLAGS[isa], binary)
    run_check([str(binary)], f"build {isa}, {dict(avx2=8, avx512=16)[isa]} lanes")
