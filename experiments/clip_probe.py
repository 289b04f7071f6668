"""Research script: linear probes of the tiny demo CLIP's patch tokens (not part of the package).

    cd /work/main && python3 experiments/clip_probe.py --root /tmp/fulldemo [--train 400 --test 150] [--radius 1]

What it measures: every image of the demo world is cut into the views the Meteor model really
encodes (the processor's UHD slices plus the global view, `slice_image` with the same arguments as
`MeteorProcessor.prepare_image`), and each view goes through `VisionTower` with the feature layer the
model uses (`MeteorConfig().feature_layer`, the penultimate layer, CLS dropped) and, for comparison,
with layer 1 (`hidden_states[1]`). Each scene item's bbox centre is mapped into every view that holds
it (crop box -> resized slice, or whole image -> global view) and then to that view's patch grid. A
multinomial logistic regression (standardised features, full-batch LBFGS, small L2) is fitted per
task on train-split images and scored on test-split images, one example per (item, view): the patch
holding an object's centre -> its shape / colour / size; the patch holding a text's centre -> the
text's first character (classes seen in training). A fourth task labels every patch as text (its
centre inside a text's box), shape (centre inside an object's box) or background (touching no
item's box at all; partially covered patches are left out). The table gives held-out accuracy,
balanced accuracy (mean per-class recall), the majority-class accuracy and the example counts.
"""
import argparse, json, time
from collections import Counter
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from meteor.config import MeteorConfig
from meteor.images import load_image
from meteor.slicing import slice_image
from meteor.vision import VisionTower

TASKS = ("shape", "colour", "size", "patch kind", "first char", "word")


def scenes(root: Path, split: str, n: int) -> list[dict]:
    """The first n distinct scenes ("meta") of a split, from stage2.json or test.jsonl."""
    if split == "train":
        records = json.loads((root / "world" / "stage2.json").read_text())
    else:
        records = [json.loads(line) for line in (root / "world" / "test.jsonl").read_text().splitlines()]
    seen = {}
    for record in records:
        seen.setdefault(record["image"], record["meta"])
    return [dict(meta, image=image) for image, meta in list(seen.items())[:n]]


def view_frames(plan):
    """Per view (LLM order): (source box in image pixels, view size (w, h), patch grid (rows, cols))."""
    boxes = list(plan.crop_boxes) + [(0, 0, *plan.image_size)]
    return list(zip(boxes, plan.view_sizes, plan.view_patches))


def to_view(point, box, size):
    """Image-pixel point -> view pixels, or None if outside the view's source box."""
    (x, y), (l, t, r, b), (w, h) = point, box, size
    if not (l <= x < r and t <= y < b):
        return None
    return (x - l) * w / (r - l), (y - t) * h / (b - t)


def neighbourhood(tokens: torch.Tensor, rows: int, cols: int, patch: int, radius: int) -> torch.Tensor:
    """The (2·radius+1)² patch tokens around ``patch``, concatenated (zeros beyond the grid)."""
    grid = tokens.reshape(rows, cols, -1)
    i, j = divmod(patch, cols)
    parts = [grid[i + di, j + dj] if 0 <= i + di < rows and 0 <= j + dj < cols else torch.zeros(grid.shape[-1])
             for di in range(-radius, radius + 1) for dj in range(-radius, radius + 1)]
    return torch.cat(parts)


