"""Pure functions that shorten a Qwen-VL prompt: how many tokens each frame keeps, which ones, and
the prompt's columns without the dropped ones.

No model here: tensors in, tensors out, so each step is testable on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from meteor.model.projectors.top_down.selection import select_top_k

Keep = float | int
"""A share of each frame's merged tokens (float in (0, 1]) or a count K per frame (int ≥ 1)."""


def check_keep(keep, where: str = "keep") -> None:
    """Raise ValueError unless ``keep`` is a share in (0, 1] (float) or a count ≥ 1 (int)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"{where} must be a float share in (0, 1] or an int count ≥ 1, got {keep!r}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"{where}={keep} is a share of each image's tokens and must lie in (0, 1]; "
                         "for a count of tokens per image pass an int")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"{where}={keep}: keep at least one token per image (an int ≥ 1), or a float share")


def tokens_to_keep(keep: Keep, count: int) -> int:
    """K for a frame of ``count`` merged tokens: round(share · count), at least 1, or min(K, count)."""
    if isinstance(keep, float):
        return max(1, min(count, math.floor(keep * count + 0.5)))
    return min(keep, count)


def keep_per_item(keep: Keep | Sequence[Keep], items: int) -> list[Keep]:
    """One keep per visual item (images in order, then videos): a single value for all, or a sequence."""
    if isinstance(keep, (int, float)) and not isinstance(keep, bool):
        check_keep(keep)
        return [keep] * items
    keep = list(keep)
    if len(keep) != items:
        raise ValueError(f"keep has {len(keep)} entries but this call has {items} images and videos: give one per "
                         "image (in the order of image_grid_thw, then one per video), or a single value")
    for index, value in enumerate(keep):
        check_keep(value, f"keep[{index}]")
    return keep


def select_frames(scores: Tensor, keep: Keep) -> Tensor:
    """The kept merged tokens of each frame: the K highest scores, in raster (ascending) order.

    scores: (t, n) one row per frame → (t, K) int64; ties go to the earlier token.
    """
    return select_top_k(scores, tokens_to_keep(keep, scores.shape[-1]))


def kept_flags(indices: Tensor, count: int) -> Tensor:
    """(t, K) kept indices of frames of ``count`` tokens → (t · count,) bool, the frames one after another."""
    flags = torch.zeros(indices.shape[0], count, dtype=torch.bool, device=indices.device)
    flags.scatter_(1, indices, True)
    return flags.view(-1)


@dataclass
class Columns:
    """Where each column of the shortened prompt comes from."""

    index: Tensor
    """(B, L') the original column of each new column (any column on padding)."""
    valid: Tensor
    """(B, L') bool: True on real tokens, False on padding."""
    right_padded: bool

    def take(self, values: Tensor, fill) -> Tensor:
        """values: (..., B, L) → (..., B, L'), ``fill`` on padding."""
        index = self.index.expand(*values.shape[:-2], *self.index.shape)
        return values.gather(-1, index).masked_fill(~self.valid, fill)


def shorten(keep: Tensor, right_padded: bool) -> Columns:
    """keep: (B, L) bool, the columns each row keeps (real tokens only). Rows of different lengths are
    padded again, on the side they were padded on before (left unless ``right_padded``).
    """
    rows, length = keep.shape
    counts = keep.sum(dim=1)  # (B,)
    width = int(counts.max()) if rows else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept columns first, in order
    slots = torch.arange(width, device=keep.device).expand(rows, width)
    if right_padded:
        return Columns(order, slots < counts[:, None], True)
    shift = width - counts  # (B,) padding slots in front
    source = (slots - shift[:, None]).clamp(min=0)
    return Columns(order.gather(1, source), slots >= shift[:, None], False)
