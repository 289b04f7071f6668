"""The shared machinery of every benchmark runner: questions in, predictions JSONL out, then a score.

A runner reads a benchmark's questions, asks the model in batches (greedy decoding), appends each
prediction to ``predictions.jsonl`` as soon as its batch is answered (flushed, one JSON object per
line), and on a later call skips every ``question_id`` already in that file: an interrupted run
resumes where it stopped and never redoes a finished question. Scoring is a separate, pure step
over the predictions file (LLaVA's good habit: predictions first, then the official metric).

A new benchmark is a subclass that says how to read its questions (``load_questions``), how to
phrase the prompt (``prompt``) and how to score (``score``); the loop, batching, resuming and file
handling are here once.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"


@dataclass(frozen=True)
class EvalConfig:
    """Options shared by every runner."""

    batch_size: int = 16
    """Questions per ``generate`` call (left-padded together)."""
    max_new_tokens: int = 8
    """Longest answer generated; the world's answers are one word, a number or a letter."""
    limit: int | None = None
    """Evaluate only the first ``limit`` questions (smoke tests)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be ≥ 1, got {self.batch_size}, "
                             f"{self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be ≥ 1 or None, got {self.limit}")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path``; a last line cut by a crash mid-write is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows_left = path.read_text(encoding="utf-8").splitlines()[number:]
            if any(r.strip() for r in rows_left):
                raise ValueError(f"{path}:{number} is not valid JSON (and is not the last line, so it is "
                                 "not a write cut by a crash); delete the file to start over") from None
    return rows


class Runner(ABC):
    """Generate answers for a benchmark's questions, resumably, and score them."""

    name: str = ""

    def __init__(self, config: EvalConfig = EvalConfig()):
        self.config = config

    # --- what a benchmark defines -------------------------------------------------------------
    @abstractmethod
    def load_questions(self, data: str | Path) -> list[dict[str, Any]]:
        """Questions as dicts with at least ``question_id``, ``question`` and ``image`` (a path
        relative to the image folder, or None for text-only)."""

    def prompt(self, question: dict[str, Any]) -> str:
        """The user turn sent to the model (the processor adds the template and the image)."""
        return question["question"]

    @abstractmethod
    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The benchmark's metric(s) over prediction rows (question fields + ``prediction``)."""

    # --- the shared loop --------------------------------------------------------------------------
    def run(self, model, processor, data: str | Path, image_folder: str | Path | None, out_dir: str | Path,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Answer every question not yet in ``out_dir/predictions.jsonl``, then score them all;
        the scores are returned and written to ``out_dir/scores.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        questions = self.load_questions(data)
        if self.config.limit is not None:
            questions = questions[:self.config.limit]
        ids = [q["question_id"] for q in questions]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{data} repeats question ids; every question needs its own question_id")
        path = out / PREDICTIONS_FILE
        done = {row["question_id"] for row in read_jsonl(path)}
        todo = [q for q in questions if q["question_id"] not in done]
        started = time.perf_counter()
        model.eval()
        with path.open("a", encoding="utf-8") as sink:
            for start in range(0, len(todo), self.config.batch_size):
                batch = todo[start:start + self.config.batch_size]
                answers = self.answer(model, processor, batch, image_folder)
                for question, answer in zip(batch, answers):
                    row = {**{k: v for k, v in question.items() if k != "meta"}, "prediction": answer}
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
                if progress is not None:
                    progress(len(done) + start + len(batch), len(questions))
        wanted = set(ids)
        rows = [row for row in read_jsonl(path) if row["question_id"] in wanted]
        scores = {"benchmark": self.name, "questions": len(rows), "answered_now": len(todo),
                  "seconds": round(time.perf_counter() - started, 2), **self.score(rows)}
        (out / SCORES_FILE).write_text(json.dumps(scores, indent=2) + "\n")
        return scores

    @torch.no_grad()
    def answer(self, model, processor, questions: Sequence[dict[str, Any]],
               image_folder: str | Path | None) -> list[str]:
        """Greedy answers for one batch, decoded without special tokens and stripped."""
        images = [None if q.get("image") is None else
                  processor.prepare_image(Path(image_folder or ".") / q["image"]) for q in questions]
        prompts = [self.prompt(q) for q in questions]
        if any(image is None for image in images):   # mixed batches: one generate call per question
            return [self._generate(model, processor, [p], [] if i is None else [i])[0]
                    for p, i in zip(prompts, images)]
        return self._generate(model, processor, prompts, images)

    def _generate(self, model, processor, prompts: list[str], images: list) -> list[str]:
        batch = processor(prompts, images)
        new = model.generate(**batch.to_model_kwargs(), max_new_tokens=self.config.max_new_tokens,
                             do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                             eos_token_id=processor.tokenizer.eos_token_id)
        return [text.strip() for text in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def group_accuracy(rows: Iterable[dict[str, Any]], correct: Callable[[dict[str, Any]], bool],
                   key: str) -> dict[str, dict[str, float]]:
    """Accuracy per value of ``row[key]`` and over all rows ("all")."""
    totals: dict[str, list[int]] = {}
    for row in rows:
        hit = int(correct(row))
        for group in (row.get(key, "?"), "all"):
            totals.setdefault(group, [0, 0])
            totals[group][0] += hit
            totals[group][1] += 1
    return {group: {"accuracy": round(h / n, 4), "questions": n} for group, (h, n) in totals.items()}
