"""benchmarks/selection_targets.py: which share of the objects and texts a question names the kept
patches touch, per expert, and how much the kept set moves between questions about one image. Run
here on a small generated world and tiny random models (the figures in docs/results.md come from
the ablation's trained models)."""

import json

import pytest
import torch

from benchmarks import selection_targets
from meteor.pretrained import save_pretrained


@pytest.fixture(scope="module")
def bench():
    return selection_targets


def test_a_target_is_found_when_a_kept_patch_centre_lies_in_its_box(bench):
    regions = [(0, 0, 100, 100), (100, 0, 200, 100)]          # two views side by side, 2×2 patches each
    boxes = [(60, 60, 90, 90), (0, 0, 10, 10), (110, 10, 140, 40)]
    # view 0 keeps patch 3 (centre 75, 75); view 1 keeps patch 0 (centre 125, 25)
    assert bench.found(boxes, regions, [(0, (2, 2), [3]), (1, (2, 2), [0])]) == pytest.approx(2 / 3)
    assert bench.found(boxes, regions, [(0, (2, 2), [0])]) == 0.0          # centre 25, 25 misses (0, 0, 10, 10)
    assert bench.jaccard([1, 2, 3], [2, 3, 4]) == 0.5


def test_targets_are_the_named_objects_or_the_answer_text(bench):
    meta = {"objects": [{"shape": "cross", "colour": "green", "bbox": [1, 2, 3, 4]},
                        {"shape": "cross", "colour": "red", "bbox": [5, 6, 7, 8]}],
            "texts": [{"text": "TREE", "bbox": [9, 9, 20, 12]}, {"text": "4", "bbox": [0, 0, 1, 1]}]}
    record = {"meta": meta, "question_type": "colour", "query": {"shape": "cross"}}
    assert bench.targets(record) == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert bench.targets({**record, "question_type": "exist", "query": {"shape": "cross", "colour": "red"}}) == [(5, 6, 7, 8)]
    assert bench.targets({"meta": meta, "question_type": "read", "answer": "TREE", "query": {}}) == [(9, 9, 20, 12)]
    assert bench.targets({"meta": meta, "question_type": "position", "query": {}}) == []


def test_on_a_world_the_papers_token_keeps_one_set_per_image_and_a_question_token_does_not(bench, tmp_path):
    from meteor.testing import tiny_meteor_config, tiny_model
    from meteor.demo.world import WorldConfig, generate_world

    generate_world(tmp_path / "out" / "world", WorldConfig(n_train_images=1, n_test_images=3, seed=3))
    paper, processor = tiny_model(seed=0)
    save_pretrained(tmp_path / "paper", paper, processor)
    asking, processor = tiny_model(tiny_meteor_config(instruction="question"), seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        asking.compressor.question_map.weight.normal_(0, 5.0)
    save_pretrained(tmp_path / "asking", asking, processor)
    out = tmp_path / "figures.json"
    assert bench.main(["--out", str(tmp_path / "out"), "--models", str(tmp_path / "paper"), str(tmp_path / "asking"),
                       "--images", "3", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    paper_figures, asking_figures = figures[str(tmp_path / "paper")], figures[str(tmp_path / "asking")]
    assert paper_figures["kept_jaccard_between_questions"] == 1.0 and paper_figures["identical_kept_share"] == 1.0
    assert asking_figures["kept_jaccard_between_questions"] < 1.0
    for figures_of_model in (paper_figures, asking_figures):
        assert set(figures_of_model["targets_found"]) == {"kept", "visual", "native"}
        found = figures_of_model["targets_found"]["kept"]["all"]
        assert 0.0 <= found["share"] <= 1.0 and found["questions"] > 0
    # the visual expert does not read the question: the same share for both models
    assert paper_figures["targets_found"]["visual"] == asking_figures["targets_found"]["visual"]
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), "--models", "x"])        # no world/test.jsonl there
