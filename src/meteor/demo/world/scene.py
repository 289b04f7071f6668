"""What is in one image: its size and slice plan, background, shapes and text, as plain data.

``make_scene`` draws a scene from the config and the image's (split, index) alone, so every image
is reproducible on its own; ``render.render_scene`` turns a scene into pixels. Boxes are Pillow's
``(left, top, right, bottom)`` with right/bottom exclusive, in the original image's pixels.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from meteor.processing.slicing import SlicePlan, plan_slices

from meteor.demo.world.config import COLOURS, SHAPES, SIZE_JITTER, SIZES, WORDS, WorldConfig
from meteor.demo.world.fonts import Box, cap_height, font_size_for_cap_height, text_ink_box

SPLITS = ("train", "test")
BACKGROUNDS = ("plain", "noise", "gradient")
UNSLICED_AREA = (0.6, 1.0)
"""Area of an unsliced image as a fraction of base_size² (above 1 it would be sliced)."""
UNSLICED_MAX_ASPECT = 1.6
CELL_MAX_ASPECT = 1.25
"""Aspect range (1/x..x) of one slice cell: cells stay near square, as LLaVA-UHD's grid prefers."""
TEXT_CONTRAST = (70, 100)
"""Grey levels between the background and the text: legible, but far less salient than a shape."""
GAP = 2
"""Minimum pixels between any two items (shapes, text), and between text and a slice edge."""
PLACEMENT_TRIES = 60
"""Positions tried per item before it is left out."""
LAYOUT_TRIES = 20
"""Whole layouts tried per image before giving up (only very crowded configs get there)."""


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    bbox: Box

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "bbox": list(self.bbox)}


@dataclass(frozen=True)
class SceneText:
    text: str
    kind: str
    """"word" or "number"."""
    bbox: Box
    """The ink's box as FreeType measures it: tight vertically (the cap height), and at most a
    pixel of side bearing wider than the glyphs horizontally."""
    font_size: int
    view: int
    """Index of the slice (crop box, row-major) that holds the whole text; -1 for an unsliced
    image, whose only view is the global one."""
    view_height: float
    """Ink height in pixels once that view is resized for the encoder (≥ patch_size)."""
    stroke: int = 0
    """Outline width in pixels around the glyphs (``WorldConfig.text_stroke``); inside ``bbox``."""

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "kind": self.kind, "bbox": list(self.bbox), "font_size": self.font_size,
                "stroke": self.stroke, "view": self.view, "view_height": round(self.view_height, 3)}


