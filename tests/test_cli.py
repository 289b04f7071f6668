"""The real entry point, as a user runs it."""

import json
import subprocess
import sys

from meteor.pretrained import save_pretrained


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


def test_eval_answers_a_world_split_and_scores_what_it_wrote(tmp_path):
    """``meteor eval --benchmark world`` on a test split in the world's format (written by
    ``meteor.testing.tiny_world_split``, as ``meteor data synth`` writes one)."""
    import torch

    from meteor.testing import tiny_model, tiny_world_split

    tiny_world_split(tmp_path / "world", images=2)
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
