"""The evaluation runners: normalisation, per-type exact match, JSONL written as it goes, resume."""

import json

import pytest
import torch

from meteor.eval import EvalConfig, WorldRunner, normalize_answer, read_jsonl, world_exact_match
from meteor.eval.base import PREDICTIONS_FILE
from meteor.testing import tiny_model


def test_normalisation_is_light_and_symmetric():
    assert normalize_answer("  Yes. ") == "yes"
    assert normalize_answer("MAP") == normalize_answer("map")
    assert world_exact_match("B.", "B") and world_exact_match("red  ", "Red")
    assert not world_exact_match("two", "2") and not world_exact_match("B. red", "B")


def test_score_gives_accuracy_per_question_type_and_overall():
    rows = [{"question_id": "a", "question_type": "colour", "answer": "red", "prediction": "Red."},
            {"question_id": "b", "question_type": "colour", "answer": "blue", "prediction": "red"},
            {"question_id": "c", "question_type": "count", "answer": "3", "prediction": "3"}]
    acc = WorldRunner().score(rows)["accuracy"]
    assert acc["colour"] == {"accuracy": 0.5, "questions": 2}
    assert acc["count"]["accuracy"] == 1.0 and acc["all"] == {"accuracy": 0.6667, "questions": 3}
    assert list(acc) == ["colour", "count", "all"]


def test_read_jsonl_ignores_a_line_cut_by_a_crash_but_not_a_corrupt_middle(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question_id": "a"}\n{"question_id": "b"')
    assert read_jsonl(path) == [{"question_id": "a"}]
    path.write_text('{"question_id": "a"}\n{broken\n{"question_id": "c"}\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_jsonl(path)


class CountingRunner(WorldRunner):
    """Records how many questions were sent to the model."""

    def __init__(self, config, stop_after=None):
        super().__init__(config)
        self.asked, self.stop_after = 0, stop_after

    def answer(self, model, processor, questions, image_folder):
        if self.stop_after is not None and self.asked >= self.stop_after:
            raise KeyboardInterrupt
        self.asked += len(questions)
        return super().answer(model, processor, questions, image_folder)


def test_runner_writes_predictions_and_resumes_without_redoing(world_split, tmp_path):
    world = world_split
    torch.manual_seed(0)
    model, processor = tiny_model()
    config = EvalConfig(batch_size=4, max_new_tokens=3)
    interrupted = CountingRunner(config, stop_after=4)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(model, processor, world.test_path, world.image_folder, tmp_path)
    written = read_jsonl(tmp_path / PREDICTIONS_FILE)
    assert len(written) == 4 and all("prediction" in row and "meta" not in row for row in written)
    resumed = CountingRunner(config)
    scores = resumed.run(model, processor, world.test_path, world.image_folder, tmp_path)
    total = world.questions
    assert resumed.asked == total - 4 and scores["answered_now"] == total - 4
    rows = read_jsonl(tmp_path / PREDICTIONS_FILE)
    questions = {q["question_id"]: q for q in read_jsonl(world.test_path)}
    assert sorted(r["question_id"] for r in rows) == sorted(questions)
    # the scores are those of the predictions file: the runner's own metric over its rows, and the
    # exact matches counted by hand against the test split's answers
    assert scores["questions"] == total and scores["accuracy"] == WorldRunner().score(rows)["accuracy"]
    hits = sum(normalize_answer(r["prediction"]) == normalize_answer(questions[r["question_id"]]["answer"])
               for r in rows)
    assert scores["accuracy"]["all"] == {"accuracy": round(hits / total, 4), "questions": total}
    for kind in {q["question_type"] for q in questions.values()}:
        of_kind = [r for r in rows if questions[r["question_id"]]["question_type"] == kind]
        kind_hits = sum(world_exact_match(r["prediction"], r["answer"]) for r in of_kind)
        assert scores["accuracy"][kind] == {"accuracy": round(kind_hits / len(of_kind), 4),
                                            "questions": len(of_kind)}
    again = CountingRunner(config)
    assert again.run(model, processor, world.test_path, world.image_folder, tmp_path)["answered_now"] == 0
    assert again.asked == 0
    written_scores = json.loads((tmp_path / "scores.json").read_text())
    assert written_scores["benchmark"] == "world" and written_scores["accuracy"] == scores["accuracy"]
