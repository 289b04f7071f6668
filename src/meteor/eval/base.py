"""The shared machinery of every benchmark runner: questions in, predictions JSONL out, then a score.

A runner reads a benchmark's questions, asks the model in batches (greedy decoding), appends each
prediction to ``predictions.jsonl`` as soon as its batch is answered (flushed, one JSON object per
line), and on a later call skips every ``question_id`` already in that file: an interrupted run
resumes where it stopped and never redoes a finished question. Scoring is a separate step over the
predictions file (LLaVA's good habit: predictions first, then the official metric).

``Runner.run`` goes through five steps, each a method a benchmark may override:

1. ``load_questions``, once (``EvalConfig.limit`` applied), then the checks made before any
   generation (``check_annotations``, ``check_previous_predictions``, ``check_images``);
2. generation of the questions not yet in ``predictions.jsonl``;
3. ``grade(rows, out_dir)``: where a benchmark's official evaluator consults a language model
   (MM-Vet's grader, MMBench's GPT judge), the rows come back carrying its verdicts; its replies are
   cached in ``out_dir`` so a re-run does not pay twice. The identity by default;
4. ``score(rows)``: the metric, a pure function of the graded rows (no files written, no state
   left by ``run``), so calling it twice gives the same dict;
5. ``write_outputs(rows, out_dir)``: files for the official servers or evaluators, beside
   ``scores.json``; none by default.

A new benchmark is a subclass that says how to read its questions (``load_questions``), how to
phrase the prompt (``prompt``) and how to score (``score``); the loop, batching, resuming and file
handling are here once.
"""

from __future__ import annotations

import json
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Sequence

import torch

PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"


