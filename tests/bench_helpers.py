"""Loading a script of benchmarks/ (a folder of scripts, not a package) as a module for a test."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module registered under a private name; yields it, then unregisters it
    (use with ``yield from`` in a fixture)."""
    spec = importlib.util.spec_from_file_location(f"_{name}_under_test", BENCHMARKS / f"{name}.py")
    module: ModuleType = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
