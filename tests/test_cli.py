"""The real entry point, as a user runs it."""

import json
import subprocess
import sys

import pytest


def _meteor(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "meteor", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_params_prints_the_count_at_the_papers_widths():
    done = _meteor("params")
    assert done.returncode == 0, done.stderr
    assert "| total | 38,511,616 (38.51M) |" in done.stdout and "37.08M" in done.stdout
    concat = _meteor("params", "--direction-merge", "concat")
    assert "38,511,616" not in concat.stdout and "| total |" in concat.stdout


def test_params_refuses_impossible_widths_clearly():
    done = _meteor("params", "--vision-width", "0")
    assert done.returncode == 2 and "vision_width must be positive" in done.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end_in_a_clean_folder(tmp_path):
    done = _meteor("demo", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["num_slices"] == 6 and summary["grid"] == [3, 2]
    assert summary["kept_tokens"] == 4 * 7 and summary["reload_identical"] is True
    assert (tmp_path / "out" / "model" / "compressor.safetensors").is_file()
    assert "[5/5]" in done.stdout