@dataclass(frozen=True)
class EvalConfig:
    """Options shared by every runner."""

    batch_size: int = 16
    """Questions per ``generate`` call (left-padded together)."""
    max_new_tokens: int | None = None
    """Longest answer generated; None: the runner's own ``default_max_new_tokens`` (short for
    one-word benchmarks, long for MM-Vet's descriptions)."""
    limit: int | None = None
    """Evaluate only the first ``limit`` questions (smoke tests)."""
    tokens_per_slice: int | None = None
    """K′ visual tokens kept per view at inference (≤ a view's patch count; selection has no
    parameters, so a model trained at K runs at any K′); None: the K the model was trained with."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1 or None (the runner's default), got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be ≥ 1 or None, got {self.limit}")
        if self.tokens_per_slice is not None and self.tokens_per_slice < 1:
            raise ValueError(f"tokens_per_slice must be ≥ 1 or None (the model's K), got {self.tokens_per_slice}")


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


MISSING_IMAGES_LISTED = 5
"""How many missing images an error message names one by one (all are counted and located)."""


class Runner(ABC):
    """Generate answers for a benchmark's questions, resumably, and score them."""

    name: str = ""
    """The benchmark's name, written into every prediction row and into scores.json."""
    default_max_new_tokens: int = 8
    """The answer length allowed when ``EvalConfig.max_new_tokens`` is None: 8 suits one-word,
    number or letter answers (the synthetic world's); runners for longer answers raise it."""
    image_folder_option: str = "--image-folder"
    """How the user sets the image folder, named by the missing-image error."""

    def __init__(self, config: EvalConfig = EvalConfig()):
        self.config = config

    @property
    def max_new_tokens(self) -> int:
        """The answer length used: the configuration's, else this runner's default."""
        return self.config.max_new_tokens or self.default_max_new_tokens

    # --- what a benchmark defines -------------------------------------------------------------
    @abstractmethod
    def load_questions(self, data: str | Path) -> list[dict[str, Any]]:
        """Questions as dicts with at least ``question_id``, ``question`` and ``image`` (a path
        relative to the image folder, or None for text-only)."""

    def prompt(self, question: dict[str, Any]) -> str:
        """The user turn sent to the model (the processor adds the template and the image)."""
        return question["question"]

    def grade(self, rows: Sequence[dict[str, Any]], out_dir: str | Path | None) -> list[dict[str, Any]]:
        """The prediction rows as ``score`` needs them: where the official evaluator asks a
        language model about each answer, its verdict is added to the row here, and its replies
        are cached under ``out_dir`` (None: no cache). The rows as they are by default."""
        return list(rows)

    @abstractmethod
    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The benchmark's metric(s) over graded prediction rows (question fields + ``prediction``,
        + whatever ``grade`` added): a pure function, which writes nothing. A ``note`` in the result
        is a warning ``run`` also prints."""

    def write_outputs(self, rows: Sequence[dict[str, Any]], out: Path) -> dict[str, Path]:
        """Files for the official server or evaluator, from the graded rows: name → path; none by
        default."""
        return {}

    def check_annotations(self) -> None:
        """Read the files ``score`` needs beside the rows (annotations), so a wrong one fails
        before any generation; none by default."""

    # --- the shared loop --------------------------------------------------------------------------
    def run(self, model, processor, data: str | Path, image_folder: str | Path | None, out_dir: str | Path,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Answer every question not yet in ``out_dir/predictions.jsonl``, then grade, score and
        write the benchmark's files (the module docstring lists the steps); the scores are
        returned and written to ``out_dir/scores.json``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        questions = self.load_questions(data)
        if self.config.limit is not None:
            questions = questions[:self.config.limit]
        ids = [q["question_id"] for q in questions]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{data} repeats question ids; every question needs its own question_id")
        self.check_annotations()
        path = out / PREDICTIONS_FILE
        previous = read_jsonl(path)
        self.check_previous_predictions(previous, path)
        self._check_tokens_per_slice(previous, path)
        done = {row["question_id"] for row in previous}
        todo = [q for q in questions if q["question_id"] not in done]
        self.check_images(questions, image_folder, data, answered=done)   # before any generation
        started = time.perf_counter()
        model.eval()
        with path.open("a", encoding="utf-8") as sink:
            for start in range(0, len(todo), self.config.batch_size):
                batch = todo[start:start + self.config.batch_size]
                answers = self.answer(model, processor, batch, image_folder)
                for question, answer in zip(batch, answers):
                    row = {**{k: v for k, v in question.items() if k != "meta"}, "benchmark": self.name,
                           "prediction": answer}
                    if self.config.tokens_per_slice is not None:
                        row["tokens_per_slice"] = self.config.tokens_per_slice
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
                if progress is not None:
                    progress(len(done) + start + len(batch), len(questions))
        seconds = round(time.perf_counter() - started, 2)
        wanted = set(ids)
        rows = self.grade([row for row in read_jsonl(path) if row["question_id"] in wanted], out)
        scores = {"benchmark": self.name, "questions": len(rows), "answered_now": len(todo),
                  "max_new_tokens": self.max_new_tokens, "seconds": seconds, **self.score(rows)}
        if self.config.tokens_per_slice is not None:
            scores["tokens_per_slice"] = self.config.tokens_per_slice
        written = self.write_outputs(rows, out)
        if written:
            scores["files"] = {name: str(file) for name, file in written.items()}
        (out / SCORES_FILE).write_text(json.dumps(scores, indent=2) + "\n")
        if "note" in scores:
            print(f"{self.name}: {scores['note']}", file=sys.stderr)
        return scores

    # --- checks before the first question is asked -------------------------------------------------
    def check_previous_predictions(self, rows: Sequence[dict[str, Any]], path: Path) -> None:
        """Refuse to resume into another benchmark's predictions (rows written before rows were
        tagged with their benchmark are taken as this one's)."""
        for number, row in enumerate(rows, start=1):
            if row.get("benchmark", self.name) != self.name:
                raise ValueError(f"{path}:{number}: this prediction is for benchmark {row['benchmark']!r}, not "
                                 f"{self.name!r}: give {self.name} its own output folder (nothing was changed)")

    def _check_tokens_per_slice(self, rows: Sequence[dict[str, Any]], path: Path) -> None:
        """Refuse to resume into predictions made with another K′ (rows without the field were made
        with the model's K)."""
        for number, row in enumerate(rows, start=1):
            if row.get("tokens_per_slice") != self.config.tokens_per_slice:
                raise ValueError(f"{path}:{number}: this prediction was made with tokens_per_slice="
                                 f"{row.get('tokens_per_slice')}, not {self.config.tokens_per_slice}: give this "
                                 f"run its own output folder (nothing was changed)")

    def check_images(self, questions: Sequence[dict[str, Any]], image_folder: str | Path | None,
                     data: str | Path, answered: Collection[Any] = ()) -> None:
        """Every image file named by a question still to answer (not in ``answered``) must exist
        under ``image_folder``; otherwise one error lists the first few missing files, how many
        there are and where (file and line of ``data``, in the order ``load_questions`` read them)."""
        folder = Path(image_folder or ".")
        to_answer = [q for q in questions if q["question_id"] not in answered]
        missing = [(position, q) for position, q in enumerate(questions)
                   if q["question_id"] not in answered and q.get("image") is not None
                   and not (folder / q["image"]).is_file()]
        if not missing:
            return
        lines = _record_lines(data)
        if lines is not None and len(lines) < len(questions):   # not one question per line: no line numbers
            lines = None
        sources = [q.get("meta", {}).get("source") or
                   (f"{data}:{lines[position]}" if lines else f"{data}:record {position + 1}")
                   for position, q in missing]
        named = "\n".join(f"  {source}: question {q['question_id']!r}: {folder / q['image']}"
                          for source, (_, q) in zip(sources[:MISSING_IMAGES_LISTED], missing))
        more = f"\n  … and {len(missing) - MISSING_IMAGES_LISTED} more" if len(missing) > MISSING_IMAGES_LISTED else ""
        raise FileNotFoundError(
            f"missing images: {len(missing)} of the {len(to_answer)} questions to answer name an image file "
            f"that is not under {folder} ({describe_sources(sources)}):\n{named}{more}\n"
            f"Point {self.image_folder_option} at the folder the question file's image paths are relative to "
            f"(now {folder.resolve()}). Nothing was generated; predictions already written are kept.")

    feature_cache = None
    """A ``FeatureCache`` (``meteor.model.feature_cache``) the vision tower's outputs are read from and
    kept in, set by whoever runs the benchmark (e.g. the demo, whose budgets share a frozen tower)."""

    @torch.no_grad()
    def answer(self, model, processor, questions: Sequence[dict[str, Any]],
               image_folder: str | Path | None) -> list[str]:
        """Greedy answers for one batch, decoded without special tokens and stripped. Questions on
        the same image file share one prepared image (decoded and sliced once)."""
        prepared: dict[str, Any] = {}
        for question in questions:
            if question.get("image") is not None and str(question["image"]) not in prepared:
                prepared[str(question["image"])] = processor.prepare_image(Path(image_folder or ".") / question["image"])
        images = [None if q.get("image") is None else prepared[str(q["image"])] for q in questions]
        return self.generate(model, processor, [self.prompt(q) for q in questions], images)

    def generate(self, model, processor, prompts: Sequence[str], images: Sequence[Any]) -> list[str]:
        """Greedy answers to ``prompts`` (one image or None each) in one left-padded batch, through the
        project's one generation path (``meteor.serve.streaming.generate_streamed``)."""
        from meteor.serve.streaming import AnswerStream, generate_streamed

        k = self.config.tokens_per_slice
        prompt_ids = [processor.question_prompt(prompt, image, tokens_per_slice=k) for prompt, image in zip(prompts, images)]
        rows = [AnswerStream(processor.tokenizer, self.max_new_tokens) for _ in prompt_ids]
        generate_streamed(model, processor, prompt_ids, rows, k, feature_cache=self.feature_cache)
        return [row.text.strip() for row in rows]


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


