"""LLaVA-UHD image slicing (docs/design.md, "Slicing"): where to cut an image, the size of every view,
and how the views' tokens are laid out in the prompt.

An image of W×H pixels becomes N ≤ ``max_slices`` slices (the equal cells of a ``rows × cols``
grid) plus one global view of the whole image. Every view is resized to about ``base_size²``
pixels with its aspect ratio kept and both sides multiples of ``patch_size``, so the encoder sees
at most ``(base_size / patch_size)²`` patches per view (576 for CLIP ViT-L/14-336) and no padding.

Conventions (Pillow's): sizes are ``(width, height)``; crop boxes are ``(left, upper, right,
lower)`` with right/lower exclusive; grids of cells or of patches are ``(rows, cols)``. The LLM sees
the views in one fixed order everywhere: slices row by row, left to right, then the global view.

``plan_slices`` and ``layout_tokens`` are pure functions of integers; ``slice_image`` is the only
function here that touches pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image

from meteor.processing.images import ImageSource, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel RGB mean of OpenAI CLIP's preprocessing (``CLIPImageProcessor.image_mean``)."""

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel RGB standard deviation of OpenAI CLIP's preprocessing (``image_std``)."""

Box = tuple[int, int, int, int]
TokensPerView = Union[int, Sequence[int], Callable[[tuple[int, int]], int]]


@dataclass(frozen=True)
class SlicePlan:
    """Where an image is cut and what size each view is resized to; built by ``plan_slices``.

    An image small enough for one view (ideal slice count N ≤ 1) is *unsliced*: ``grid`` is
    ``(0, 0)``, ``num_slices`` is 0, ``slice_size``/``slice_patches`` are ``None`` and
    ``crop_boxes`` is empty. The global view exists for every image, so the LLM always gets
    ``num_slices + 1`` views.
    """

    image_size: tuple[int, int]
    """(width, height) of the original image in pixels."""

    grid: tuple[int, int]
    """(rows, cols) = (n, m) of the slice grid; (0, 0) when unsliced."""

    slice_size: tuple[int, int] | None
    """(width, height) every slice is resized to (multiples of ``patch_size``); None if unsliced."""

    slice_patches: tuple[int, int] | None
    """(rows, cols) of encoder patches in each slice; None if unsliced."""

    global_size: tuple[int, int]
    """(width, height) the whole image is resized to for the global view."""

    global_patches: tuple[int, int]
    """(rows, cols) of encoder patches in the global view."""

    crop_boxes: tuple[Box, ...]
    """(left, upper, right, lower) of each cell in the original image, row-major; they tile the
    image exactly (cells differ by at most one pixel when W or H is not divisible)."""

    patch_size: int
    """Encoder patch side in pixels (14 for CLIP ViT-L/14)."""

    base_size: int
    """Encoder's native input side in pixels (336 for CLIP ViT-L/14-336)."""

    @property
    def num_slices(self) -> int:
        """N: number of slices (rows · cols); 0 for an unsliced image."""
        return self.grid[0] * self.grid[1]

    @property
    def num_views(self) -> int:
        """N + 1: the slices and the global view."""
        return self.num_slices + 1

    @property
    def is_sliced(self) -> bool:
        return self.num_slices > 0

    @property
    def view_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every view in the LLM's order: slices row by row, then global."""
        return [self.slice_size] * self.num_slices + [self.global_size]  # type: ignore[list-item]

    @property
    def view_patches(self) -> list[tuple[int, int]]:
        """(rows, cols) of patches of every view in the LLM's order: slices, then global."""
        return [self.slice_patches] * self.num_slices + [self.global_patches]  # type: ignore[list-item]

    @property
    def view_regions(self) -> list[Box]:
        """The part of the original image every view shows, in the LLM's order: each slice's crop
        box, then the whole image for the global view."""
        return list(self.crop_boxes) + [(0, 0, *self.image_size)]


