"""``LlavaMeteorImageProcessor``: images → LLaVA-UHD views → the tensors the model takes.

Each image is cut and resized by ``meteor.processing.slicing`` (up to ``max_slices`` slices and the
global view, every side a multiple of the patch, about ``base_size``² pixels each) and normalised
with ``image_mean`` / ``image_std``. Views differ in size, so their pixels travel as flattened
patches, one row per patch (docs/design.md, "Tensors"):

- ``pixel_values`` (P, 3·p·p): every view's patches, images in order, each image's views in the
  LLM's order (slices row by row, then the global view), each view's patches in raster order, each
  patch as (channel, y, x);
- ``view_grids`` (V, 2): each view's patch grid (rows, cols);
- ``image_grids`` (I, 2): each image's slice grid (rows, cols), (0, 0) when unsliced;
- ``image_sizes`` (I, 2): each original image's (height, width), from which its slicing plan follows.

``views_to_patches`` and ``meteor.model.modeling.split_views`` are each other's inverse.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from meteor.processing.images import DEFAULT_MAX_PIXELS, load_image
from meteor.processing.slicing import CLIP_MEAN, CLIP_STD, SlicedImage, SlicePlan, plan_slices, slice_image


def views_to_patches(views: Sequence[torch.Tensor], patch_size: int) -> torch.Tensor:
    """Views (3, h, w), h and w multiples of ``patch_size`` → (Σ patches, 3·p·p), each view's patches
    in raster order."""
    rows = []
    for view in views:
        channels, height, width = view.shape
        grid = view.reshape(channels, height // patch_size, patch_size, width // patch_size, patch_size)
        rows.append(grid.permute(1, 3, 0, 2, 4).reshape(-1, channels * patch_size * patch_size))
    return torch.cat(rows) if rows else torch.empty(0, 3 * patch_size * patch_size)


def image_tensors(images: Sequence[SlicedImage], patch_size: int) -> dict[str, torch.Tensor]:
    """Prepared images → ``pixel_values``, ``view_grids``, ``image_grids`` and ``image_sizes``."""
    views = [view for image in images for view in image.views()]
    grids = [grid for image in images for grid in image.plan.view_patches]
    return {
        "pixel_values": views_to_patches(views, patch_size),
        "view_grids": torch.tensor(grids, dtype=torch.long).reshape(-1, 2),
        "image_grids": torch.tensor([image.plan.grid for image in images], dtype=torch.long).reshape(-1, 2),
        "image_sizes": torch.tensor([image.plan.image_size[::-1] for image in images], dtype=torch.long).reshape(-1, 2),
    }


class LlavaMeteorImageProcessor(BaseImageProcessor):
    """LLaVA-UHD slicing and normalisation (see the module docstring for what it returns)."""

    model_input_names = ["pixel_values", "view_grids", "image_grids", "image_sizes"]

    def __init__(self, patch_size: int = 14, base_size: int = 336, max_slices: int = 6,
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD,
                 max_image_pixels: int | None = DEFAULT_MAX_PIXELS, **kwargs):
        super().__init__(**kwargs)
        plan_slices(base_size, base_size, max_slices, patch_size, base_size)     # validates the geometry
        self.patch_size = int(patch_size)
        self.base_size = int(base_size)
        self.max_slices = int(max_slices)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.max_image_pixels = max_image_pixels

    def plan(self, width: int, height: int) -> SlicePlan:
        """Where an image of this size is cut and what size each view becomes."""
        return plan_slices(width, height, self.max_slices, self.patch_size, self.base_size)

    def prepare(self, image: Any) -> SlicedImage:
        """One image (anything ``meteor.processing.images.load_image`` accepts, or an already prepared
        ``SlicedImage``) → its normalised views."""
        if isinstance(image, SlicedImage):
            return image
        return slice_image(load_image(image, max_pixels=self.max_image_pixels), max_slices=self.max_slices,
                           image_mean=self.image_mean, image_std=self.image_std, patch_size=self.patch_size,
                           base_size=self.base_size)

    def __call__(self, images: Any, *args, **kwargs) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """One image or a (nested) list of them → the model's image tensors, images in order."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"LlavaMeteorImageProcessor returns PyTorch tensors (return_tensors='pt'), "
                             f"not {return_tensors!r}")
        prepared = [self.prepare(image) for image in flatten_images(images)]
        return BatchFeature(image_tensors(prepared, self.patch_size), tensor_type=None)


def flatten_images(images: Any) -> list[Any]:
    """One image, or lists (per prompt) of images → a flat list, in order; None entries dropped."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [item for entry in images for item in flatten_images(entry)]
    return [images]


__all__ = ["LlavaMeteorImageProcessor", "flatten_images", "image_tensors", "views_to_patches"]
