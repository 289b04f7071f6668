"""The synthetic world's test split (written by ``meteor.demo.world``): exact match per question type.

Normalisation (``normalize_answer``), applied to prediction and answer alike: surrounding white
space removed, trailing periods removed, inner white space collapsed to one space, case folded.
Nothing else: "2" and "two" differ, "B" and "B. red" differ; the world's answers are one word, a
number or an option letter, and the model is trained to answer exactly that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from meteor.eval.base import Runner, group_accuracy, read_jsonl

QUESTION_TYPES = ("colour", "count", "exist", "read", "position", "choice")
"""The world benchmark's question types, in the order its scores list them."""


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).casefold()


def world_exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


class WorldRunner(Runner):
    """``test.jsonl`` of a generated world: question, answer, question_type, image."""

    name = "world"

    def load_questions(self, data: str | Path) -> list[dict[str, Any]]:
        rows = read_jsonl(data)
        if not rows:
            raise FileNotFoundError(f"no questions in {data}: expected a world's test.jsonl "
                                    "(meteor data synth writes one)")
        missing = [key for key in ("question_id", "question", "answer", "question_type", "image")
                   if key not in rows[0]]
        if missing:
            raise ValueError(f"{data} lacks {missing}: is it a world's test.jsonl?")
        return rows

    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        per_type = group_accuracy(predictions, lambda r: world_exact_match(r["prediction"], r["answer"]),
                                  "question_type")
        order = [t for t in QUESTION_TYPES if t in per_type] + ["all"]
        return {"accuracy": {t: per_type[t] for t in order if t in per_type}}
