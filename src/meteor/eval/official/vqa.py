"""Short-answer VQA on LLaVA's question files: TextVQA, GQA, VQAv2, VizWiz.

The questions are LLaVA-1.5's evaluation JSONL files (``docs/Evaluation.md``), one object per line
with ``question_id``, ``image`` (relative to the image folder) and ``text`` (the prompt, usually
already ending in "Answer the question using a single word or phrase."). Scoring follows LLaVA's
pipeline for each benchmark (the metric functions in ``meteor.eval.metrics`` name their sources):

* TextVQA val — ``eval_textvqa.py``: each answer is matched to TextVQA_0.5.1_val.json by the image's
  file stem and the question (the prompt's first line, lower-cased); ``textvqa_accuracy``.
* GQA testdev-balanced — ``convert_gqa_for_eval.py`` + GQA's ``eval.py``: matched by question id to
  testdev_balanced_questions.json; ``exact_match``. ``testdev_balanced_predictions.json`` is written
  in the format GQA's ``eval.py`` reads.
* VQAv2 — test-dev answers are on the EvalAI server only: ``vqav2_submission.json`` is written as
  ``convert_vqav2_for_submission.py`` writes it (``evalai_normalize``d answers). Given the val
  annotations (v2_mscoco_val2014_annotations.json), ``vqa_accuracy`` of the normalised answer.
* VizWiz — the same with ``vizwiz_submission.json`` (``{"image", "answer"}``) and, given val.json,
  ``vqa_accuracy`` matched by image name.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from meteor.eval.metrics import evalai_normalize, exact_match, textvqa_accuracy, vqa_accuracy
from meteor.eval.official.common import (SHORT_ANSWER, BenchmarkFileError, OfficialRunner, mean, percent, read_question_lines,
                     records_of, write_json)

LLAVA_FIELDS = ("question_id", "image", "text")


class LlavaQuestionRunner(OfficialRunner):
    """Reads one of LLaVA's evaluation JSONL question files."""

    suffix = SHORT_ANSWER
    question_file = "LLaVA's evaluation question file"

    def load_questions(self, data: str | Path) -> list[dict[str, Any]]:
        expected = f"{self.question_file} (JSONL with {', '.join(LLAVA_FIELDS)})"
        return [self.question(f"{data}:{number}", record["question_id"], record["text"], record["image"],
                              **({"category": record["category"]} if "category" in record else {}))
                for number, record in read_question_lines(data, LLAVA_FIELDS, expected)]

    def needs(self, what: str) -> dict[str, Any]:
        return {"headline": None, "status": f"not scored: {what}"}


def _unknown(row: dict[str, Any], annotations: Path, key: Any) -> BenchmarkFileError:
    return BenchmarkFileError(annotations, f"has no answer for question {row['question_id']!r} (looked up by "
                                           f"{key!r}): is it the annotation file of this benchmark and split?")


class TextVQARunner(LlavaQuestionRunner):
    name = "textvqa"
    question_file = "llava_textvqa_val_v051_ocr.jsonl"
    annotation_hint = 'TextVQA_0.5.1_val.json ({"data": [{"image_id", "question", "answers"}, ...]})'

    def load_annotations(self, path: Path) -> dict[tuple[str, str], list[str]]:
        records = records_of(super().load_annotations(path), path, "data", ("image_id", "question", "answers"),
                             self.annotation_hint)
        return {(r["image_id"], r["question"].lower()): r["answers"] for r in records}

    def load_questions(self, data: str | Path) -> list[dict[str, Any]]:
        """LLaVA's TextVQA file uses the *image* id as ``question_id`` (``eval_textvqa.py`` matches
        on it and the question text), so an image with two questions repeats it. The loop needs
        one id per question: a repeated id becomes "id#k" (k-th occurrence, in file order; stable
        across resumed runs of the same file)."""
        questions = super().load_questions(data)
        counts = Counter(q["question_id"] for q in questions)
        occurrences: Counter = Counter()
        for question in questions:
            original = question["question_id"]
            if counts[original] > 1:
                question["question_id"] = f"{original}#{occurrences[original]}"
                occurrences[original] += 1
        return questions

    @staticmethod
    def original_question(prompt: str) -> str:
        """The question inside LLaVA's prompt, as ``eval_textvqa.py``'s ``prompt_processor`` finds
        it: the first line (the rest is "Reference OCR token: …" and the instruction)."""
        if prompt.startswith("OCR tokens: "):
            return prompt.split("Question: ")[1].split("Short answer:")[0].strip()
        return prompt.split("\n")[0]

    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        answers = self.annotation_data()
        if answers is None:
            return self.needs("give the TextVQA_0.5.1_val.json annotations")
        accuracies = []
        for row in predictions:
            key = (Path(row["image"]).stem, self.original_question(row["question"]).lower())
            if key not in answers:
                raise _unknown(row, self.annotations, key)
            accuracies.append(textvqa_accuracy(row["prediction"], answers[key]))
        accuracy = mean(accuracies)
        return {"headline": percent(accuracy), "accuracy": accuracy}


