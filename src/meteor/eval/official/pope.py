"""POPE: yes/no object-hallucination questions, scored per split as ``eval_pope.py`` scores them.

Questions: LLaVA's ``llava_pope_test.jsonl`` (``question_id``, ``image``, ``text``, ``category`` —
adversarial, popular or random). Its texts already end with the instruction ("Is there a snowboard
in the image?\\nAnswer the question using a single word or phrase.", line 1 of
``playground/data/eval/pope/llava_pope_test.jsonl`` in github.com/haotian-liu/LLaVA), and LLaVA's
``model_vqa_loader.py`` (run by ``scripts/v1_5/eval/pope.sh``) sends ``text`` as it is: so the
instruction is appended only to a question that lacks it (``with_suffix``), never twice. Labels: POPE's ``coco_pope_{category}.json`` files (JSONL, one
``{"question_id", "image", "text", "label"}`` per line), given as their folder (LLaVA's
``--annotation-dir``) or as one of those files.

As in LLaVA's ``eval_pope.py``, the answers of a category are paired with the lines of its label
file *in order*; where the label line names an image, it must be the answer's image, so a label file
of another benchmark or split is refused instead of silently mis-paired. ``pope_scores`` gives
accuracy, precision, recall, F1 and yes-ratio per category; the headline is the mean F1 over the
categories, in percent (the figure LLaVA-style tables report for POPE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from meteor.eval.metrics import pope_scores
from meteor.eval.official.common import BenchmarkFileError, mean, percent, read_question_lines
from meteor.eval.official.vqa import LlavaQuestionRunner

LABEL_FILE = "coco_pope_{}.json"


class POPERunner(LlavaQuestionRunner):
    name = "pope"
    question_file = "llava_pope_test.jsonl (with a category field)"
    annotation_hint = "POPE's label folder holding coco_pope_{adversarial,popular,random}.json"

    def load_annotations(self, path: Path) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """category → [(source "file:line", label record)] in file order."""
        if path.is_dir():
            files = sorted(path.glob(LABEL_FILE.format("*")))
        else:
            files = [path]
        if not files:
            raise FileNotFoundError(f"{path} holds no {LABEL_FILE.format('*')}: expected {self.annotation_hint}")
        labels = {}
        for file in files:
            if not (file.name.startswith("coco_pope_") and file.suffix == ".json"):
                raise BenchmarkFileError(file, f"is not named {LABEL_FILE.format('<category>')}, so its "
                                               "category is unknown")
            category = file.name[len("coco_pope_"):-len(".json")]
            records = read_question_lines(file, ("label",), f"a POPE label file ({LABEL_FILE.format(category)})")
            for number, record in records:
                if record["label"] not in ("yes", "no"):
                    raise BenchmarkFileError(file, f"label {record['label']!r} is not 'yes' or 'no'", number)
            labels[category] = [(f"{file}:{n}", record) for n, record in records]
        return labels

    def score(self, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        labels = self.annotation_data()
        if labels is None:
            return self.needs("give POPE's label folder (coco_pope_*.json)")
        per_category = {}
        for category, category_labels in labels.items():
            answers = [row for row in predictions if row.get("category") == category]
            if not answers:
                continue
            if len(answers) > len(category_labels):
                raise BenchmarkFileError(self.annotations, f"{category}: {len(answers)} answers but only "
                                                           f"{len(category_labels)} labels")
            for row, (source, label) in zip(answers, category_labels):
                if "image" in label and Path(label["image"]).name != Path(row["image"]).name:
                    raise BenchmarkFileError(source, f"labels image {label['image']!r} but the answer paired "
                                                     f"with it (question {row['question_id']!r}) is about "
                                                     f"{row['image']!r}: label file and question file disagree")
            per_category[category] = pope_scores([r["prediction"] for r in answers],
                                                 [label["label"] for _, (_, label) in zip(answers, category_labels)])
        unlabelled = {row.get("category") for row in predictions} - set(per_category)
        if unlabelled:
            raise BenchmarkFileError(self.annotations, f"no label file for categories {sorted(map(str, unlabelled))}")
        f1 = mean(s["f1"] for s in per_category.values())
        return {"headline": percent(f1), "f1": f1, "accuracy": mean(s["accuracy"] for s in per_category.values()),
                "categories": per_category}