def _record_lines(data: str | Path) -> list[int] | None:
    """The line number of each record of a JSONL file as ``read_jsonl`` reads it (blank lines
    skipped), or None when ``data`` is not a JSONL file."""
    path = Path(data)
    if path.suffix != ".jsonl" or not path.is_file():
        return None
    return [number for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
            if line.strip()]


def describe_sources(sources: Sequence[str]) -> str:
    """"file:line" sources grouped by file, numbers as ranges, first-seen order:
    ``["q.jsonl:2", "q.jsonl:3", "q.jsonl:4", "q.jsonl:9", "b.json:record 1"]`` →
    ``"q.jsonl lines 2-4, 9; b.json record 1"``."""
    groups: dict[tuple[str, str], list[int]] = {}
    for source in sources:
        file, _, where = source.rpartition(":")
        kind, _, number = where.rpartition(" ")
        if not number.isdigit():   # a locator that is not numbered: kept as it is
            groups.setdefault((source, ""), [])
            continue
        groups.setdefault((file, kind or "line"), []).append(int(number))
    parts = []
    for (file, kind), numbers in groups.items():
        if not kind:
            parts.append(file)
            continue
        plural = kind + ("s" if len(numbers) > 1 else "")
        parts.append(f"{file} {plural} {_ranges(numbers)}")
    return "; ".join(parts)


def _ranges(numbers: Sequence[int]) -> str:
    """[2, 3, 4, 9] → "2-4, 9" (in the given order; a run is consecutive increasing numbers)."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