@dataclass(frozen=True)
class Scene:
    image_id: str
    split: str
    index: int
    width: int
    height: int
    grid: tuple[int, int]
    """(rows, cols) of ``plan_slices`` for this image; (0, 0) when unsliced."""
    background: str
    background_rgb: tuple[int, int, int]
    text_rgb: tuple[int, int, int]
    texture_seed: int
    objects: tuple[SceneObject, ...]
    texts: tuple[SceneText, ...]

    @property
    def num_slices(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def image_path(self) -> str:
        """Path relative to the world's image folder."""
        return f"{self.split}/{self.index:06d}.png"

    def to_meta(self) -> dict[str, Any]:
        """The scene as stored in every record's ``"meta"``: enough to recompute any answer."""
        return {"image_id": self.image_id, "size": [self.width, self.height], "num_slices": self.num_slices,
                "grid": list(self.grid), "background": self.background,
                "objects": [o.to_dict() for o in self.objects], "texts": [t.to_dict() for t in self.texts]}


def image_id(split: str, index: int) -> str:
    """Train and test ids live in separate spaces ("train-000007" never equals "test-000007")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"{split}-{index:06d}"


def make_scene(config: WorldConfig, split: str, index: int) -> Scene:
    """The scene of image ``index`` of ``split``: a pure function of (config, split, index)."""
    rng = random.Random(f"meteor.world/{config.seed}/{image_id(split, index)}/scene")
    width, height, plan = _image_size(rng, config)
    background = rng.choice(BACKGROUNDS)
    grey = rng.randint(200, 235)
    red, green, blue = (min(255, grey + rng.randint(-6, 6)) for _ in range(3))  # a faint tint
    contrast = rng.randint(*TEXT_CONTRAST)
    background_rgb, text_rgb = (red, green, blue), (red - contrast, green - contrast, blue - contrast)
    for _ in range(LAYOUT_TRIES):  # a crowded draw is redrawn, so min_objects / min_texts hold
        texts = _place_texts(rng, config, plan)
        objects = _place_objects(rng, config, width, height, [t.bbox for t in texts])
        if len(texts) >= config.min_texts and len(objects) >= config.min_objects:
            break
    else:
        raise RuntimeError(f"could not fit {config.min_objects} shapes and {config.min_texts} texts without "
                           f"overlap in the {width}×{height} image {image_id(split, index)}; lower min_objects "
                           f"or min_texts, or raise base_size (now {config.base_size})")
    return Scene(image_id=image_id(split, index), split=split, index=index, width=width, height=height,
                 grid=plan.grid, background=background, background_rgb=background_rgb,
                 text_rgb=text_rgb, texture_seed=rng.getrandbits(63), objects=tuple(objects),
                 texts=tuple(texts))


# --- size and slicing ---------------------------------------------------------------------------------

def slice_grids(count: int) -> list[tuple[int, int]]:
    """The most nearly square (rows, cols) grids of ``count`` cells, both orientations."""
    pairs = [(rows, count // rows) for rows in range(1, count + 1) if count % rows == 0]
    squareness = min(max(r, c) / min(r, c) for r, c in pairs)
    return [(r, c) for r, c in pairs if max(r, c) / min(r, c) == squareness]


def _image_size(rng: random.Random, config: WorldConfig) -> tuple[int, int, SlicePlan]:
    """Aim at a slice count from ``slice_mix``: pick its grid, cells of about base_size² (so the
    ideal count is the target) and near-square, then check with ``plan_slices``; redraw the
    geometry (not the target) if the planner disagrees, so the mix is what the config says."""
    base = config.base_size
    target = rng.choice(config.slice_counts)
    for _ in range(50):
        if target == 0:
            area = base * base * rng.uniform(*UNSLICED_AREA)
            aspect = math.exp(rng.uniform(-1.0, 1.0) * math.log(UNSLICED_MAX_ASPECT))
            width, height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        else:
            rows, cols = rng.choice(slice_grids(target))
            fill = rng.uniform(max(0.55, (target - 1) / target + 0.02), 1.0)  # ideal count = target
            aspect = math.exp(rng.uniform(-1.0, 1.0) * math.log(CELL_MAX_ASPECT))
            width = round(cols * base * math.sqrt(fill * aspect))
            height = round(rows * base * math.sqrt(fill / aspect))
        plan = plan_slices(width, height, config.max_slices, config.patch_size, base)
        if plan.num_slices == target:
            return width, height, plan
    return width, height, plan  # rare: keep the last draw; the manifest's histogram shows it


# --- placement --------------------------------------------------------------------------------------

def _place_texts(rng: random.Random, config: WorldConfig, plan: SlicePlan) -> list[SceneText]:
    """Words and numbers, each inside one slice (a text cut by a slice edge would be legible in
    neither half), sized to ``text_height_patches`` at that slice's encoder resolution."""
    width, height = plan.image_size
    regions = list(plan.crop_boxes) or [(0, 0, width, height)]
    texts: list[SceneText] = []
    kinds = [rng.choice(("word", "number")) for _ in range(rng.randint(config.min_texts, config.max_texts))]
    for kind in kinds:
        drawn = {t.text for t in texts}  # no string twice, so "the 7" always names one text
        if kind == "word":
            string = rng.choice([w for w in WORDS if w not in drawn])
        else:
            string = _number(rng, config.number_digits)
            while string in drawn:
                string = _number(rng, config.number_digits)
        view = rng.randrange(len(regions)) if plan.is_sliced else -1
        left, top, right, bottom = regions[max(view, 0)]
        view_h = plan.slice_size[1] if plan.is_sliced else plan.global_size[1]  # type: ignore[index]
        scale = view_h / (bottom - top)  # encoder pixels per image pixel, vertically
        patches = rng.uniform(*config.text_height_patches)
        for attempt in range(PLACEMENT_TRIES):
            if attempt == PLACEMENT_TRIES // 2:  # crowded or narrow: fall back to the smallest size
                patches = config.text_height_patches[0]
            size = font_size_for_cap_height(patches * config.patch_size / scale)
            stroke = round(config.text_stroke * cap_height(size))
            ink = text_ink_box(string, size, stroke)
            ink_w, ink_h = ink[2] - ink[0], ink[3] - ink[1]
            if ink_w > right - left - 2 * GAP or ink_h > bottom - top - 2 * GAP:
                continue
            x = rng.randint(left + GAP, right - GAP - ink_w)
            y = rng.randint(top + GAP, bottom - GAP - ink_h)
            box = (x, y, x + ink_w, y + ink_h)
            if any(_overlaps(box, t.bbox, GAP) for t in texts):
                continue
            # Round digits overshoot the cap height by a pixel or two from font size 36 up: the
            # box is the ink's, so it stays exact and the text is at least the height asked for.
            assert ink_h >= cap_height(size), f"{string!r} is shorter than the cap height"
            texts.append(SceneText(text=string, kind=kind, bbox=box, font_size=size, view=view,
                                   view_height=ink_h * scale, stroke=stroke))
            break
    return texts


def _number(rng: random.Random, max_digits: int) -> str:
    digits = rng.randint(1, max_digits)  # as many 1-digit as 3-digit numbers
    return str(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1))


def _place_objects(rng: random.Random, config: WorldConfig, width: int, height: int,
                   taken: list[Box]) -> list[SceneObject]:
    """Shapes drawn from a few shapes and colours per image, so counts above one and near-miss
    absent objects (same shape, other colour) are common; largest first, never overlapping."""
    shape_pool = rng.sample(SHAPES, rng.randint(2, 4))
    colour_pool = rng.sample(sorted(COLOURS), rng.randint(2, 4))
    count = rng.randint(config.min_objects, config.max_objects)
    wanted = [(rng.choice(shape_pool), rng.choice(colour_pool), rng.choice(list(SIZES)))
              for _ in range(count)]
    wanted.sort(key=lambda item: -SIZES[item[2]])
    short = min(width, height)
    boxes = list(taken)
    objects = []
    for shape, colour, size in wanted:
        side = max(4, round(short * SIZES[size] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)))
        box_w = max(3, round(side * 0.75)) if shape == "diamond" else side
        for _ in range(PLACEMENT_TRIES):
            x = rng.randint(0, width - box_w)
            y = rng.randint(0, height - side)
            box = (x, y, x + box_w, y + side)
            if not any(_overlaps(box, other, GAP) for other in boxes):
                boxes.append(box)
                objects.append(SceneObject(shape=shape, colour=colour, size=size, bbox=box))
                break
    return objects


def _overlaps(a: Box, b: Box, gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap
