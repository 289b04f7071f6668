"""What every official-benchmark runner shares: strict file readers that name the file and line,
image checks before the first question is asked, and a guard against resuming into another
benchmark's predictions.

``OfficialRunner`` extends ``evaluation.base.Runner`` (whose loop, batching and resume it keeps) with:

* ``annotations``: the answer file a benchmark scores against (TextVQA_0.5.1_val.json, GQA's
  testdev_balanced_questions.json, …), read once: by ``run`` before any generation, so a wrong
  one fails early (``check_annotations``), or on first use when ``score`` is called directly;
* a ``benchmark`` field on every question, hence on every prediction row, so a predictions file
  left by another benchmark in the same output folder is refused instead of silently "resumed";
* every image checked *before* generation starts (``Runner.check_images``): missing ones stop the
  run with their files and lines, and the predictions already written stay where they are;
* ``suffix``: the instruction LLaVA appends ("Answer the question using a single word or
  phrase."), added only when the question file's text does not already end with it (LLaVA's own
  question files carry it; hand-made ones often do not);
* ``write_outputs`` (``Runner``'s step 5): files for the official servers or evaluators, written
  beside scores.json by the runners that have them.

A benchmark defines ``load_questions`` (built with ``question(...)``, in file order) and ``score``;
``Runner.run`` reads the questions once and hands them down.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from meteor.processing.images import ImageError
from meteor.eval.base import EvalConfig, Runner

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."


class BenchmarkFileError(ValueError):
    """A benchmark file that cannot be read as expected; the message names the file and line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path, self.line = Path(path), line


# --- readers -----------------------------------------------------------------------------------------
def read_question_lines(path: str | Path, required: Sequence[str], expected: str
                        ) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every line of a JSONL question file, strictly.

    An empty line before the last record, a line that is not a JSON object, or a record lacking a
    ``required`` field raises ``BenchmarkFileError`` naming the file, the line and ``expected``
    (a description of the right file, e.g. "LLaVA's llava_gqa_testdev_balanced.jsonl").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected {expected}")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise BenchmarkFileError(path, f"empty line inside the question file; expected {expected}, "
                                           "one JSON object per line", number)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchmarkFileError(path, f"not valid JSON ({error.msg}); expected {expected}",
                                     number) from None
        if not isinstance(record, dict):
            raise BenchmarkFileError(path, f"a JSON {type(record).__name__}, not an object; expected "
                                           f"{expected}", number)
        missing = [key for key in required if key not in record]
        if missing:
            raise BenchmarkFileError(path, f"lacks {missing} (has {sorted(record)}): is this {expected}?",
                                     number)
        records.append((number, record))
    if not records:
        raise BenchmarkFileError(path, f"no questions; expected {expected}")
    return records


def read_json(path: str | Path, expected: str) -> Any:
    """A whole JSON file; a missing or malformed one names itself and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected {expected}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BenchmarkFileError(path, f"not valid JSON ({error.msg} at line {error.lineno}); "
                                       f"expected {expected}", error.lineno) from None


def records_of(data: Any, path: str | Path, key: str | None, required: Sequence[str], expected: str
               ) -> list[dict[str, Any]]:
    """The list of records of a JSON annotation file (``data[key]`` or ``data`` itself), each
    checked for the ``required`` fields; errors give the record's index."""
    records = data.get(key) if key is not None and isinstance(data, dict) else data
    if not isinstance(records, list):
        where = f'"{key}" list' if key else "list of records"
        raise BenchmarkFileError(path, f"holds no {where}; expected {expected}")
    for index, record in enumerate(records):
        missing = [field for field in required if not isinstance(record, dict) or field not in record]
        if missing:
            raise BenchmarkFileError(path, f"record {index} lacks {missing}: is this {expected}?")
    return records


def with_suffix(text: str, suffix: str | None) -> str:
    """``text`` followed by LLaVA's instruction on a new line, unless it already ends with it."""
    if not suffix or text.rstrip().endswith(suffix):
        return text
    return f"{text}\n{suffix}"


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def percent(value: float) -> float:
    return round(100.0 * value, 2)


