"""``meteor explain`` for Qwen2.5-VL and Qwen3-VL: which merged tokens ``meteor.compress`` keeps of an
image, drawn, with the scores as JSON beside the figure and the model's answer to the question.

    meteor explain --model Qwen2.5-VL-7B-Instruct --image photo.jpg --question "What is on the sign?" \\
        --keep 0.25 --out photo_selection.png          # also writes photo_selection.json
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from meteor.adapters.qwen_vl import compress, selection_report
from meteor.adapters.qwen_vl.report import draw_frames, selection_table

QWEN_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")


@dataclass
class QwenExplanation:
    image: str
    question: str
    answer: str
    keep: float | int
    frames: list[dict]
    """Per image frame: its merged grid, the kept raster indices, their share of the score, the scores."""
    figure: str
    scores: str


def is_qwen_vl_folder(folder: str | os.PathLike) -> bool:
    config = Path(folder) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") in QWEN_MODEL_TYPES


def explain_qwen(model, processor, image: Any, question: str, out: str | os.PathLike, keep: float | int = 0.25,
                 max_new_tokens: int = 64) -> QwenExplanation:
    """Compress ``model`` to ``keep`` (a share of each image's merged tokens, or a count), answer
    ``question`` about ``image`` greedily, draw what was kept to ``out`` (PNG) and write its numbers
    beside it (.json)."""
    from PIL import Image

    from meteor.processing.images import load_image

    picture = image if isinstance(image, Image.Image) else load_image(image)
    compress(model, keep=keep)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[picture], text=[text], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    frames = selection_report(model)
    answer = processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = Path(image).name if isinstance(image, (str, os.PathLike)) else "image"
    fig = draw_frames(frames, inputs["pixel_values"], inputs["image_grid_thw"], processor.image_processor,
                      title=f"{name}: keep {keep} of each image's merged tokens\nQ: {question.splitlines()[0]}")
    fig.savefig(out, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    scores = out.with_suffix(".json")
    result = QwenExplanation(str(image), question, answer, keep, selection_table(frames), str(out), str(scores))
    scores.write_text(json.dumps(asdict(result), indent=1) + "\n")
    return result


def format_qwen_explanation(result: QwenExplanation) -> str:
    lines = [f"answer: {result.answer}", "", f"{'image':<7} {'grid':>7} {'kept':>9} {'score kept':>11}"]
    for frame in result.frames:
        rows, cols = frame["grid"]
        lines.append(f"{frame['item'] + 1:<7} {rows}×{cols:<5} {len(frame['kept'])}/{rows * cols:<7} "
                     f"{frame['mass_kept']:>11.2f}")
    lines += ["", "kept: the merged tokens (one per 2×2 patches) the visual expert keeps, by the attention "
              "they receive in a full-attention block of the tower.", f"figure: {result.figure}",
              f"scores: {result.scores}"]
    return "\n".join(lines)


def run_explain_qwen(model_dir: str | os.PathLike, image: str, question: str, out: str, keep: float | int = 0.25,
                     max_new_tokens: int = 64) -> int:
    """``meteor explain`` on a Qwen-VL folder: load with transformers' Auto classes, explain, print."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    print(format_qwen_explanation(explain_qwen(model, processor, image, question, out, keep, max_new_tokens)))
    return 0


__all__ = ["QWEN_MODEL_TYPES", "QwenExplanation", "explain_qwen", "format_qwen_explanation", "is_qwen_vl_folder",
           "run_explain_qwen"]
