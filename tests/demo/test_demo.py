"""`meteor demo --quick` through the real entry point, in a clean folder, then re-run to reuse it."""

import json
import os
import re
import subprocess
import sys

import pytest

from meteor.demo import quick_config
from meteor.demo.pipeline import CachedFolder, budget_name, worker_count
from meteor.demo.world import QUESTION_TYPES
from meteor.eval import WorldRunner, read_jsonl


def _meteor(*args, cwd):
    return subprocess.run([sys.executable, "-m", "meteor", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_step_reuses_only_a_folder_with_the_same_key(tmp_path):
    step = CachedFolder(tmp_path / "s", {"a": 1}, force=False)
    assert not step.done
    step.start()
    (step.folder / "x").write_text("built")
    step.finish()
    assert CachedFolder(tmp_path / "s", {"a": 1}, force=False).done
    assert not CachedFolder(tmp_path / "s", {"a": 2}, force=False).done
    assert not CachedFolder(tmp_path / "s", {"a": 1}, force=True).done


def test_quick_config_covers_the_four_budgets():
    config = quick_config()
    assert config.budgets == (None, 16, 7, 3)
    assert config.world.base_size // config.world.patch_size == 8   # 64 patches per view


def test_the_clip_step_takes_the_cores_the_budgets_share_later(monkeypatch):
    import dataclasses
    import os

    from meteor.demo.pipeline import clip_threads
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert clip_threads(quick_config()) == 2                                  # a worker per core × 1 thread
    assert clip_threads(dataclasses.replace(quick_config(), workers=1)) == 1
    assert clip_threads(dataclasses.replace(quick_config(), workers=4, threads=2)) == 2   # capped by the cores
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert clip_threads(quick_config()) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert worker_count(quick_config()) == 4 and worker_count(dataclasses.replace(quick_config(), workers=6)) == 6


@pytest.mark.slow
def test_quick_demo_writes_the_report_with_numbers_and_pictures(tmp_path):
    done = _meteor("demo", "--quick", "--out", "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = tmp_path / "out" / "report"
    text = (report / "report.md").read_text()
    results = json.loads((report / "results.json").read_text())
    assert [b["k"] for b in results["budgets"]] == [None, 16, 7, 3]
    for name in (*QUESTION_TYPES, "all"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        numbers = re.findall(r"\d\.\d{3}", row)
        assert len(numbers) == 4 + 4, row           # ± 95%, chance, majority, blind prior + four budgets
        questions = int(row.split("|")[2])
        assert float(numbers[0]) == pytest.approx((0.25 / questions) ** 0.5 * 2, abs=5e-4), row
        # the budgets' cells are their scores, in budget order
        assert numbers[4:] == [f"{b['scores']['accuracy'][name]['accuracy']:.3f}" for b in results["budgets"]], row
    # each budget's accuracies are its evaluation's predictions scored again
    tests = read_jsonl(tmp_path / "out" / "world" / "test.jsonl")
    for budget in results["budgets"]:
        assert budget["name"] == budget_name(budget["k"])
        predictions = read_jsonl(tmp_path / "out" / "eval" / budget["name"] / "predictions.jsonl")
        assert sorted(r["question_id"] for r in predictions) == sorted(q["question_id"] for q in tests)
        assert budget["scores"]["accuracy"] == WorldRunner().score(predictions)["accuracy"]
        assert budget["scores"]["questions"] == len(tests) == results["baselines"]["all"]["questions"]
    # one selection figure per test image, as many as configured, the sliced images first
    figures, config = results["figures"], quick_config()
    assert len(figures) == len(set(figures)) == config.figure_images
    images = {q["image_id"]: q["meta"]["num_slices"] for q in tests}
    shown = [name.removeprefix("selection_").removesuffix(".png") for name in figures]
    assert set(shown) <= set(images) and all(images[i] >= 2 for i in shown[:config.figure_images - 1])
    pictures = ["accuracy_vs_tokens.png", "training_loss.png", *figures]
    for name in pictures:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({name})" in text
    assert "[9/9]" in done.stdout
    # both stages ran with scene distillation, matched every sample, and the report says so
    assert "stage 1 (weight 2) and stage 2 (weight 2) add scene distillation" in text
    for stage in ("stage1", "stage2"):
        log = [json.loads(line) for line in
               (tmp_path / "out" / "runs" / "k16" / stage / "log.jsonl").read_text().splitlines()]
        assert all(entry["distill_count"] == entry["samples"] and entry["distill"] > 0 for entry in log)
        # and with glyph alignment, which found text patches in every step
        assert all(entry["glyph_count"] > 0 and entry["glyph"] > 0 for entry in log)
    assert "stage 1 (weight 1) and stage 2 (weight 1) add glyph alignment" in text
    # the CLIP's own corpus: further train-split scenes of the same seed, unsliced, and no test image
    # shared with the world the model is evaluated on
    corpus = json.loads((tmp_path / "out" / "clip_corpus" / "manifest.json").read_text())
    assert corpus["slice_histogram"]["train"] == {"0": quick_config().clip_images}
    clip_key = json.loads((tmp_path / "out" / "clip" / "key.json").read_text())
    assert clip_key["foils"] is True and clip_key["regions"] is True and clip_key["corpus"]["slice_mix"] == [0]
    assert re.search(r"CLIP trained in [0-9.]+ s \(\d threads\)", done.stdout)
    clip_run = json.loads((tmp_path / "out" / "clip" / "clip_pretrain.json").read_text())
    clip_log = [json.loads(line) for line in (tmp_path / "out" / "clip" / "log.jsonl").read_text().splitlines()]
    # the region–phrase loss ran at every step, and the summary is the last epoch's, as printed
    assert len(clip_log) == clip_run["steps"] and all("region_loss" in entry for entry in clip_log)
    assert clip_run["final_loss"] == clip_log[-1]["loss"]
    epochs = config.clip.epochs
    last_epoch = re.search(rf"CLIP epoch {epochs}/{epochs}: loss ([0-9.]+), image→caption accuracy in batch "
                           r"([0-9.]+), region→phrase accuracy ([0-9.]+)", done.stdout)
    assert last_epoch, done.stdout[-3000:]
    assert last_epoch[1] == f"{clip_run['final_loss']:.3f}"
    assert last_epoch[2] == f"{clip_run['final_batch_retrieval']:.2f}"
    assert last_epoch[3] == f"{clip_run['final_region_accuracy']:.2f}"

    again = _meteor("demo", "--quick", "--out", "out", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    reused = json.loads((report / "results.json").read_text())["reused"]
    assert {"world", "clip", "language_model", "k16/stage2", "eval/k16"} <= set(reused)
    assert "k16, stage 1: training" not in again.stdout and "k16, stage 1: training" in done.stdout

    # the budgets ran in worker processes (one per core); one after another in this process gives
    # the same models and scores, bit for bit (world, CLIP and LLaMA reused from a copy)
    import dataclasses
    import shutil

    from meteor.demo import run_demo
    serial = tmp_path / "serial"
    for part in ("world", "clip", "clip_corpus", "language_model"):
        shutil.copytree(tmp_path / "out" / part, serial / part)
    results = run_demo(serial, config=dataclasses.replace(quick_config(), workers=1))
    assert quick_config().workers is None and worker_count(quick_config()) == min(os.cpu_count() or 1, 4)
    assert set(results["reused"]) >= {"world", "clip", "language_model"}
    parallel = json.loads((report / "results.json").read_text())
    for one, other in zip(results["budgets"], parallel["budgets"]):
        assert one["name"] == other["name"] and one["scores"]["accuracy"] == other["scores"]["accuracy"]
    weights = lambda root: (root / "runs" / "k16" / "stage2" / "model" / "model.safetensors").read_bytes()
    assert weights(serial) == weights(tmp_path / "out")
