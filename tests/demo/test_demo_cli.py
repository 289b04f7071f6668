"""The demo's commands through the real entry point, as a user runs them: `meteor demo`, `meteor
ablate` and `meteor data synth` (the synthetic world), then `meteor eval` on the world it wrote."""

import json
import subprocess
import sys

import pytest
from meteor.pretrained import save_pretrained


def _meteor(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "meteor", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_demo_help_lists_its_options():
    done = _meteor("demo", "--help")
    assert done.returncode == 0 and all(flag in done.stdout for flag in ("--quick", "--out", "--force"))


def test_ablate_help_names_every_table_and_an_unknown_one_is_refused(tmp_path):
    from meteor.demo.ablate import TABLES

    done = _meteor("ablate", "--help")
    text = " ".join(done.stdout.split())
    assert done.returncode == 0
    assert all(name in text for name in TABLES if not name.startswith("table")) and "table1-table4" in text
    refused = _meteor("ablate", "--table", "table9", "--out", "x", cwd=tmp_path)
    assert refused.returncode != 0 and "unknown table(s) ['table9']" in refused.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["demo", "ablate"])
def test_workers_must_be_at_least_one(tmp_path, command):
    done = _meteor(command, "--workers", "0", "--out", "x", cwd=tmp_path)
    assert done.returncode == 2 and "--workers: must be a whole number ≥ 1, got '0'" in done.stderr
    assert not (tmp_path / "x").exists()


def test_data_synth_text_options_reach_the_world_and_bad_ones_are_named(tmp_path):
    done = _meteor("data", "synth", "--out", "world", "--n-train-images", "3", "--n-test-images", "1",
                   "--number-digits", "1", "--text-height-patches", "1.5", "2", "--text-stroke", "0.05", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "world" / "manifest.json").read_text())["config"]
    assert config["number_digits"] == 1 and config["text_height_patches"] == [1.5, 2.0]
    assert config["text_stroke"] == 0.05
    done = _meteor("data", "synth", "--out", "other", "--number-digits", "7", cwd=tmp_path)
    assert done.returncode != 0 and "number_digits must lie in 1..4" in done.stderr
    assert not (tmp_path / "other").exists()


def test_data_synth_then_eval_reach_each_stage_alone(tmp_path):
    import torch

    from meteor.testing import tiny_model

    done = _meteor("data", "synth", "--out", "world", "--n-train-images", "2", "--n-test-images", "2",
                   "--base-size", "56", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "world" / "test.jsonl").is_file() and "wrote world" in done.stdout
    torch.manual_seed(0)
    model, processor = tiny_model()
    save_pretrained(tmp_path / "model", model, processor)
    done = _meteor("eval", "--benchmark", "world", "--model", "model", "--data", "world/test.jsonl",
                   "--image-folder", "world/images", "--out", "eval", "--limit", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert scores["questions"] == 3 and scores["accuracy"]["all"]["questions"] == 3
    # The score is the world's exact match over the predictions the command wrote, recomputed here.
    from meteor.eval.world import world_exact_match

    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    hits = sum(world_exact_match(row["prediction"], row["answer"]) for row in rows)
    assert scores["accuracy"]["all"]["accuracy"] == round(hits / 3, 4)
