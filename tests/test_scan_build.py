"""The selective-scan kernel's builds: which instruction set runs, how it is forced, and the build cache.

Numerical equality of every build with the reference is in test_ops.py. Here: METEOR_SCAN_ISA (a
name this CPU cannot run is refused, naming those it can), torch's ATEN_CPU_CAPABILITY lowering the
automatic choice, the cache keyed by the Python environment (a second virtual environment on the same
machine gets a folder of its own instead of rebuilding the first one's), and the line printed while a
build compiles.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meteor.model import ops
from meteor.model.ops import _build, selective_scan

REPO = Path(__file__).resolve().parents[1]


def small_inputs():
    gen = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, 8, 5, generator=gen) for _ in range(3))
    A = -torch.rand(8, 4, generator=gen)
    B, C = (torch.randn(1, 4, 5, generator=gen) for _ in range(2))
    return u, delta, A, B, C, z


def python(code: str, env: dict | None = None, executable: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def test_an_unknown_isa_name_is_refused(monkeypatch):
    monkeypatch.setenv(ops.ISA_ENV_VAR, "avx1024")
    u, delta, A, B, C, z = small_inputs()
    with pytest.raises(ValueError, match=r"METEOR_SCAN_ISA='avx1024' is not one of auto, avx512, avx2, default"):
        selective_scan(u, delta, A, B, C, z=z)


def test_scalar_is_an_alias_of_default(monkeypatch):
    monkeypatch.setenv(ops.ISA_ENV_VAR, "scalar")
    assert _build.selected_isa() == "default"


def test_an_isa_the_cpu_lacks_is_refused_naming_those_it_runs(monkeypatch):
    lacking = [isa for isa in _build.compiled_isas() if isa not in _build.cpu_isas()]
    if not lacking:
        # This CPU runs every build: describe it as torch's cpuinfo describes an AVX2-only CPU (AMD Zen 3,
        # most laptops) by dropping the AVX-512 flags from torch.cpu.get_capabilities().
        caps = {k: v for k, v in torch.cpu.get_capabilities().items() if not k.startswith("avx512")}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
        lacking = ["avx512"]
    isa = lacking[0]
    monkeypatch.setenv(ops.ISA_ENV_VAR, isa)
    monkeypatch.setenv(ops.ENV_VAR, "auto")  # a forced instruction set is refused even where auto could fall back
    u, delta, A, B, C, z = small_inputs()
    with pytest.raises(RuntimeError, match=rf"METEOR_SCAN_ISA={isa} asks for the {isa} selective-scan kernel, but "
                                           rf".*this machine runs: {', '.join(_build.cpu_isas())}"):
        selective_scan(u, delta, A, B, C, z=z)
    with pytest.raises(RuntimeError, match=f"cannot run the {isa} selective-scan kernel"):
        _build.load_isa(isa)  # loading it would die on an illegal instruction


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_aten_cpu_capability_lowers_the_automatic_choice(capability):
    # PyTorch's own switch for its CPU kernels (read when torch is imported) caps the automatic choice.
    if capability not in _build.cpu_isas():
        pytest.skip(f"this CPU cannot run the {capability} build")
    done = python("from meteor.model.ops import _build; print(_build.selected_isa())",
                  env={"ATEN_CPU_CAPABILITY": capability, ops.ISA_ENV_VAR: "auto"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [capability]


def test_builds_are_keyed_by_python_environment_and_isa(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "prefix", "/envs/first")
    first = {isa: (_build.extension_name(isa), _build.build_directory(isa)) for isa in _build.ISAS}
    monkeypatch.setattr(sys, "prefix", "/envs/second")
    second = {isa: (_build.extension_name(isa), _build.build_directory(isa)) for isa in _build.ISAS}
    for isa in _build.ISAS:
        assert first[isa][0] != second[isa][0] and first[isa][1] != second[isa][1]
        assert first[isa][0].startswith(f"meteor_selective_scan_{isa}_")
    assert len({name for name, _ in first.values()}) == len(_build.ISAS)  # one folder per instruction set


def test_a_second_virtual_environment_gets_its_own_build_folder(tmp_path):
    # The situation of two environments on one machine: a venv made with the standard library's venv
    # (sharing this interpreter's packages, so the same torch) must not use this environment's folder,
    # whose build.ninja would otherwise be rewritten (and the kernel recompiled) by each in turn.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    venv_python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    code = ("import sys; from meteor.model.ops import _build; "
            "print(sys.prefix); print(*(_build.build_directory(isa) for isa in _build.ISAS))")
    ours, theirs = python(code, env), python(code, env, executable=str(venv_python))
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    (our_prefix, our_dirs), (their_prefix, their_dirs) = ours.stdout.splitlines(), theirs.stdout.splitlines()
    assert Path(their_prefix) == venv and Path(our_prefix) != venv
    assert not set(our_dirs.split()) & set(their_dirs.split())


@pytest.mark.slow
def test_the_first_build_in_an_environment_says_so_on_stderr(tmp_path):
    # A real build (of the default instruction set, which every CPU runs) into an empty extensions folder.
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    code = ("from meteor.model.ops import _build; "
            "print(_build.is_built('default'), _build.load_isa('default').isa, _build.is_built('default'))")
    first = python(code, env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["False", "default", "True"]
    lines = [line for line in first.stderr.splitlines() if line.startswith("meteor:")]
    assert len(lines) == 1 and lines[0].startswith(
        "meteor: compiling the selective-scan kernel for default (first use in this environment, ~30 s)"), first.stderr
    again = python(code, env)  # a later process loads the cached build, silently
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == ["True", "default", "True"]
    assert "meteor: compiling" not in again.stderr