# --- the runner --------------------------------------------------------------------------------------
class OfficialRunner(Runner):
    """A ``Runner`` for one of the paper's twelve benchmarks (see the module docstring)."""

    suffix: str | None = None
    """LLaVA's instruction appended to each question (None: the text is sent as it is)."""
    annotation_hint: str = ""
    """What ``annotations`` should be, for error messages; empty when the benchmark takes none."""
    default_max_new_tokens: int = 128
    """The answer length LLaVA's evaluation scripts allow for this benchmark: 128, the default
    ``--max_new_tokens`` of ``llava/eval/model_vqa_loader.py`` and ``model_vqa_mmbench.py``, which
    ``scripts/v1_5/eval/*.sh`` do not override (and ``max_new_tokens=128`` of MMMU's LLaVA runner);
    MM-Vet raises it to 1024 (``model_vqa.py``). Greedy answers stop at the end-of-answer token
    well before it; the cap only keeps a rambling answer from truncating differently than there."""

    def __init__(self, config: EvalConfig = EvalConfig(), annotations: str | Path | None = None):
        super().__init__(config)
        self.annotations = None if annotations is None else Path(annotations)
        self._annotation_cache: Any = None

    # --- annotations -------------------------------------------------------------------------------
    def annotation_data(self) -> Any:
        """The parsed annotation file (``load_annotations``), read once."""
        if self.annotations is None:
            return None
        if self._annotation_cache is None:
            self._annotation_cache = self.load_annotations(self.annotations)
        return self._annotation_cache

    def load_annotations(self, path: Path) -> Any:
        return read_json(path, self.annotation_hint)

    # --- questions -----------------------------------------------------------------------------------
    def question(self, source: str, question_id: Any, text: str, image: str | None, **fields: Any
                 ) -> dict[str, Any]:
        """One question dict as the base loop expects it, tagged with this benchmark and its source
        ("file:line", kept out of the predictions file through ``meta``)."""
        meta = fields.pop("meta", {})
        return {"question_id": question_id, "benchmark": self.name, "question": text, "image": image,
                **fields, "meta": {"source": source, **meta}}

    def prompt(self, question: dict[str, Any]) -> str:
        return with_suffix(question["question"], self.suffix)

    def check_annotations(self) -> None:
        """The annotation file is read now, so a wrong one fails before any generation."""
        self.annotation_data()

    def check_previous_predictions(self, rows: Sequence[dict[str, Any]], path: Path) -> None:
        """Stricter than the base: every row of an official runner carries its benchmark."""
        for number, row in enumerate(rows, start=1):
            if row.get("benchmark") != self.name:
                raise BenchmarkFileError(
                    path, f"this prediction is for benchmark {row.get('benchmark')!r}, not {self.name!r}: "
                          f"give {self.name} its own output folder (nothing was changed)", number)

    # --- images --------------------------------------------------------------------------------------
    def image_source(self, question: dict[str, Any], image_folder: str | Path | None) -> Any:
        """What ``processor.prepare_image`` gets: a path, or the bytes of an inline image."""
        meta = question.get("meta", {})
        if "image_bytes" in meta:
            return meta["image_bytes"]
        if "image_base64" in meta:
            return decode_base64_image(meta["image_base64"], meta["source"])
        return Path(image_folder or ".") / question["image"]

    @torch.no_grad()
    def answer(self, model, processor, questions: Sequence[dict[str, Any]],
               image_folder: str | Path | None) -> list[str]:
        """``Runner.answer`` with inline (base64) images as well as files."""
        has_image = [q.get("image") is not None or bool({"image_bytes", "image_base64"} & set(q.get("meta", {})))
                     for q in questions]
        images = [self._prepare_image(processor, q, image_folder) if has else None
                  for q, has in zip(questions, has_image)]
        return self.generate(model, processor, [self.prompt(q) for q in questions], images)

    def _prepare_image(self, processor, question: dict[str, Any], image_folder: str | Path | None):
        try:
            return processor.prepare_image(self.image_source(question, image_folder))
        except (ImageError, BenchmarkFileError) as error:
            # Earlier batches are already on disk; the run stops at this question and says which.
            raise ImageError(f"{question['meta']['source']}: question {question['question_id']!r}: {error}. "
                             "Predictions already written are kept; fix or remove this question and "
                             "run again to resume.") from error


def decode_base64_image(text: str, source: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BenchmarkFileError(source, "the image column is not valid base64") from None


def write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path
