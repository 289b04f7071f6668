"""GQA accuracy: exact match after the light clean-up of LLaVA's GQA pipeline."""

from __future__ import annotations

from meteor.eval.metrics._checks import require_text


def exact_match(prediction: str, answer: str) -> float:
    """1.0 if the prediction equals the GQA answer as LLaVA's pipeline compares them, else 0.0.

    The pipeline has three steps, reproduced here in order:

    1. ``llava/eval/model_vqa_loader.py`` strips the generated text;
    2. ``scripts/convert_gqa_for_eval.py`` writes ``text.rstrip('.').lower()`` as the prediction
       (every trailing period goes, nothing else: "yes ." keeps its space and fails);
    3. GQA's official ``eval.py`` (testdev_balanced) scores ``predicted == gold``, raw.

    The gold answer is not touched, as in ``eval.py``; GQA's answers are already lower-case words.
    """
    require_text("prediction", prediction)
    require_text("answer", answer)
    return float(prediction.strip().rstrip(".").lower() == answer)
