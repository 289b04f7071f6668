"""MM-Vet: open-ended answers graded by a language model with the official MM-Vet prompt.

Questions: LLaVA's ``llava-mm-vet.jsonl`` (``question_id``, ``image``, ``text``; the text is sent as
it is, with no instruction appended). The official evaluator (``mm-vet_evaluator.py`` of
github.com/yuweihao/MM-Vet) reads a results file ``{"v1_0": answer, ...}``; it is always written, as
``mmvet_results.json`` (the ids get LLaVA's ``v1_`` prefix where they lack it, as
``convert_mmvet_for_eval.py`` does).

Grading is pluggable: ``OpenAIGrader`` calls any OpenAI-compatible chat endpoint (base URL, model,
and the name of the environment variable holding the key). Given a grader and ``mm-vet.json`` (the
annotations: ``{"v1_0": {"question", "answer", "capability": [...]}}``), each answer gets the
official few-shot prompt; the grader's reply is read as the official evaluator reads it (the first
space-separated piece, a float in [0, 1]), retried up to five times with the temperature raised by
0.2 after each failure (the official schedule; 0.0 after five failures). The score is 100 × the
mean over all questions, and per capability over the questions having it. Without a grader the
score is ``"needs grading"`` and the results file is what to submit to the official evaluator.

Grading is ``Runner.run``'s grading step (``MMVetRunner.grade``): each row gets its ``grade`` and
its ``capability`` list there, and the grades are cached in ``mmvet_grades.jsonl`` (read first,
appended as they come) so a re-run does not pay twice. ``score`` only averages the graded rows and
writes nothing; ``write_outputs`` writes ``mmvet_results.json``.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from meteor.eval.base import EvalConfig, read_jsonl
from meteor.eval.official.common import BenchmarkFileError, mean, write_json
from meteor.eval.official.vqa import LlavaQuestionRunner

RESULTS_FILE = "mmvet_results.json"
GRADES_FILE = "mmvet_grades.jsonl"
GRADING_ATTEMPTS = 5

# The official grading prompt (mm-vet_evaluator.py): instructions, then few-shot rows of
# "question | ground truth | prediction | correctness"; the row to grade is appended by
# ``grading_prompt`` with its correctness left blank.
GRADING_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""


def grading_prompt(question: str, ground_truth: str, prediction: str) -> str:
    """The official prompt with the row to grade appended (``<AND>``/``<OR>`` spaced out, as there)."""
    truth = ground_truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return GRADING_PROMPT + "\n" + " | ".join([question, truth, prediction, ""])


def read_grade(reply: str) -> float | None:
    """The official reading of a grader reply: its first space-separated piece as a float in [0, 1]."""
    try:
        grade = float(reply.split(" ")[0].strip())
    except ValueError:
        return None
    return grade if 0.0 <= grade <= 1.0 else None


Grader = Callable[[str, float], str]
"""A grader maps (prompt, temperature) to the model's reply text."""