# --- geometry ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchOverlap:
    """How much of each patch of one view a box of the original image covers (``patch_overlap``)."""

    areas: torch.Tensor
    """(rows, cols) float64: the area of the box inside each patch, in original-image pixels²."""
    patch_step: tuple[float, float]
    """(x, y) side of one patch in original-image pixels (its area is their product)."""

    def covered(self, fraction: float) -> torch.Tensor:
        """(rows, cols) bool: the patches of which at least ``fraction`` of the area is inside."""
        step_x, step_y = self.patch_step
        return (self.areas > 0) & (self.areas >= fraction * step_x * step_y)

    def weights(self) -> torch.Tensor:
        """(rows, cols) float64: each patch's share of the box's area (summing to 1; all zeros
        when the box misses the view)."""
        total = self.areas.sum()
        return self.areas / total if total > 0 else self.areas


def patch_overlap(box: Box, region: Box, view_size: tuple[int, int], patch_size: int) -> PatchOverlap:
    """Which patches of a view a box covers: the view shows ``region`` of the original image
    (a slice's crop box, or the whole image for the global view) resized to ``view_size`` = (width,
    height) pixels and cut into ``patch_size`` patches; ``box`` = (left, top, right, bottom) is in
    original-image pixels."""
    left, top, right, bottom = box
    width, height = view_size
    step_x = (region[2] - region[0]) / width * patch_size
    step_y = (region[3] - region[1]) / height * patch_size

    def overlaps(start: float, count: int, step: float, low: float, high: float) -> torch.Tensor:
        starts = start + torch.arange(count, dtype=torch.float64) * step      # patch edges, original px
        return (torch.clamp(starts + step, max=high) - torch.clamp(starts, min=low)).clamp(min=0)

    across = overlaps(region[0], width // patch_size, step_x, left, right)    # (cols,)
    down = overlaps(region[1], height // patch_size, step_y, top, bottom)     # (rows,)
    return PatchOverlap(down[:, None] * across[None, :], (step_x, step_y))



def view_size(width: float, height: float, patch_size: int = 14, base_size: int = 336) -> tuple[int, int]:
    """(width, height) in pixels that a view of ``width × height`` (a cell may be fractional) is
    resized to before encoding.

    Rule: scale to exactly ``base_size²`` area with the aspect ratio kept, express both sides in
    patches, round each to the nearest integer (halves up; LLaVA-Meteor's "7-8 px adjustments"),
    clamp each to [1, G²] patches where G² = (base/patch)² is the budget. If the product then
    exceeds G², shrink one side just enough to fit (cols = G² // rows, or rows = G² // cols),
    whichever keeps the aspect ratio closer to the exact one (tie: more patches, then shrink cols).

    Extreme strips: the short side is clamped to one patch and the long side to G² patches, so a
    view never exceeds G² patches nor ``G² · patch_size`` px (8064 px at the defaults: 1×4000 →
    14×8064 px, a 576×1 patch grid); its pixel count stays about ``base_size²``, so memory and
    encoder cost are bounded like any other view. The fewest patches a view gets is 363 of 576
    (found by sweeping the aspect ratio): a short side of ~1.6 patches, where one patch distorts
    the aspect about as little as two patches with the long side halved to fit.
    """
    _check_patch_geometry(patch_size, base_size)
    if not (width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f"a view must have a positive finite size, got {width}×{height}")
    side = base_size // patch_size
    budget = side * side
    cols_exact = side * math.sqrt(width / height)  # cols_exact · rows_exact == budget
    rows_exact = side * math.sqrt(height / width)
    cols = min(max(1, math.floor(cols_exact + 0.5)), budget)
    rows = min(max(1, math.floor(rows_exact + 0.5)), budget)
    if cols * rows > budget:  # both sides were rounded up
        exact = math.log(cols_exact / rows_exact)
        options = [(budget // rows, rows), (cols, budget // cols)]  # shrink cols, or shrink rows
        cols, rows = min(options, key=lambda o: (abs(math.log(o[0] / o[1]) - exact), -o[0] * o[1]))
    return cols * patch_size, rows * patch_size


def plan_slices(width: int, height: int, max_slices: int = 6, patch_size: int = 14,
                base_size: int = 336) -> SlicePlan:
    """Plan the slices and views of a ``width × height`` image (docs/design.md, "Slicing").

    1. Ideal count N = ceil(W·H / base²), capped at ``max_slices``. N ≤ 1: unsliced (global view
       only; see ``SlicePlan``).
    2. Candidate grids: every (rows n, cols m) with n·m ∈ {N−1, N, N+1}, 1 < n·m ≤ ``max_slices``,
       m ≤ W and n ≤ H (no empty cell). The chosen one minimises |log(W/H) − log(m/n)|, compared
       exactly with fractions. Ties, in order: n·m closest to N; fewer slices (cheaper); fewer
       rows (so a square image gets a 2-row × 3-col grid, not 3 × 2).
    3. Cell c of the grid spans [⌊c·W/m⌋, ⌊(c+1)·W/m⌋) (same for rows), so the boxes tile the image.
       All slices share one size: ``view_size`` of the exact cell (W/m) × (H/n).
    4. The global view: ``view_size(W, H)``.

    Example (the paper's largest image): 672×1008 → N = 6, grid 3 rows × 2 cols, six 336×336
    slices of 24×24 patches, global view 266×406 (29×19 patches).
    """
    for label, value in (("width", width), ("height", height)):
        if not _is_positive_int(value):
            raise ValueError(f"image {label} must be a positive integer number of pixels, got "
                             f"{value!r}; an empty image cannot be sliced (check how it was loaded)")
    width, height = int(width), int(height)
    _check_max_slices(max_slices)
    _check_patch_geometry(patch_size, base_size)
    global_w, global_h = view_size(width, height, patch_size, base_size)
    common = dict(image_size=(width, height), global_size=(global_w, global_h),
                  global_patches=(global_h // patch_size, global_w // patch_size),
                  patch_size=patch_size, base_size=base_size)
    grid = _choose_grid(width, height, max_slices, base_size)
    if grid is None:
        return SlicePlan(grid=(0, 0), slice_size=None, slice_patches=None, crop_boxes=(), **common)
    rows, cols = grid
    slice_w, slice_h = view_size(width / cols, height / rows, patch_size, base_size)
    boxes = tuple((width * c // cols, height * r // rows, width * (c + 1) // cols, height * (r + 1) // rows)
                  for r in range(rows) for c in range(cols))
    return SlicePlan(grid=grid, slice_size=(slice_w, slice_h),
                     slice_patches=(slice_h // patch_size, slice_w // patch_size),
                     crop_boxes=boxes, **common)


def _choose_grid(width: int, height: int, max_slices: int, base_size: int) -> tuple[int, int] | None:
    """(rows, cols) of the slice grid, or None for an unsliced image (``plan_slices`` steps 1-2)."""
    ideal = min(-(-width * height // (base_size * base_size)), max_slices)  # exact integer ceil
    if ideal <= 1:
        return None
    best_key, best = None, None
    for count in (ideal - 1, ideal, ideal + 1):
        if not 1 < count <= max_slices:
            continue
        for rows in range(1, count + 1):
            if count % rows:
                continue
            cols = count // rows
            if cols > width or rows > height:
                continue
            # |log(W/H) − log(m/n)| = log(max(q, 1/q)) with q = W·n / (H·m): compare max(q, 1/q)
            # exactly, so mirrored grids of a square image really tie.
            q = Fraction(width * rows, height * cols)
            key = (max(q, 1 / q), abs(count - ideal), count, rows)
            if best_key is None or key < best_key:
                best_key, best = key, (rows, cols)
    return best


def _check_max_slices(max_slices: int) -> None:
    if not _is_positive_int(max_slices):
        raise ValueError(f"max_slices must be a positive integer, got {max_slices!r}; use 1 to disable "
                         "slicing (global view only) or 6 (the paper)")


def _check_patch_geometry(patch_size: int, base_size: int) -> None:
    for label, value in (("patch_size", patch_size), ("base_size", base_size)):
        if not _is_positive_int(value):
            raise ValueError(f"{label} must be a positive integer number of pixels, got {value!r}; "
                             "CLIP ViT-L/14-336 uses patch_size 14 and base_size 336")
    if base_size % patch_size:
        raise ValueError(f"base_size {base_size} is not a multiple of patch_size {patch_size}: the "
                         "encoder's patch grid would not be whole; CLIP ViT-L/14-336 uses 336 and 14")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


# --- pixels -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlicedImage:
    """The encoder inputs of one image, normalised, float32."""

    slices: torch.Tensor
    """(N, 3, h, w): the slices row by row, all at ``plan.slice_size``; (0, 3, 0, 0) if unsliced."""

    global_view: torch.Tensor
    """(3, hg, wg): the whole image at ``plan.global_size``."""

    plan: SlicePlan

    def views(self) -> list[torch.Tensor]:
        """Every view as (3, h, w), in the order the LLM sees them: slices row by row, global last."""
        return [*self.slices.unbind(0), self.global_view]


def slice_image(image: ImageSource, plan: SlicePlan | None = None, max_slices: int = 6,
                image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD,
                patch_size: int = 14, base_size: int = 336) -> SlicedImage:
    """Cut, resize (bicubic, antialiased) and normalise an image into its encoder views.

    Args:
        image: an RGB ``PIL.Image`` is used as given (pass a file's image through
            ``meteor.processing.images.load_image`` first for EXIF orientation and transparency); anything
            else goes through ``load_image`` with its defaults.
        plan: a plan from ``plan_slices`` for this image's size; when given, it decides the
            geometry and ``max_slices``/``patch_size``/``base_size`` are not used.
        image_mean, image_std: per-channel RGB statistics; pass a ``CLIPImageProcessor``'s
            ``image_mean``/``image_std`` to match another checkpoint.

    Returns:
        ``SlicedImage`` with ``slices`` (N, 3, h, w) and ``global_view`` (3, hg, wg), each pixel
        (value / 255 − mean) / std.
    """
    if not (isinstance(image, Image.Image) and image.mode == "RGB"):
        image = load_image(image)
    if plan is None:
        plan = plan_slices(image.width, image.height, max_slices, patch_size, base_size)
    elif plan.image_size != image.size:
        raise ValueError(f"the plan was made for a {plan.image_size[0]}×{plan.image_size[1]} image but "
                         f"this image is {image.width}×{image.height}; call plan_slices on this image's "
                         "size (or pass plan=None)")
    mean = _channel_stats(image_mean, "image_mean")
    std = _channel_stats(image_std, "image_std")
    if (std <= 0).any():
        raise ValueError(f"image_std must be positive in every channel, got {tuple(image_std)}")
    resample = Image.Resampling.BICUBIC  # Pillow's resize is antialiased when it downsamples
    scale, shift = (1 / (255 * std)).view(3, 1, 1), (-mean / std).view(3, 1, 1)  # pixel · scale + shift
    if plan.is_sliced:
        (w, h), boxes = plan.slice_size, plan.crop_boxes
        slices = torch.empty(len(boxes), 3, h, w)  # (N, 3, h, w), filled in place
        for i, box in enumerate(boxes):
            _normalise(image.resize(plan.slice_size, resample, box=box), scale, shift, out=slices[i])
    else:
        slices = torch.empty(0, 3, 0, 0)
    global_view = _normalise(image.resize(plan.global_size, resample), scale, shift)  # (3, hg, wg)
    return SlicedImage(slices=slices, global_view=global_view, plan=plan)


def _channel_stats(values: Sequence[float], label: str) -> torch.Tensor:
    stats = torch.as_tensor(values, dtype=torch.float32).flatten()
    if stats.numel() != 3 or not torch.isfinite(stats).all():
        raise ValueError(f"{label} must be 3 finite numbers (R, G, B), got {values!r}")
    return stats


def _normalise(view: Image.Image, scale: torch.Tensor, shift: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """RGB image (w × h) → (3, h, w) float32 pixel · scale + shift (scale = 1 / (255 std), shift =
    −mean / std per channel, (3, 1, 1)): (pixel / 255 − mean) / std to float32 rounding, written
    into ``out`` when given. One pass converts and transposes the bytes, one scales them in place
    (2-3× faster than dividing a float copy, and these run once per view on every request)."""
    pixels = torch.from_numpy(np.array(view))  # (h, w, 3) uint8, a writable copy of Pillow's buffer
    if out is None:
        out = torch.empty(3, view.height, view.width)
    out.copy_(pixels.permute(2, 0, 1))
    return out.mul_(scale).add_(shift)


# --- prompt layout ----------------------------------------------------------------------------------

def view_token_counts(plan: SlicePlan, tokens_per_view: TokensPerView) -> list[int]:
    """Visual tokens of every view in the LLM's order (slices row by row, then global).

    ``tokens_per_view`` is an int K (the same for every view), a sequence with one count per view
    in that order, or a callable given the view's patch grid (rows, cols), e.g.
    ``lambda g: g[0] * g[1]`` to keep every patch token.
    """
    grids = plan.view_patches
    if isinstance(tokens_per_view, (int, np.integer)) and not isinstance(tokens_per_view, bool):
        counts = [int(tokens_per_view)] * len(grids)
    elif callable(tokens_per_view):
        counts = [tokens_per_view(grid) for grid in grids]
    elif isinstance(tokens_per_view, Sequence) and not isinstance(tokens_per_view, str):
        counts = list(tokens_per_view)
        if len(counts) != len(grids):
            raise ValueError(f"tokens_per_view has {len(counts)} counts but the plan has {len(grids)} "
                             f"views ({plan.num_slices} slices + the global view); give one per view")
    else:
        raise TypeError(f"tokens_per_view must be an int, a sequence of ints or a callable, got "
                        f"{type(tokens_per_view).__name__}")
    for index, count in enumerate(counts):
        if not _is_positive_int(count):
            raise ValueError(f"view {index} would get {count!r} visual tokens; every view needs a "
                             "positive integer count")
    return [int(count) for count in counts]


def layout_tokens(plan: SlicePlan, tokens_per_view: TokensPerView, image_token: str = "<image>",
                  slice_sep: str = ",", row_sep: str = "\n") -> str:
    """LLaVA-UHD's spatial schema as prompt text: one ``image_token`` per visual token.

    Slices row by row, ``slice_sep`` between the slices of a row, ``row_sep`` after each row, then
    the global view's tokens; an unsliced image is just the global view's tokens. For a 2×2 grid
    and K = 2: ``II,II\\nII,II\\nII`` (I = image_token).
    """
    if not image_token:
        raise ValueError("image_token must be a non-empty string such as '<image>'")
    counts = view_token_counts(plan, tokens_per_view)
    rows, cols = plan.grid
    text = []
    for r in range(rows):
        row = [image_token * counts[r * cols + c] for c in range(cols)]
        text.append(slice_sep.join(row) + row_sep)
    text.append(image_token * counts[-1])
    return "".join(text)


def count_image_tokens(plan: SlicePlan, tokens_per_view: TokensPerView) -> int:
    """Number of ``image_token``s in ``layout_tokens(plan, tokens_per_view)``: K·(N+1) for an int K."""
    return sum(view_token_counts(plan, tokens_per_view))
