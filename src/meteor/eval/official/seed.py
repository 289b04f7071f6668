"""SEED-Bench (image questions), scored as LLaVA's ``convert_seed_for_submission.py`` scores it.

Questions: LLaVA's ``llava-seed-bench.jsonl`` (``question_id``, ``image``, ``text`` with the options
and "Answer with the option's letter from the given choices directly."). Answers: SEED-Bench's
``SEED-Bench.json`` (``{"questions": [{"question_id", "answer", "question_type_id", "data_type"}],
"question_type": {name: id}}``).

A prediction is right only if it *is* the answer letter (``text == answer``, no extraction), per
question type and over all image questions; the headline is the overall image accuracy in percent.
Video questions of SEED-Bench.json are ignored, as LLaVA reports SEED-image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from meteor.eval.base import group_accuracy
from meteor.eval.official.common import OPTION_LETTER, BenchmarkFileError, percent, records_of
from meteor.eval.official.vqa import LlavaQuestionRunner


class SEEDRunner(LlavaQuestionRunner):
    name = "seed"
    suffix = OPTION_LETTER
    question_file = "llava-seed-bench.jsonl"
    annotation_hint = 'SEED-Bench.json ({"questions": [{"question_id", "answer", "question_type_id"}, ...]})'

    def load_annotations(self, path: Path) -> dict[str, tuple[str, str]]:
        data = super().load_annotations(path)
        records = records_of(data, path, "questions", ("question_id", "answer", "question_type_id"),
                             self.annotation_hint)
        names = {str(v): k for k, v in data.get("question_type", {}).items()}
        return {str(r["question_id"]): (r["answer"], names.get(str(r["question_type_id"]), str(r["question_type_id"])))
                for r in records if r.get("data_type", "image") == "image"}

    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        answers = self.annotation_data()
        if answers is None:
            return self.needs("give SEED-Bench.json")
        rows = []
        for row in predictions:
            if str(row["question_id"]) not in answers:
                raise BenchmarkFileError(self.annotations, f"has no image question {row['question_id']!r}: is it "
                                                           "SEED-Bench.json?")
            answer, question_type = answers[str(row["question_id"])]
            rows.append({"hit": row["prediction"] == answer, "question_type": question_type})
        per_type = group_accuracy(rows, lambda r: r["hit"], "question_type")
        return {"headline": percent(per_type["all"]["accuracy"]), "accuracy": per_type["all"]["accuracy"],
                "question_types": per_type}