@dataclass(frozen=True)
class OpenAIGrader:
    """Any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, a local server…)."""

    base_url: str
    """e.g. "https://api.openai.com/v1" or "http://localhost:8000/v1"."""
    model: str
    """The grader model's name at that endpoint (the MM-Vet paper used GPT-4)."""
    api_key_env: str = "OPENAI_API_KEY"
    """The environment variable holding the API key (the key itself is never passed around)."""
    max_tokens: int = 3
    """The reply budget: 3, MM-Vet's, for a grade like "0.7" (``build_runner`` gives MMBench's
    judge VLMEvalKit's larger one)."""
    timeout: float = 60.0

    def __call__(self, prompt: str, temperature: float) -> str:
        key = os.environ.get(self.api_key_env)
        if not key:
            raise RuntimeError(f"the grader (MM-Vet's grader, MMBench's judge) needs an API key in "
                               f"${self.api_key_env}; set it or pass another api_key_env")
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": temperature, "max_tokens": self.max_tokens}).encode()
        request = urllib.request.Request(f"{self.base_url.rstrip('/')}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]


def official_id(question_id: Any) -> str:
    text = str(question_id)
    return text if text.startswith("v1_") else f"v1_{text}"


class MMVetRunner(LlavaQuestionRunner):
    name = "mmvet"
    suffix = None
    default_max_new_tokens = 1024   # model_vqa.py's, for MM-Vet's open-ended answers
    question_file = "llava-mm-vet.jsonl"
    annotation_hint = 'MM-Vet\'s mm-vet.json ({"v1_0": {"question", "answer", "capability"}, ...})'

    def __init__(self, config: EvalConfig = EvalConfig(), annotations: str | Path | None = None,
                 grader: Grader | None = None):
        super().__init__(config, annotations)
        self.grader = grader

    def load_annotations(self, path: Path) -> dict[str, dict[str, Any]]:
        data = super().load_annotations(path)
        if not isinstance(data, dict) or not all(isinstance(v, dict) and {"answer", "capability"} <= set(v)
                                                 for v in data.values()):
            raise BenchmarkFileError(path, f"is not {self.annotation_hint}")
        return data

    # --- grading: the only place the grader is asked ----------------------------------------------------
    def grade(self, rows: Sequence[dict[str, Any]], out_dir: str | Path | None) -> list[dict[str, Any]]:
        """The rows with ``grade`` (the grader's correctness in [0, 1]) and ``capability`` (from
        mm-vet.json) added, each answer asked about once through the cache in ``out_dir`` (None:
        no cache). Without a grader or without mm-vet.json, the rows are returned as they are."""
        annotations = self.annotation_data()
        if self.grader is None or annotations is None:
            return list(rows)
        cache_path = None if out_dir is None else Path(out_dir) / GRADES_FILE
        cached = {(row["id"], row["prediction"]): row["grade"] for row in read_jsonl(cache_path)} \
            if cache_path else {}
        graded = []
        for row in rows:
            key = official_id(row["question_id"])
            if key not in annotations:
                raise BenchmarkFileError(self.annotations, f"has no question {key!r}: is it MM-Vet's mm-vet.json?")
            truth = annotations[key]
            if (key, row["prediction"]) not in cached:
                grade = self.ask_grader(truth.get("question", row["question"]), truth["answer"], row["prediction"])
                cached[(key, row["prediction"])] = grade
                if cache_path is not None:
                    with cache_path.open("a", encoding="utf-8") as sink:
                        sink.write(json.dumps({"id": key, "prediction": row["prediction"], "grade": grade}) + "\n")
            graded.append({**row, "grade": cached[(key, row["prediction"])], "capability": list(truth["capability"])})
        return graded

    def ask_grader(self, question: str, truth: str, prediction: str) -> float:
        """One answer's grade: the official prompt, retried on an unreadable reply (0.0 at last)."""
        prompt = grading_prompt(question, truth, prediction)
        for attempt in range(GRADING_ATTEMPTS):
            grade = read_grade(self.grader(prompt, 0.2 * attempt))
            if grade is not None:
                return grade
        return 0.0

    # --- scoring: pure, from the graded rows ------------------------------------------------------------
    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ungraded = [row for row in predictions if "grade" not in row]
        if len(ungraded) == len(predictions):
            if self.grader is not None and self.annotations is not None:
                raise ValueError("these MM-Vet rows carry no grades: score the rows that "
                                 "runner.grade(rows, out_dir) returns, not the raw predictions")
            return {"headline": None, "status": "needs grading",
                    "how": f"submit {RESULTS_FILE} to the official MM-Vet evaluator, or pass a grader "
                           "(OpenAIGrader) and mm-vet.json"}
        if ungraded:
            raise ValueError(f"{len(ungraded)} of {len(predictions)} MM-Vet rows carry no grade (the first: question "
                             f"{ungraded[0]['question_id']!r}): score the rows that runner.grade(rows, out_dir) "
                             "returns, all of them graded")
        capabilities: dict[str, list[float]] = {}
        for row in predictions:
            for capability in row["capability"]:
                capabilities.setdefault(capability, []).append(row["grade"])
        total = 100 * mean(row["grade"] for row in predictions)
        return {"headline": round(total, 2), "total": total,
                "capabilities": {c: round(100 * mean(g), 2) for c, g in sorted(capabilities.items())}}

    # --- files ------------------------------------------------------------------------------------------
    def write_outputs(self, rows, out):
        return {"mmvet_results": write_json(out / RESULTS_FILE,
                                            {official_id(r["question_id"]): r["prediction"] for r in rows})}
