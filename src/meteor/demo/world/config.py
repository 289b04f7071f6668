"""The synthetic world's vocabulary and its one configuration, ``WorldConfig``.

Everything a world depends on is a field here (or a named constant next to it), so a world folder's
``manifest.json`` says exactly how it was made, and an identical config reproduces it bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from meteor.model.configuration import ConfigError
from meteor.eval.world import QUESTION_TYPES   # the world benchmark's types, defined with its runner

FORMAT_VERSION = 2
"""Bumped whenever the generator's output changes for the same config; part of the reuse check."""

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}

COLOURS = {  # saturated and far apart in hue, so a 1-patch blob still names its colour
    "red": (214, 39, 40),
    "orange": (245, 133, 24),
    "yellow": (238, 203, 29),
    "green": (44, 160, 64),
    "blue": (36, 88, 214),
    "purple": (142, 58, 178),
}

SIZES = {"small": 0.16, "medium": 0.24, "large": 0.34}
"""Object side as a fraction of the image's short side; a ±8 % jitter keeps the classes apart."""
SIZE_JITTER = 0.08

WORDS = ("CAT", "DOG", "SUN", "MAP", "KEY", "BOX", "CUP", "HAT", "PEN", "BUS", "OWL", "FOX",
         "INK", "ZOO", "LAMP", "BIRD", "FISH", "MOON", "TREE", "BOOK", "STOP", "EXIT", "WAVE", "NEST")
"""The words drawn as text: upper case, no descenders, so a word's ink height is the font's cap
height (round digits overshoot it by a pixel or two from font size 36 up) and the legibility check
holds. None is a colour, shape or answer word."""



