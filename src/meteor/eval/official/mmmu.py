"""MMMU (validation), from MMMU's per-subject records, scored as MMMU's ``main_eval_only.py``.

Input: a JSON or JSONL file of records, or a folder of per-subject files (``Accounting.jsonl``, …,
or the Hugging Face dataset's ``*.parquet`` files when pyarrow is installed). A record has ``id``
("validation_Art_1"), ``question``, ``options`` (a list, or its Python repr as in the dataset),
``answer``, ``question_type`` ("multiple-choice" or "open") and ``image_1`` (a path relative to the
image folder, or the dataset's ``{"bytes": …}``). Only the first image is shown, as in MMMU's
LLaVA runner; the question's "<image 1>" tag stays in the text.

Prompts are MMMU's own for LLaVA-1.5: ``construct_prompt`` of ``mmmu/utils/data_utils.py`` with
``mmmu/configs/llava1.5.yaml`` (github.com/MMMU-Benchmark/MMMU, used by its ``mmmu/run_llava.py``).
Multiple choice: "question\\n(A) opt\\n(B) opt\\n\\nAnswer with the option's letter from the given
choices directly."; open: "question\\nAnswer the question using a single word or phrase.". (The YAML
writes each format over lines separated by blank lines, inside quotes; YAML folds each blank line
into one newline, so the blank lines there are single newlines here.)

Scoring: multiple choice by ``extract_choice(…, "mmmu")`` (``parse_multi_choice_response``); where
the official code picks a random letter, the answer counts as wrong here. Open questions by
``parse_open_response`` + ``eval_open`` (``mmmu_open``). Accuracy per subject and overall; the
headline is the overall accuracy in percent.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Sequence

from meteor.eval.metrics import extract_choice
from meteor.eval.base import group_accuracy
from meteor.eval.official.common import (OPTION_LETTER, SHORT_ANSWER, BenchmarkFileError, OfficialRunner, percent, read_json,
                     read_question_lines)
from meteor.eval.official.mmmu_open import eval_open, parse_open_response

REQUIRED = ("id", "question", "options", "answer", "question_type")
EXPECTED = "MMMU records (id, question, options, answer, question_type, image_1)"


def _as_list(value: Any, source: str, field: str) -> list[str]:
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = ast.literal_eval(value)
        except (SyntaxError, ValueError):
            raise BenchmarkFileError(source, f"{field} {value!r:.60} is not a list") from None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise BenchmarkFileError(source, f"{field} must be a list of strings, got {type(value).__name__}")
    return [str(item) for item in value]


def _read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".parquet"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .json, .jsonl or .parquet files: expected {EXPECTED}")
        return [record for file in files for record in _read_records(file)]
    if path.suffix == ".jsonl":
        return [(f"{path}:{n}", r) for n, r in read_question_lines(path, REQUIRED, EXPECTED)]
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow), or convert it to JSONL") from None
        return [(f"{path}:row {n}", r) for n, r in enumerate(parquet.read_table(path).to_pylist(), start=1)]
    data = read_json(path, EXPECTED)
    return [(f"{path}:record {n}", r) for n, r in enumerate(data if isinstance(data, list) else [data], start=1)]


def multiple_choice_prompt(question: str, options: dict[str, str]) -> str:
    """``multi_choice_example_format`` "{}\\n{}\\nAnswer with …" filled with the question and the
    options as ``construct_prompt`` lists them, one "(A) text\\n" per option."""
    listed = "".join(f"({letter}) {option}\n" for letter, option in options.items())
    return f"{question}\n{listed}\n{OPTION_LETTER}"


def open_prompt(question: str) -> str:
    """``short_ans_example_format`` "{}\\nAnswer the question using a single word or phrase."."""
    return f"{question}\n{SHORT_ANSWER}"


class MMMURunner(OfficialRunner):
    name = "mmmu"

    def load_questions(self, data: str | Path) -> list[dict[str, Any]]:
        questions = []
        for source, record in _read_records(Path(data)):
            missing = [key for key in REQUIRED if key not in record]
            if missing:
                raise BenchmarkFileError(source, f"lacks {missing}: expected {EXPECTED}")
            kind = record["question_type"]
            if kind not in ("multiple-choice", "open"):
                raise BenchmarkFileError(source, f"question_type {kind!r} is not 'multiple-choice' or 'open'")
            image, meta = record.get("image_1"), {}
            if isinstance(image, dict):   # the Hugging Face dataset's image cell
                meta["image_bytes"], image = image["bytes"], None
            if kind == "multiple-choice":
                options = dict(zip("ABCDEFGHIJ", _as_list(record["options"], source, "options")))
                text = multiple_choice_prompt(record["question"], options)
                answer: Any = record["answer"]
            else:
                options = {}
                text = open_prompt(record["question"])
                answer = _as_list(record["answer"], source, "answer")
            subject = "_".join(str(record["id"]).split("_")[1:-1]) or "?"
            questions.append(self.question(source, record["id"], text, image, question_type=kind,
                                           options=options, answer=answer, subject=subject, meta=meta))
        return questions

    def prompt(self, question: dict[str, Any]) -> str:
        return question["question"]

    @staticmethod
    def correct(row: dict[str, Any]) -> bool:
        if row["question_type"] == "multiple-choice":
            return extract_choice(row["prediction"], row["options"], "mmmu") == row["answer"]
        return eval_open(row["answer"], parse_open_response(row["prediction"]))

    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        per_subject = group_accuracy(predictions, self.correct, "subject")
        overall = per_subject.pop("all")
        return {"headline": percent(overall["accuracy"]), "accuracy": overall["accuracy"],
                "subjects": dict(sorted(per_subject.items()))}