class GQARunner(LlavaQuestionRunner):
    name = "gqa"
    question_file = "llava_gqa_testdev_balanced.jsonl"
    annotation_hint = 'testdev_balanced_questions.json ({question_id: {"answer", ...}})'

    def load_annotations(self, path: Path) -> dict[str, str]:
        data = super().load_annotations(path)
        if not isinstance(data, dict) or not all(isinstance(v, dict) and "answer" in v for v in data.values()):
            raise BenchmarkFileError(path, f"is not {self.annotation_hint}")
        return {str(qid): record["answer"] for qid, record in data.items()}

    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        answers = self.annotation_data()
        if answers is None:
            return self.needs("give GQA's testdev_balanced_questions.json, or run GQA's eval.py on "
                              "testdev_balanced_predictions.json")
        hits = []
        for row in predictions:
            if str(row["question_id"]) not in answers:
                raise _unknown(row, self.annotations, str(row["question_id"]))
            hits.append(exact_match(row["prediction"], answers[str(row["question_id"])]))
        accuracy = mean(hits)
        return {"headline": percent(accuracy), "accuracy": accuracy}

    def write_outputs(self, rows, out):
        # convert_gqa_for_eval.py: the prediction with trailing periods removed, lower-cased.
        return {"gqa_eval": write_json(out / "testdev_balanced_predictions.json", [
            {"questionId": str(r["question_id"]), "prediction": r["prediction"].rstrip(".").lower()}
            for r in rows])}


def _human_answers(record: dict[str, Any]) -> list[str]:
    return [answer["answer"] if isinstance(answer, dict) else answer for answer in record["answers"]]


class VQAv2Runner(LlavaQuestionRunner):
    """``annotations`` is either the val annotations (scored here) or LLaVA's full
    ``llava_vqav2_mscoco_test2015.jsonl``: EvalAI wants an answer for every test2015 question, so,
    as ``convert_vqav2_for_submission.py`` does, the submission then lists them all, with "" for
    those outside test-dev."""

    name = "vqav2"
    question_file = "llava_vqav2_mscoco_test-dev2015.jsonl"
    annotation_hint = ('v2_mscoco_val2014_annotations.json ({"annotations": [{"question_id", "answers": '
                       '[{"answer"}, ...]}, ...]}) or llava_vqav2_mscoco_test2015.jsonl')

    def load_annotations(self, path: Path) -> dict[str, list[str] | None]:
        if path.suffix == ".jsonl":   # the full test2015 question list: ids only, no answers
            return {str(r["question_id"]): None
                    for _, r in read_question_lines(path, ("question_id",), self.annotation_hint)}
        records = records_of(super().load_annotations(path), path, "annotations", ("question_id", "answers"),
                             self.annotation_hint)
        return {str(r["question_id"]): _human_answers(r) for r in records}

    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        answers = self.annotation_data()
        if answers is None or None in answers.values():
            return self.needs("test-dev answers are on the EvalAI server: upload vqav2_submission.json")
        accuracies = []
        for row in predictions:
            if str(row["question_id"]) not in answers:
                raise _unknown(row, self.annotations, row["question_id"])
            accuracies.append(vqa_accuracy(evalai_normalize(row["prediction"]), answers[str(row["question_id"])]))
        accuracy = mean(accuracies)
        return {"headline": percent(accuracy), "accuracy": accuracy}

    def write_outputs(self, rows, out):
        answered = {str(r["question_id"]): evalai_normalize(r["prediction"]) for r in rows}
        every = self.annotation_data()
        ids = list(every) if every is not None and None in every.values() else list(answered)
        return {"evalai_submission": write_json(out / "vqav2_submission.json", [
            {"question_id": _as_int(qid), "answer": answered.get(qid, "")} for qid in ids])}


class VizWizRunner(LlavaQuestionRunner):
    name = "vizwiz"
    question_file = "llava_vizwiz_test.jsonl"
    annotation_hint = 'VizWiz val.json ([{"image", "question", "answers": [{"answer"}, ...]}, ...])'

    def load_annotations(self, path: Path) -> dict[str, list[str]]:
        records = records_of(super().load_annotations(path), path, None, ("image", "answers"),
                             self.annotation_hint)
        return {r["image"]: _human_answers(r) for r in records}

    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        answers = self.annotation_data()
        if answers is None:
            return self.needs("test answers are on the EvalAI server: upload vizwiz_submission.json")
        accuracies = []
        for row in predictions:
            image = Path(row["image"]).name
            if image not in answers:
                raise _unknown(row, self.annotations, image)
            accuracies.append(vqa_accuracy(evalai_normalize(row["prediction"]), answers[image]))
        accuracy = mean(accuracies)
        return {"headline": percent(accuracy), "accuracy": accuracy}

    def write_outputs(self, rows, out):
        return {"evalai_submission": write_json(out / "vizwiz_submission.json", [
            {"image": Path(r["image"]).name, "answer": evalai_normalize(r["prediction"])} for r in rows])}


def _as_int(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value
