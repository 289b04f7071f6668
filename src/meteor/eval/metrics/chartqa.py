"""ChartQA relaxed accuracy: numbers may be off by 5% of the target, anything else must match.

The ChartQA repository (github.com/vis-nlp/ChartQA) ships no scoring script; the reference
implementation of the paper's rule ("within 5% of the gold answer… for non-numeric answers we
still need an exact match") is ``relaxed_correctness`` in ``pix2struct/metrics.py`` of
github.com/google-research/pix2struct, the one lmms-eval and Qwen-VL's evaluation reuse.
"""

from __future__ import annotations

from meteor.eval.metrics._checks import require_text


def _as_number(text: str) -> float | None:
    """The value of ``text`` as pix2struct's ``_to_float`` reads it, or None if it is not a number.

    Python's ``float`` does the parsing, so surrounding whitespace, exponents ("1e3"), underscores
    ("1_000"), "inf" and "nan" are numbers, and "1,000" or "$5" are not. A string ending in "%"
    loses every trailing "%" and is divided by 100: "45%" is 0.45.
    """
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy of one prediction: 1.0 or 0.0.

    Follows ``relaxed_correctness(target, prediction, max_relative_change=0.05)`` of
    google-research/pix2struct (``pix2struct/metrics.py``):

    * If both strings read as numbers (see ``_as_number``) and the target's value is non-zero, the
      answer is right when ``|prediction − target| / |target| <= tolerance``, computed in floats,
      so 105 and 95 pass against 100 but "1.05" fails against "1" (0.050000000000000044 > 0.05).
      Percentages are compared as fractions: "45%" equals "0.45" but not "45".
    * Otherwise — a non-numeric string on either side, or a target of zero ("0", "0.0", "0%") —
      the answer is right only if ``prediction.lower() == target.lower()``: no stripping, so a
      target of "0" accepts "0" but not "0.0" or "0 ".
    """
    require_text("prediction", prediction)
    require_text("target", target)
    if not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a non-negative relative error (ChartQA uses 0.05), "
                         f"got {tolerance!r}")
    predicted, expected = _as_number(prediction), _as_number(target)
    # `expected` is tested for truth, not for None: a zero target falls through to string match.
    if predicted is not None and expected:
        relative_change = abs(predicted - expected) / abs(expected)
        return float(relative_change <= tolerance)  # False for NaN, as in the original
    return float(prediction.lower() == target.lower())
