"""What the kept patches land on: for the questions of a world's test split that name an object or a
text, the share of the named targets that the kept patches touch, per expert, and how much the kept
set changes from one question to another about the same image.

A target is an object whose shape and colour match the question's query (colour, count with a
non-zero answer, existence, multiple choice), or the text a reading question's answer is. A kept
patch touches a target when its centre, mapped back to the original image through its view's
region, lies inside the target's box; a target counts as found when any view keeps such a patch.
For every model, three selections of the same K per view are scored: the aggregate (what the model
keeps), the visual expert's Top-K alone and the native expert's Top-K alone. Between questions:
the mean Jaccard index of the kept sets of two questions about one image, view by view (1.0 for an
instruction token that ignores the question).

    python benchmarks/selection_targets.py --out meteor-ablate --models single_turn_5pct question_5pct \\
        [--images 60] [--json selection.json]

``--out`` is a folder written by ``meteor ablate`` or ``meteor demo`` (its ``world/`` and
``runs/<model>/stage2/model``); ``--models`` may also be model folders.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

EXPERTS = ("kept", "visual", "native")


def targets(record: dict[str, Any]) -> list[tuple[float, float, float, float]]:
    """The boxes (left, upper, right, lower; original pixels) of what ``record``'s question names."""
    meta, query, kind = record["meta"], record.get("query") or {}, record["question_type"]
    if kind in ("colour", "count", "exist", "choice"):
        wanted = {key: value for key, value in query.items() if key in ("shape", "colour")}
        return [tuple(o["bbox"]) for o in meta["objects"] if all(o.get(k) == v for k, v in wanted.items())]
    if kind == "read":
        return [tuple(t["bbox"]) for t in meta["texts"] if t["text"] == record["answer"]]
    return []


def found(boxes: Sequence[Sequence[float]], regions: Sequence[Sequence[float]],
          chosen: Sequence[tuple[int, tuple[int, int], Sequence[int]]]) -> float:
    """Share of ``boxes`` that a chosen patch touches; ``chosen``: (view index, grid, raster indices)
    per view, ``regions``: each view's part of the original image (left, upper, right, lower)."""
    touched = set()
    for view, (rows, cols), indices in chosen:
        left, upper, right, lower = regions[view]
        for index in indices:
            y, x = divmod(int(index), cols)
            cx = left + (x + 0.5) * (right - left) / cols
            cy = upper + (y + 0.5) * (lower - upper) / rows
            touched.update(b for b, (x0, y0, x1, y1) in enumerate(boxes) if x0 <= cx <= x1 and y0 <= cy <= y1)
    return len(touched) / len(boxes)


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    a, b = set(map(int, a)), set(map(int, b))
    return len(a & b) / len(a | b) if a | b else 1.0


def measure(model, processor, records: Sequence[dict[str, Any]], image_folder: Path) -> dict[str, Any]:
    """The figures of one model over ``records`` (grouped by image)."""
    from PIL import Image

    from meteor.serve.visualize import expert_choices, image_selections

    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_image[record["image"]].append(record)
    shares: dict[str, dict[str, list[float]]] = {e: defaultdict(list) for e in EXPERTS}
    between: list[float] = []
    model.eval()
    with torch.no_grad():
        for name, questions in by_image.items():
            image = Image.open(image_folder / name).convert("RGB")
            kept_per_question = []
            for record in questions:
                batch = processor.prompts([record["question"]], [image])
                selections = image_selections(model, processor, batch.images, batch.input_ids[0].tolist())
                if any(s.indices is None for s in selections):
                    raise ValueError("this model's projector keeps no patches (a mixing projector): nothing to score")
                choices = [(s, expert_choices(s)) for s in selections]
                kept_per_question.append([kept.tolist() for _, (_, _, kept) in choices])
                boxes = targets(record)
                if not boxes:
                    continue
                regions = batch.images[0].plan.view_regions
                for position, expert in enumerate(("visual", "native", "kept")):
                    chosen = [(s.view_index, tuple(s.grid), picks[position].tolist()) for s, picks in choices
                              if picks[position] is not None]
                    if chosen:
                        share = found(boxes, regions, chosen)
                        shares[expert][record["question_type"]].append(share)
                        shares[expert]["all"].append(share)
            for first, second in itertools.combinations(kept_per_question, 2):
                between += [jaccard(a, b) for a, b in zip(first, second)]
    mean = lambda values: round(sum(values) / len(values), 3) if values else None   # noqa: E731
    return {"targets_found": {e: {t: {"share": mean(v), "questions": len(v)} for t, v in by_type.items()}
                              for e, by_type in shares.items() if by_type},
            "kept_jaccard_between_questions": mean(between), "view_pairs": len(between),
            "identical_kept_share": mean([float(value == 1.0) for value in between])}


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").exists() or (folder / "meteor_config.json").exists()


def _model_folder(out: Path, name: str) -> Path:
    folder = Path(name)
    return folder if _is_model(folder) else out / "runs" / name / "stage2" / "model"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a meteor ablate / meteor demo folder (its world/ and runs/)")
    parser.add_argument("--models", nargs="+", required=True, help="run names under OUT/runs, or model folders")
    parser.add_argument("--images", type=int, default=60, help="first test images used (default 60)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    from meteor.pretrained import load_pretrained

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    test = out / "world" / "test.jsonl"
    if not test.exists():
        parser.error(f"{test} not found: --out must be a folder written by meteor ablate or meteor demo")
    records = [json.loads(line) for line in test.read_text().splitlines() if line.strip()]
    images = list(dict.fromkeys(r["image"] for r in records))[:args.images]
    records = [r for r in records if r["image"] in set(images)]
    results = {}
    for name in args.models:
        folder = _model_folder(out, name)
        if not _is_model(folder):
            parser.error(f"no model {name!r}: neither a LLaVA-Meteor folder (config.json) nor a run {folder}")
        model, processor = load_pretrained(folder)
        results[name] = measure(model, processor, records, out / "world" / "images")
        figures = results[name]
        line = ", ".join(f"{e} {figures['targets_found'][e]['all']['share']:.3f}" for e in EXPERTS
                         if e in figures["targets_found"])
        print(f"{name}: targets found ({len(images)} images, {figures['targets_found']['kept']['all']['questions']} "
              f"questions): {line}; kept-set Jaccard between questions {figures['kept_jaccard_between_questions']}, "
              f"identical in {figures['identical_kept_share']} of view pairs", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
