"""POPE: free-form answers read as yes/no, then accuracy, precision, recall, F1 and yes-ratio.

Follows the official POPE evaluator, ``evaluate.py`` of github.com/RUCAIBox/POPE, which LLaVA
reproduces line for line in ``llava/eval/eval_pope.py`` (one call per POPE split).
"""

from __future__ import annotations

import math

from meteor.eval.metrics._checks import require_text, require_texts

_NEGATIVE_WORDS = frozenset({"No", "not", "no"})


def pope_answer(text: str) -> str:
    """``"yes"`` or ``"no"``: how POPE's evaluator reads one free-form answer.

    The rules, verbatim from ``evaluate.py``: keep what precedes the first "." (the "first
    sentence" — also cut inside numbers, "2.5" keeps "2"); delete commas; split on single spaces
    (not on other whitespace); the answer is "no" if one of the pieces is exactly ``"No"``,
    ``"not"`` or ``"no"``, and "yes" otherwise — including for empty text, "Not really", "NO",
    "no!", "isn't" and "Nope".

    >>> pope_answer("No, there is not a dog.")
    'no'
    >>> pope_answer("Yes, there is a cat. No other animals.")
    'yes'
    """
    require_text("text", text)
    first_sentence = text.split(".")[0]
    pieces = first_sentence.replace(",", "").split(" ")
    return "no" if _NEGATIVE_WORDS.intersection(pieces) else "yes"


def _ratio(numerator: int, denominator: int) -> float:
    """``numerator / denominator``, NaN where the official script would divide by zero."""
    return numerator / denominator if denominator else math.nan


def pope_scores(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """POPE's scores for one split: accuracy, precision, recall, f1 and yes_ratio, each in [0, 1].

    Each prediction is read with ``pope_answer``; "yes" is the positive class. As in
    ``evaluate.py``: precision = TP / (TP + FP), recall = TP / (TP + FN),
    f1 = 2·precision·recall / (precision + recall), accuracy = (TP + TN) / N, and yes_ratio is the
    fraction of predictions read as "yes".

    Where the official script would crash on a division by zero (no prediction read as "yes", no
    "yes" label, or no true positive for F1) the value is NaN instead, so one degenerate split
    does not stop a run. Labels must be exactly ``"yes"`` or ``"no"`` (the script treats anything
    but "no" as yes; a mislabelled file is refused here instead).
    """
    answers = require_texts("predictions", predictions)
    truths = require_texts("labels", labels)
    if len(answers) != len(truths):
        raise ValueError(f"predictions and labels must pair up one to one, got {len(answers)} "
                         f"predictions and {len(truths)} labels")
    for index, label in enumerate(truths):
        if label not in ("yes", "no"):
            raise ValueError(f"labels[{index}] must be 'yes' or 'no' (POPE's label strings), got {label!r}")

    read = [pope_answer(answer) == "yes" for answer in answers]
    positive = [label == "yes" for label in truths]
    tp = sum(p and t for p, t in zip(read, positive))
    fp = sum(p and not t for p, t in zip(read, positive))
    tn = sum(not p and not t for p, t in zip(read, positive))
    fn = sum(not p and t for p, t in zip(read, positive))

    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    if math.isnan(precision) or math.isnan(recall) or precision + recall == 0:
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {"accuracy": (tp + tn) / len(read), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(read) / len(read)}
