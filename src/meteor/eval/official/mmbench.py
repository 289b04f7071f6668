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

Answers are matched to letters as VLMEvalKit does (``mmbench_judge``): the rule stage
(``can_infer``) first, then, for what it cannot read, a GPT judge with the official prompt when a
judge is given (``judge=``, any OpenAI-compatible endpoint through ``OpenAIGrader``). Without one,
those questions count as wrong and the score is a lower bound: how many there were is printed and
saved (``stages`` in scores.json). The headline is the circular accuracy in percent; ``vanilla``
(first variants only, matched the same way) and per-category circular accuracies are reported too.

Who does what (``Runner.run``'s steps):

* ``grade`` asks the judge, lazily, and only here: for the variants the rules cannot read, in
  rotation order, stopping a question at its first variant judged wrong (and for a first variant
  the vanilla score needs). Each row the judge was asked about comes back with ``judge_letter``.
  The replies are cached in ``mmbench_judge.jsonl`` (read first, appended as they come) so a
  re-run does not pay twice; an endpoint that cannot be reached stops the run with its error
  rather than counting answers wrong (the predictions and the replies received so far are kept).
* ``score`` redoes the circular decision from the graded rows alone: pure, it writes nothing.
* ``write_outputs`` writes ``mmbench_verdicts.jsonl`` (every question's verdict and the stage that
  decided it, when the TSV has answers) and ``mmbench_predictions.tsv`` (what the MMBench server
  takes for a test split).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from meteor.eval.base import EvalConfig, read_jsonl
from meteor.eval.official.common import OPTION_LETTER, BenchmarkFileError, OfficialRunner, mean, percent
from meteor.eval.official.mmbench_judge import (CircularVerdict, Judge, JudgeCall, VariantJudge, ask_judge, circular_verdict,
                            stage_counts)

LETTERS = "ABCDEFGHI"
VARIANT_STRIDE = 1_000_000
REQUIRED = ("index", "question", "A", "B", "image")
VERDICTS_FILE = "mmbench_verdicts.jsonl"
JUDGE_FILE = "mmbench_judge.jsonl"


def _present(value: str | None) -> bool:
    # pandas writes a missing cell as "" or "nan"; both mean "no such option / no hint".
    return value is not None and value.strip() not in ("", "nan", "NaN", "None")


class MMBenchRunner(OfficialRunner):
    name = "mmbench"
    suffix = OPTION_LETTER
    expected = "MMBench's TSV (index, question, hint, A..D, answer, category, base64 image)"

    def __init__(self, config: EvalConfig = EvalConfig(), annotations: str | Path | None = None,
                 judge: Judge | None = None):
        super().__init__(config, annotations)
        self.judge = judge

    def load_questions(self, data: str | Path) -> list[dict[str, Any]]:
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
                    options=dict(zip(LETTERS, shown)), raw_question=row["question"],
                    meta={"image_base64": row["image"]}))
        return questions

    # --- grading: the only place the judge is asked ---------------------------------------------------
    def grade(self, rows: Sequence[dict[str, Any]], out_dir: str | Path | None) -> list[dict[str, Any]]:
        """The rows, those the judge was asked about with ``judge_letter`` added (the option letter
        or "Z" read from its reply; None when no reply could be read). The judge is asked exactly
        where ``score`` will need it (see the module docstring), through the reply cache in
        ``out_dir`` (None: no cache). Without a judge, or without answers (a test split), the rows
        are returned as they are."""
        if self.judge is None or not _has_answers(rows):
            return list(rows)
        ask = self._cached_judge(None if out_dir is None else Path(out_dir) / JUDGE_FILE)
        asked: dict[Any, str | None] = {}

        def judge_row(row: dict[str, Any]) -> JudgeCall:
            call = ask(row)
            asked[row["question_id"]] = call.letter
            return call

        groups = _groups(rows)
        verdicts = {group: circular_verdict(variants, judge_row) for group, variants in groups.items()}
        for group, variants in groups.items():   # the vanilla score reads the first variant alone
            first = _first(variants)
            if verdicts[group].stages[first["question_id"]] == "skipped":
                judge_row(first)
        return [{**row, "judge_letter": asked[row["question_id"]]} if row["question_id"] in asked else dict(row)
                for row in rows]

    def _cached_judge(self, cache_path: Path | None) -> VariantJudge:
        """``ask_judge`` on a prediction row, through the reply cache at ``cache_path``."""
        cache = {(row["question_id"], row["prediction"]): JudgeCall(row["letter"], row["replies"])
                 for row in (read_jsonl(cache_path) if cache_path else [])}

        def judge_row(row: dict[str, Any]) -> JudgeCall:
            key = (row["question_id"], row["prediction"])
            if key not in cache:
                question = row.get("raw_question", row["question"].split("\nA. ")[0])
                cache[key] = ask_judge(self.judge, question, row["options"], row["prediction"])
                if cache_path is not None:
                    with cache_path.open("a", encoding="utf-8") as sink:
                        sink.write(json.dumps({"question_id": key[0], "prediction": key[1],
                                               "letter": cache[key].letter, "replies": cache[key].replies},
                                              ensure_ascii=False) + "\n")
            return cache[key]

        return judge_row

    # --- scoring: pure, from the graded rows ------------------------------------------------------------
    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not _has_answers(predictions):
            return {"headline": None, "status": "no answers in the TSV (test split): submit "
                                                "mmbench_predictions.tsv to the MMBench server"}
        groups = _groups(predictions)
        verdicts = self.verdicts(groups)
        vanilla = [self._vanilla_hit(variants, verdicts[group]) for group, variants in groups.items()]
        per_category: dict[str, list[bool]] = {}
        for group, verdict in verdicts.items():
            per_category.setdefault(groups[group][0].get("category") or "?", []).append(verdict.hit)
        stages = stage_counts(list(verdicts.values()))
        accuracy = mean(v.hit for v in verdicts.values())
        scores = {"headline": percent(accuracy), "circular_accuracy": accuracy, "groups": len(verdicts),
                  "vanilla_accuracy": mean(vanilla),
                  "categories": {name: round(mean(hits), 4) for name, hits in sorted(per_category.items())},
                  "stages": stages, "lower_bound": stages["failed"] + stages["unjudged"] > 0}
        if stages["unjudged"]:
            scores["note"] = (f"{stages['unjudged']} of {len(verdicts)} questions needed MMBench's GPT judge "
                              "(no option letter could be read from an answer) and were counted wrong: the "
                              "score is a lower bound; configure a judge (OpenAI-compatible endpoint) to match "
                              "the official evaluator")
        return scores

    def verdicts(self, groups: dict[int, list[dict[str, Any]]]) -> dict[int, CircularVerdict]:
        """Each question's circular verdict from its graded variants: the judge's part is read
        from the rows' ``judge_letter`` (without a judge configured, the judge stage is
        "unjudged")."""
        judge = None if self.judge is None else _recorded_judge
        return {group: circular_verdict(variants, judge) for group, variants in groups.items()}

    def _vanilla_hit(self, variants: list[dict[str, Any]], verdict: CircularVerdict) -> bool:
        """The first variant alone, matched by the same two stages."""
        first = _first(variants)
        letter, stage = verdict.letters[first["question_id"]], verdict.stages[first["question_id"]]
        if letter is None and stage == "skipped" and self.judge is not None:
            letter = _recorded_judge(first).letter
        return letter == first["answer"]

    # --- files ------------------------------------------------------------------------------------------
    def write_outputs(self, rows, out):
        path = out / "mmbench_predictions.tsv"
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(["index", "question", *LETTERS[:4], "prediction", "category"])
            for row in rows:
                options = [row["options"].get(letter, "") for letter in LETTERS[:4]]
                writer.writerow([row["question_id"], row["question"].split("\nA. ")[0], *options,
                                 row["prediction"], row.get("category") or ""])
        written = {"mmbench_submission": path}
        if _has_answers(rows):
            groups = _groups(rows)
            written["mmbench_verdicts"] = _write_verdicts(out / VERDICTS_FILE, groups, self.verdicts(groups))
        return written


