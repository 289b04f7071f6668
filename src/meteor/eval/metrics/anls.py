"""ANLS, the DocVQA / InfographicVQA score: normalised Levenshtein similarity to the closest answer.

Follows the Robust Reading Competition's evaluation script for DocVQA and InfographicVQA
(rrc.cvc.uab.es, "Infographics VQA Evaluation scripts", ``evaluate_method``; the same lines are
reproduced in Qwen-VL's ``eval_mm/infographicsvqa_eval.py`` and in github.com/shunk031/ANLS).
"""

from __future__ import annotations

from meteor.eval.metrics._checks import require_text, require_texts


def _levenshtein(a: str, b: str) -> int:
    """Edit distance with unit costs for insertion, deletion and substitution (two-row DP)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1,                        # delete char_a
                               current[j - 1] + 1,                     # insert char_b
                               previous[j - 1] + (char_a != char_b)))  # substitute
        previous = current
    return previous[-1]


def _squash(text: str) -> str:
    """The script's normalisation: lower-case, strip, and runs of whitespace to one space."""
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """ANLS of one prediction against the acceptable answers of one question, in [0, 1].

    As in the RRC DocVQA/InfographicVQA script: for each answer, the distance is the Levenshtein
    distance between the normalised strings (``" ".join(s.strip().lower().split())``) divided by
    the length of the longer *raw* string (``max(len(answer.upper()), len(prediction.upper()))``;
    0 when both are empty). The similarity is ``1 − min(distance)``, and it becomes 0 when it is
    below ``threshold``: a similarity of exactly 0.5 is kept.

    The raw-length denominator is a quirk kept on purpose: surrounding or repeated whitespace
    does not count towards the distance but does lengthen the denominator, so ``"  abcd  "``
    against ``"abef"`` scores 1 − 2/8 = 0.75 where ``"abcd"`` scores 0.5.
    (pix2struct's ``anls_metric`` differs: it divides by the normalised lengths.)
    """
    require_text("prediction", prediction)
    golds = require_texts("answers", answers)
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1] (DocVQA uses 0.5), got {threshold!r}")
    squashed_prediction = _squash(prediction)
    distances = []
    for gold in golds:
        longest = max(len(gold.upper()), len(prediction.upper()))
        edits = _levenshtein(_squash(gold), squashed_prediction)
        distances.append(0.0 if longest == 0 else edits / longest)
    similarity = 1 - min(distances)
    return 0.0 if similarity < threshold else similarity
