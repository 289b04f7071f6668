"""``meteor explain``: what the model looked at in one's own image. The paper's Figure 4 (the patches
the visual expert, the native expert and their aggregate keep on every view, ``meteor.serve.visualize``),
the per-view scores as a table and a JSON file, and the model's answer to the question.

    meteor explain --model runs/stage2/model --image photo.jpg --question "What is on the sign?" \\
        --out photo_selection.png          # also writes photo_selection.json

With the paper's instruction token (learnt, the same for every image) the selection depends on the
image alone, so the figure is the same for every question; with ``instruction="question"`` it is the
selection made for the question asked. The question is answered beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from meteor.serve.streaming import AnswerStream, Conversation, generate_streamed
from meteor.serve.visualize import expert_choices, selection_figure


@dataclass(frozen=True)
class ViewReport:
    """One view's selection in numbers."""

    view: str
    """"slice 1" … (row by row), or "global"."""
    grid: tuple[int, int]
    """Patch grid (rows, cols)."""
    region: tuple[int, int, int, int]
    """The part of the original image the view shows (left, upper, right, lower) in pixels."""
    kept: list[int]
    """Raster indices of the kept patches (the aggregate's Top-K′)."""
    agree_visual: int | None
    """How many kept patches the visual expert alone would also keep (of K′)."""
    agree_native: int | None
    """How many kept patches the native expert alone would also keep (of K′)."""
    aggregate_mass_kept: float | None
    """The kept patches' share of the aggregate score (AS sums to 1 over a view)."""
    visual_scores: list[float] | None
    native_scores: list[float] | None
    aggregate_scores: list[float] | None


@dataclass(frozen=True)
class Explanation:
    image: str
    question: str
    answer: str
    tokens_per_slice: int | None
    """K′ used (the model's K when not given)."""
    views: list[ViewReport]
    figure: str
    scores: str
    """The JSON file holding this explanation."""


def view_reports(image, selections) -> list[ViewReport]:
    """The numbers of every view (``image``: the SlicedImage the selections are of)."""
    reports = []
    regions = image.plan.view_regions
    for selection in selections:
        visual, native, kept = expert_choices(selection)

        def agree(chosen):
            return None if chosen is None or kept is None else len(set(chosen.tolist()) & set(kept.tolist()))

        def listed(scores):
            return None if scores is None else [round(float(v), 6) for v in scores]

        aggregate = selection.aggregate_scores
        reports.append(ViewReport(
            view="global" if selection.is_global else f"slice {selection.view_index + 1}",
            grid=tuple(selection.grid), region=tuple(regions[selection.view_index]),
            kept=[] if kept is None else kept.tolist(), agree_visual=agree(visual), agree_native=agree(native),
            aggregate_mass_kept=None if aggregate is None or kept is None
            else round(float(aggregate[kept].sum() / aggregate.sum()), 4),
            visual_scores=listed(selection.visual_scores), native_scores=listed(selection.native_scores),
            aggregate_scores=listed(aggregate)))
    return reports


def explain(model, processor, image: str | os.PathLike, question: str, out: str | os.PathLike,
            tokens_per_slice: int | None = None, max_new_tokens: int = 64) -> Explanation:
    """Draw ``out`` (PNG), write its numbers beside it (``out`` with ``.json``) and answer
    ``question`` about ``image`` greedily with K′ = ``tokens_per_slice`` (default: the model's K)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sliced = processor.prepare_image(image)
    name = Path(image).name if isinstance(image, (str, os.PathLike)) else "image"
    conversation = Conversation()
    conversation.ask(question, [sliced], processor.config.image_token)
    prompt_ids = conversation.prompt_ids(processor, tokens_per_slice)
    selections = selection_figure(model, processor, sliced, question, out, tokens_per_slice, name, prompt_ids)
    row = AnswerStream(processor.tokenizer, max_new_tokens)
    with torch.no_grad():
        generate_streamed(model, processor, [(prompt_ids, [sliced])], [row], tokens_per_slice)
    k = processor.tokens_per_slice(tokens_per_slice, [sliced])
    scores = out.with_suffix(".json")
    result = Explanation(str(image), question, row.text, k, view_reports(sliced, selections), str(out), str(scores))
    scores.write_text(json.dumps(asdict(result), indent=1) + "\n")
    return result


def format_explanation(result: Explanation) -> str:
    """The answer and one line per view, for the terminal."""
    def of(value: Any, total: int) -> str:
        return "-" if value is None else f"{value}/{total}"

    lines = [f"answer: {result.answer}", "",
             f"{'view':<9} {'grid':>5} {'region (px)':>22} {'kept':>7} {'=visual':>8} {'=native':>8} {'AS kept':>8}"]
    for view in result.views:
        k = len(view.kept)
        patches = view.grid[0] * view.grid[1]
        mass = "-" if view.aggregate_mass_kept is None else f"{view.aggregate_mass_kept:.2f}"
        lines.append(f"{view.view:<9} {view.grid[0]}×{view.grid[1]:<3} {str(view.region):>22} "
                     f"{of(k, patches):>7} {of(view.agree_visual, k):>8} {of(view.agree_native, k):>8} {mass:>8}")
    lines += ["", "kept: the aggregate's Top-K′ (what the LLM sees); =visual / =native: how many of them the "
              "visual (CLS attention) / native (INS') expert alone would keep; AS kept: their share of the "
              "aggregate score.", f"figure: {result.figure}", f"scores: {result.scores}"]
    return "\n".join(lines)


def run_explain(model_dir: str | os.PathLike, image: str, question: str, out: str,
                tokens_per_slice: int | None = None, max_new_tokens: int = 64) -> int:
    """``meteor explain``: load, explain, print."""
    from transformers.utils import logging as hf_logging

    from meteor.pretrained import load_pretrained

    hf_logging.disable_progress_bar()
    model, processor = load_pretrained(model_dir)
    print(format_explanation(explain(model, processor, image, question, out, tokens_per_slice, max_new_tokens)))
    return 0
