"""MMBench with circular evaluation, from the benchmark's TSV (``mmbench_dev_20230712.tsv``).

The TSV has one question per row: ``index``, ``question``, ``hint``, options ``A``..``D`` (empty
where a question has fewer), ``answer`` (absent in test splits), ``category``, ``image`` (base64).
The prompt is LLaVA's (``model_vqa_mmbench.py``): the hint (if any) and the question, then one
"A. option" line per option, then "Answer with the option's letter from the given choices directly."

Circular evaluation (MMBench's CircularEval): a question with n options is asked n times, the
options rotated by one place each time (the answer's letter moving with its text); it counts as
right only if *every* variant is answered right. Variants get the question id ``index + k·10⁶``
(k = 0..n−1) and are grouped by ``index mod 10⁶``, the convention of the official TSVs, so a TSV
that already holds the circular copies (indices ≥ 10⁶) is used as it is, without rotating again.

The letter an answer picks is read by ``extract_choice(…, "mmbench")`` (the rule stage of
MMBench's evaluator); where the official evaluator would then ask a GPT judge, the variant counts
as wrong here — a lower bound on the official score. The headline is the circular accuracy in
percent; ``vanilla`` (first variants only) and per-category circular accuracies are reported too.
Without answers (a test split), ``mmbench_predictions.tsv`` is written for the MMBench server.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any, Sequence

from ...metrics import extract_choice
from .common import OPTION_LETTER, BenchmarkFileError, OfficialRunner, mean, percent

LETTERS = "ABCDEFGHI"
VARIANT_STRIDE = 1_000_000
REQUIRED = ("index", "question", "A", "B", "image")


def _present(value: str | None) -> bool:
    # pandas writes a missing cell as "" or "nan"; both mean "no such option / no hint".
    return value is not None and value.strip() not in ("", "nan", "NaN", "None")


class MMBenchRunner(OfficialRunner):
    name = "mmbench"
    suffix = OPTION_LETTER
    expected = "MMBench's TSV (index, question, hint, A..D, answer, category, base64 image)"

    def read_questions(self, data: str | Path) -> list[dict[str, Any]]:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: expected {self.expected}")
        csv.field_size_limit(sys.maxsize)   # the image column holds whole base64 images
        questions = []
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            missing = [key for key in REQUIRED if key not in (reader.fieldnames or [])]
            if missing:
                raise BenchmarkFileError(path, f"header lacks {missing} (has {reader.fieldnames}): expected "
                                               f"{self.expected}", 1)
            rows = []
            for row in reader:
                try:
                    index = int(float(row["index"]))
                except (TypeError, ValueError):
                    raise BenchmarkFileError(path, f"index {row['index']!r} is not a number", reader.line_num) from None
                if not _present(row["image"]):
                    raise BenchmarkFileError(path, f"question {index} has no image", reader.line_num)
                rows.append((reader.line_num, index, row))
        if not rows:
            raise BenchmarkFileError(path, f"no questions; expected {self.expected}")
        already_circular = any(index >= VARIANT_STRIDE for _, index, _ in rows)
        for line, index, row in rows:
            options = [row[letter] for letter in LETTERS if _present(row.get(letter))]
            answer = row.get("answer") if _present(row.get("answer")) else None
            if answer is not None and answer not in LETTERS[:len(options)]:
                raise BenchmarkFileError(path, f"answer {answer!r} is not one of the {len(options)} option "
                                               "letters", line)
            stem = f"{row['hint']}\n{row['question']}" if _present(row.get("hint")) else row["question"]
            rounds = 1 if already_circular else len(options)
            for k in range(rounds):
                shown = options[k:] + options[:k]
                letter = None if answer is None else LETTERS[(LETTERS.index(answer) - k) % len(options)]
                text = stem + "".join(f"\n{LETTERS[i]}. {option}" for i, option in enumerate(shown))
                questions.append(self.question(
                    f"{path}:{line}", index + k * VARIANT_STRIDE, text, None,
                    group=index % VARIANT_STRIDE, round=k, answer=letter, category=row.get("category"),
                    options=dict(zip(LETTERS, shown)), meta={"image_base64": row["image"]}))
        return questions

    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if any(row["answer"] is None for row in predictions):
            return {"headline": None, "status": "no answers in the TSV (test split): submit "
                                                "mmbench_predictions.tsv to the MMBench server"}
        groups: dict[int, list[bool]] = {}
        category: dict[int, str] = {}
        vanilla = []
        for row in predictions:
            hit = extract_choice(row["prediction"], row["options"], "mmbench") == row["answer"]
            groups.setdefault(row["group"], []).append(hit)
            category[row["group"]] = row.get("category") or "?"
            if row["round"] == 0:
                vanilla.append(hit)
        circular = {group: all(hits) for group, hits in groups.items()}
        per_category: dict[str, list[bool]] = {}
        for group, hit in circular.items():
            per_category.setdefault(category[group], []).append(hit)
        accuracy = mean(circular.values())
        return {"headline": percent(accuracy), "circular_accuracy": accuracy, "groups": len(circular),
                "vanilla_accuracy": mean(vanilla),
                "categories": {name: round(mean(hits), 4) for name, hits in sorted(per_category.items())}}

    def write_outputs(self, rows, out):
        path = out / "mmbench_predictions.tsv"
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(["index", "question", *LETTERS[:4], "prediction", "category"])
            for row in rows:
                options = [row["options"].get(letter, "") for letter in LETTERS[:4]]
                writer.writerow([row["question_id"], row["question"].split("\nA. ")[0], *options,
                                 row["prediction"], row.get("category") or ""])
        return {"mmbench_submission": path}