def _has_answers(rows: Sequence[dict[str, Any]]) -> bool:
    return all(row["answer"] is not None for row in rows)


def _groups(rows: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """The variants of each question, by group (``index mod 10⁶``), in the rows' order."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    return groups


def _first(variants: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return min(variants, key=lambda row: row["round"])


def _recorded_judge(row: dict[str, Any]) -> JudgeCall:
    """The judge's verdict that ``grade`` recorded on a row."""
    if "judge_letter" not in row:
        raise ValueError(f"MMBench question {row['question_id']}: the rules cannot read its answer "
                         f"{row['prediction']!r}, and the row carries no judge verdict (judge_letter): score "
                         "the rows that runner.grade(rows, out_dir) returns, not the raw predictions")
    return JudgeCall(row["judge_letter"])


def _write_verdicts(path: Path, groups: dict[int, list[dict[str, Any]]],
                    verdicts: dict[int, CircularVerdict]) -> Path:
    with path.open("w", encoding="utf-8") as sink:
        for group, verdict in sorted(verdicts.items()):
            variants = [{"question_id": row["question_id"], "prediction": row["prediction"],
                         "answer": row["answer"], "read_as": verdict.letters[row["question_id"]],
                         "stage": verdict.stages[row["question_id"]]}
                        for row in sorted(groups[group], key=lambda row: row["round"])]
            sink.write(json.dumps({"index": group, "hit": verdict.hit, "stage": verdict.stage,
                                   "variants": variants}, ensure_ascii=False) + "\n")
    return path
