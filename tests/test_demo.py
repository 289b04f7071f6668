"""`meteor demo --quick` through the real entry point, in a clean folder, then re-run to reuse it."""

import json
import re
import subprocess
import sys

import pytest

from meteor.demo import quick_config
from meteor.demo.pipeline import Step
from meteor.demo.world import QUESTION_TYPES


def _meteor(*args, cwd):
    return subprocess.run([sys.executable, "-m", "meteor", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_step_reuses_only_a_folder_with_the_same_key(tmp_path):
    step = Step(tmp_path / "s", {"a": 1}, force=False)
    assert not step.done
    step.start()
    (step.folder / "x").write_text("built")
    step.finish()
    assert Step(tmp_path / "s", {"a": 1}, force=False).done
    assert not Step(tmp_path / "s", {"a": 2}, force=False).done
    assert not Step(tmp_path / "s", {"a": 1}, force=True).done


def test_quick_config_covers_the_four_budgets():
    config = quick_config()
    assert config.budgets == (None, 16, 7, 3)
    assert config.world.base_size // config.world.patch_size == 8   # 64 patches per view


def test_the_clip_step_takes_the_cores_the_budgets_share_later(monkeypatch):
    import dataclasses
    import os

    from meteor.demo.pipeline import clip_threads
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert clip_threads(quick_config()) == 2                                  # 2 workers × 1 thread
    assert clip_threads(dataclasses.replace(quick_config(), workers=1)) == 1
    assert clip_threads(dataclasses.replace(quick_config(), workers=4, threads=2)) == 2   # capped by the cores
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert clip_threads(quick_config()) == 1


@pytest.mark.slow
def test_quick_demo_writes_the_report_with_numbers_and_pictures(tmp_path):
    done = _meteor("demo", "--quick", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = tmp_path / "out" / "report"
    text = (report / "report.md").read_text()
    for name in (*QUESTION_TYPES, "all"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        numbers = re.findall(r"\d\.\d{3}", row)
        assert len(numbers) == 4 + 4, row           # ± 95%, chance, majority, blind prior + four budgets
        questions = int(row.split("|")[2])
        assert float(numbers[0]) == pytest.approx((0.25 / questions) ** 0.5 * 2, abs=5e-4), row
    results = json.loads((report / "results.json").read_text())
    assert [b["k"] for b in results["budgets"]] == [None, 16, 7, 3]
    for budget in results["budgets"]:
        assert 0.0 <= budget["scores"]["accuracy"]["all"]["accuracy"] <= 1.0
        assert budget["scores"]["questions"] == results["baselines"]["all"]["questions"]
    pictures = ["accuracy_vs_tokens.png", "training_loss.png", *results["figures"]]
    assert len(results["figures"]) >= 1
    for name in pictures:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({name})" in text
    assert "[9/9]" in done.stdout
    # both stages ran with scene distillation, matched every sample, and the report says so
    assert "stage 1 (weight 2) and stage 2 (weight 2) add scene distillation" in text
    for stage in ("stage1", "stage2"):
        log = [json.loads(line) for line in
               (tmp_path / "out" / "runs" / "k16" / stage / "log.jsonl").read_text().splitlines()]
        assert all(entry["distill_matched"] == entry["samples"] and entry["distill"] > 0 for entry in log)
        # and with glyph alignment, which found text patches in every step
        assert all(entry["glyph_patches"] > 0 and entry["glyph"] > 0 for entry in log)
    assert "stage 1 (weight 1) and stage 2 (weight 1) add glyph alignment" in text
    # the CLIP's own corpus: further train-split scenes of the same seed, unsliced, and no test image
    # shared with the world the model is evaluated on
    corpus = json.loads((tmp_path / "out" / "clip_corpus" / "manifest.json").read_text())
    assert corpus["slice_histogram"]["train"] == {"0": quick_config().clip_images}
    clip_key = json.loads((tmp_path / "out" / "clip" / "key.json").read_text())
    assert clip_key["foils"] is True and clip_key["regions"] is True and clip_key["corpus"]["slice_mix"] == [0]
    assert re.search(r"CLIP trained in [0-9.]+ s \(\d threads\)", done.stdout)
    clip_run = json.loads((tmp_path / "out" / "clip" / "clip_pretrain.json").read_text())
    assert 0.0 <= clip_run["final_region_accuracy"] <= 1.0       # the region–phrase loss ran

    again = _meteor("demo", "--quick", "--out", "out", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    reused = json.loads((report / "results.json").read_text())["reused"]
    assert {"world", "clip", "language_model", "k16/stage2", "eval/k16"} <= set(reused)
    assert "k16, stage 1: training" not in again.stdout and "k16, stage 1: training" in done.stdout

    # the budgets ran two at a time in worker processes; one after another in this process gives
    # the same models and scores, bit for bit (world, CLIP and LLaMA reused from a copy)
    import dataclasses
    import shutil

    from meteor.demo import run_demo
    serial = tmp_path / "serial"
    for part in ("world", "clip", "clip_corpus", "language_model"):
        shutil.copytree(tmp_path / "out" / part, serial / part)
    results = run_demo(serial, config=dataclasses.replace(quick_config(), workers=1))
    assert quick_config().workers == 2 and set(results["reused"]) >= {"world", "clip", "language_model"}
    parallel = json.loads((report / "results.json").read_text())
    for one, other in zip(results["budgets"], parallel["budgets"]):
        assert one["name"] == other["name"] and one["scores"]["accuracy"] == other["scores"]["accuracy"]
    for part in ("compressor.safetensors", "language_model/model.safetensors"):
        weights = lambda root: (root / "runs" / "k16" / "stage2" / "model" / part).read_bytes()
        assert weights(serial) == weights(tmp_path / "out"), part
