"""Document, infographic and chart questions: DocVQA, InfographicVQA (ANLS) and ChartQA (relaxed
accuracy), read from the benchmarks' own annotation files, which hold questions and answers both.

* DocVQA: ``val_v1.0.json`` / ``test_v1.0.json`` — ``{"data": [{"questionId", "question", "image":
  "documents/….png", "answers"}]}`` (test has no answers). Image paths are relative to the image
  folder (the dataset's root, holding ``documents/``).
* InfographicVQA: ``infographicsVQA_val_v1.0_withQT.json`` — the same with ``image_local_name``.
* ChartQA: ``test_human.json`` and/or ``test_augmented.json`` — ``[{"imgname", "query", "label"}]``;
  ``data`` is one of them or the test folder holding both (images under ``png/``).

Each question gets "Answer the question using a single word or phrase." DocVQA and InfoVQA are
scored with ``anls`` (RRC's script); their test splits write ``{name}_submission.json``
(``[{"questionId", "answer"}]``, the RRC upload format) and need the server. ChartQA is scored
with ``relaxed_accuracy`` per split; the headline is the mean of the splits present (the paper's
ChartQA figure is the mean of human and augmented).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from meteor.eval.metrics import anls, relaxed_accuracy
from meteor.eval.official.common import SHORT_ANSWER, OfficialRunner, mean, percent, read_json, records_of, write_json


class DocVQARunner(OfficialRunner):
    name = "docvqa"
    suffix = SHORT_ANSWER
    image_field = "image"
    expected = 'DocVQA\'s val_v1.0.json or test_v1.0.json ({"data": [{"questionId", "question", "image"}]})'

    def load_questions(self, data: str | Path) -> list[dict[str, Any]]:
        records = records_of(read_json(data, self.expected), data, "data",
                             ("questionId", "question", self.image_field), self.expected)
        return [self.question(f"{data}:record {n}", r["questionId"], r["question"], r[self.image_field],
                              answers=r.get("answers"))
                for n, r in enumerate(records, start=1)]

    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if any(row["answers"] is None for row in predictions):
            return {"headline": None, "status": f"no answers (test split): upload {self.name}_submission.json "
                                                "to the RRC server"}
        value = mean(anls(row["prediction"], row["answers"]) for row in predictions)
        return {"headline": percent(value), "anls": value}

    def write_outputs(self, rows, out):
        return {"rrc_submission": write_json(out / f"{self.name}_submission.json",
                                             [{"questionId": r["question_id"], "answer": r["prediction"]}
                                              for r in rows])}


class InfoVQARunner(DocVQARunner):
    name = "infovqa"
    image_field = "image_local_name"
    expected = ('InfographicVQA\'s infographicsVQA_{val,test}_v1.0*.json ({"data": [{"questionId", "question", '
                '"image_local_name"}]})')


CHARTQA_SPLITS = ("test_human.json", "test_augmented.json")


class ChartQARunner(OfficialRunner):
    name = "chartqa"
    suffix = SHORT_ANSWER
    expected = 'ChartQA\'s test_human.json / test_augmented.json ([{"imgname", "query", "label"}])'

    def load_questions(self, data: str | Path) -> list[dict[str, Any]]:
        path = Path(data)
        files = [path / name for name in CHARTQA_SPLITS if (path / name).is_file()] if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"{path} holds neither of {CHARTQA_SPLITS}: expected {self.expected}")
        questions = []
        for file in files:
            split = file.stem.removeprefix("test_")
            records = records_of(read_json(file, self.expected), file, None, ("imgname", "query", "label"),
                                 self.expected)
            # Images sit in png/ beside the json in the released test folder; a flat folder works too.
            prefix = "png/" if path.is_dir() and (path / "png").is_dir() else ""
            questions += [self.question(f"{file}:record {n}", f"{split}_{n}", r["query"], prefix + r["imgname"],
                                        split=split, answer=str(r["label"]))
                          for n, r in enumerate(records, start=1)]
        return questions

    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        splits: dict[str, list[float]] = {}
        for row in predictions:
            splits.setdefault(row["split"], []).append(relaxed_accuracy(row["prediction"], row["answer"]))
        accuracy = {split: mean(hits) for split, hits in splits.items()}
        overall = mean(accuracy.values())
        return {"headline": percent(overall), "relaxed_accuracy": overall, "splits": accuracy}