@dataclass(frozen=True)
class WorldConfig:
    """A deterministic synthetic visual-instruction world, sized for a vision tower's input."""

    seed: int = 0
    """Seed of every random choice; the same config always gives identical files and pixels."""

    n_train_images: int = 1000
    """Images of the train split (stage-1 captions and stage-2 questions)."""

    n_test_images: int = 200
    """Images of the test split (test.jsonl); never shared with train."""

    base_size: int = 112
    """Side of the vision tower's input view in pixels (336 for CLIP ViT-L/14-336). Image sizes
    are drawn relative to it, so ``plan_slices`` gives the slice counts of ``slice_mix``."""

    patch_size: int = 14
    """Encoder patch side in pixels; text is drawn at least one patch tall at slice resolution."""

    max_slices: int = 6
    """Slice cap passed to ``plan_slices`` (the paper: 6)."""

    slice_mix: tuple[int, ...] | None = None
    """Slice counts to aim for, drawn uniformly from this tuple (repeat a count to weight it):
    0 is an unsliced image (global view only), 2..max_slices a sliced one (1 is impossible: a
    sliced image has at least two cells). None means every count: (0, 2, 3, ..., max_slices).
    Counts are aimed at by choosing the grid and cell sizes, then checked with ``plan_slices``."""

    min_objects: int = 2
    """Fewest coloured shapes per image."""

    max_objects: int = 6
    """Most coloured shapes per image (fewer if they do not fit without overlap)."""

    min_texts: int = 1
    """Fewest text items (a word or a number) per image."""

    max_texts: int = 2
    """Most text items per image."""

    number_digits: int = 3
    """Numbers drawn as text have 1 to this many digits, as many of each length (3: 0-999)."""

    text_height_patches: tuple[float, float] = (1.0, 1.5)
    """Range of the text's ink height, in patches at the resolution of the view that holds it (its
    slice, or the global view of an unsliced image). ≥ 1 keeps it legible there; in the global view
    of a sliced image it shrinks below a patch, which is the point of slicing."""

    text_stroke: float = 0.0
    """Outline drawn around each glyph in the text's colour, as a fraction of its cap height and
    rounded to whole pixels (0: the font's regular weight; 0.05: about one pixel at 1.5-2 patches,
    a bold weight). Thin grey strokes are what a tiny CLIP reads worst (docs/demo-findings.md)."""

    questions_per_image: int = 4
    """Questions per image, in both splits (train: turns of one record; test: one line each)."""

    question_types: tuple[str, ...] = QUESTION_TYPES
    """Question types to ask, a subset of ``QUESTION_TYPES``; kept balanced across each split."""

    def __post_init__(self) -> None:
        for name in ("seed", "n_train_images", "n_test_images", "base_size", "patch_size",
                     "max_slices", "min_objects", "max_objects", "min_texts", "max_texts",
                     "number_digits", "questions_per_image"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool),
                   f"WorldConfig.{name} must be an integer, got {value!r}")
        _check(self.seed >= 0, f"WorldConfig.seed must be ≥ 0, got {self.seed}")
        _check(self.n_train_images >= 1 and self.n_test_images >= 1,
               f"a world needs at least one image per split, got n_train_images={self.n_train_images}, "
               f"n_test_images={self.n_test_images}")
        _check(self.patch_size >= 1 and self.base_size % self.patch_size == 0,
               f"base_size {self.base_size} must be a positive multiple of patch_size {self.patch_size} "
               "(e.g. 112 and 14)")
        _check(self.base_size // self.patch_size >= 4,
               f"base_size {self.base_size} is only {self.base_size // self.patch_size} patches of "
               f"{self.patch_size} px: text one patch tall would not fit; use at least 4 patches (e.g. 56)")
        _check(self.max_slices >= 1, f"max_slices must be ≥ 1, got {self.max_slices}")
        if self.slice_mix is not None:
            object.__setattr__(self, "slice_mix", tuple(self.slice_mix))
            _check(len(self.slice_mix) > 0, "slice_mix must not be empty; use None for every count")
            for count in self.slice_mix:
                _check(isinstance(count, int) and (count == 0 or 2 <= count <= self.max_slices),
                       f"slice_mix holds {count!r}: each entry must be 0 (unsliced) or 2..max_slices="
                       f"{self.max_slices} (a sliced image always has at least two slices)")
        _check(1 <= self.min_objects <= self.max_objects <= 12,
               f"need 1 ≤ min_objects ≤ max_objects ≤ 12, got {self.min_objects}..{self.max_objects}")
        _check(0 <= self.min_texts <= self.max_texts <= 4,
               f"need 0 ≤ min_texts ≤ max_texts ≤ 4, got {self.min_texts}..{self.max_texts}")
        _check(1 <= self.number_digits <= 4,
               f"number_digits must lie in 1..4 (numbers of up to that many digits), got {self.number_digits}")
        heights = tuple(self.text_height_patches)
        _check(len(heights) == 2 and all(isinstance(v, (int, float)) for v in heights),
               f"text_height_patches must be two numbers (low, high), got {self.text_height_patches!r}")
        low, high = float(heights[0]), float(heights[1])
        object.__setattr__(self, "text_height_patches", (low, high))
        _check(math.isfinite(low) and math.isfinite(high) and 0.5 <= low <= high <= 4.0,
               f"text_height_patches must be (low, high) with 0.5 ≤ low ≤ high ≤ 4, got {(low, high)}; "
               "(1.0, 1.5) keeps text legible in its slice without making it salient")
        _check(isinstance(self.text_stroke, (int, float)) and 0.0 <= self.text_stroke <= 0.2,
               f"text_stroke must be a fraction of the cap height in 0..0.2, got {self.text_stroke!r}")
        object.__setattr__(self, "text_stroke", float(self.text_stroke))
        object.__setattr__(self, "question_types", tuple(self.question_types))
        unknown = [t for t in self.question_types if t not in QUESTION_TYPES]
        _check(not unknown and len(self.question_types) > 0
               and len(set(self.question_types)) == len(self.question_types),
               f"question_types must be distinct entries of {QUESTION_TYPES}, got {self.question_types}")
        _check(self.max_texts >= 1 or "read" not in self.question_types,
               "question type 'read' needs text in the images: set max_texts ≥ 1 or drop 'read'")
        _check(1 <= self.questions_per_image <= 2 * len(QUESTION_TYPES),
               f"questions_per_image must lie in 1..{2 * len(QUESTION_TYPES)}, "
               f"got {self.questions_per_image}")

    @property
    def slice_counts(self) -> tuple[int, ...]:
        """The slice counts images aim for (``slice_mix`` resolved)."""
        if self.slice_mix is not None:
            return self.slice_mix
        return (0, *range(2, self.max_slices + 1))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists), as stored in ``manifest.json``."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorldConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown WorldConfig option(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