def collect(root: Path, metas: list[dict], towers: dict, max_slices: int, radius: int = 0):
    """Features per layer and (task, label) lists: {layer: {task: [feature rows]}}, {task: [labels]}."""
    feats = {name: {task: [] for task in TASKS} for name in towers}
    labels = {task: [] for task in TASKS}
    ref = next(iter(towers.values()))
    for meta in metas:
        sliced = slice_image(load_image(root / "world" / "images" / meta["image"]), max_slices=max_slices,
                             image_mean=ref.image_mean, image_std=ref.image_std,
                             patch_size=ref.patch_size, base_size=ref.image_size)
        views = sliced.views()
        outs = {name: tower.encode_views(views) for name, tower in towers.items()}
        p = ref.patch_size
        for v, (box, size, (rows, cols)) in enumerate(view_frames(sliced.plan)):
            picks = []  # (task, label, patch index)
            items = [("object", o) for o in meta["objects"]] + [("text", t) for t in meta["texts"]]
            for kind, item in items:
                l, t, r, b = item["bbox"]
                c = to_view(((l + r) / 2, (t + b) / 2), box, size)
                if c is None:
                    continue
                patch = int(c[1] // p) * cols + int(c[0] // p)
                if kind == "object":
                    picks += [(task, item[task], patch) for task in ("shape", "colour", "size")]
                else:
                    picks.append(("first char", item["text"][0], patch))
                    if item["kind"] == "word":
                        picks.append(("word", item["text"], patch))
            # Patch kind: every patch centre, against the item boxes mapped into this view.
            sx, sy = size[0] / (box[2] - box[0]), size[1] / (box[3] - box[1])
            mapped = [(kind, ((item["bbox"][0] - box[0]) * sx, (item["bbox"][1] - box[1]) * sy,
                              (item["bbox"][2] - box[0]) * sx, (item["bbox"][3] - box[1]) * sy))
                      for kind, item in items]
            for i in range(rows):
                for j in range(cols):
                    cx, cy = (j + 0.5) * p, (i + 0.5) * p
                    inside = [k for k, (l, t, r, b) in mapped if l <= cx < r and t <= cy < b]
                    touching = [k for k, (l, t, r, b) in mapped
                                if l < (j + 1) * p and r > j * p and t < (i + 1) * p and b > i * p]
                    label = inside[0] if inside else (None if touching else "background")
                    if label is not None:
                        picks.append(("patch kind", {"object": "shape"}.get(label, label), i * cols + j))
            for task, label, patch in picks:
                labels[task].append(label)
                for name in towers:
                    tokens = outs[name][v].patch_tokens[0].float()
                    feats[name][task].append(tokens[patch] if radius == 0 or task == "patch kind" else
                                             neighbourhood(tokens, rows, cols, patch, radius))
    return feats, labels


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, steps: int):
    """Multinomial logistic regression, full-batch LBFGS; returns a predict function."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    linear = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(z), y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda q: linear((q - mean) / std).argmax(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/fulldemo", help="a finished `meteor demo` folder")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--radius", type=int, default=0,
                    help="probe the (2r+1)² patches around the item's centre patch, concatenated "
                         "(the per-patch kind task keeps one patch)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    started = time.perf_counter()
    root, config = Path(args.root), MeteorConfig()
    tower = VisionTower.from_pretrained(root / "clip", feature_layer=config.feature_layer)
    towers = {f"layer {tower.feature_layer} (model's)": tower,
              "layer 1": VisionTower.from_model(tower.clip, feature_layer=1)}
    data = {split: collect(root, scenes(root, split, n), towers, config.max_slices, args.radius)
            for split, n in (("train", args.train), ("test", args.test))}
    print(f"tiny CLIP: {tower.config.num_hidden_layers} layers, width {tower.hidden_size}; "
          f"{args.train} train / {args.test} test images; features extracted in "
          f"{time.perf_counter() - started:.0f} s")
    print(f"{'task':<11} {'classes':>7} {'n train':>7} {'n test':>6} {'majority':>8}  "
          + "  ".join(f"{name + ' acc / bal':>24}" for name in towers))
    for task in TASKS:
        train_labels, test_labels = data["train"][1][task], data["test"][1][task]
        classes = sorted(set(train_labels))
        index = {c: k for k, c in enumerate(classes)}
        keep = [k for k, label in enumerate(test_labels) if label in index]
        y_train = torch.tensor([index[c] for c in train_labels])
        y_test = torch.tensor([index[test_labels[k]] for k in keep])
        majority = (y_test == Counter(y_train.tolist()).most_common(1)[0][0]).float().mean().item()
        cells = []
        for name in towers:
            x_train = torch.stack(data["train"][0][name][task])
            x_test = torch.stack([data["test"][0][name][task][k] for k in keep])
            pred = fit_probe(x_train, y_train, len(classes), args.weight_decay, args.steps)(x_test)
            acc = (pred == y_test).float().mean().item()
            recalls = [(pred[y_test == c] == c).float().mean().item() for c in y_test.unique()]
            cells.append(f"{acc:>15.3f} / {sum(recalls) / len(recalls):.3f}")
        print(f"{task:<11} {len(classes):>7} {len(y_train):>7} {len(y_test):>6} {majority:>8.3f}  "
              + "  ".join(f"{c:>24}" for c in cells))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
