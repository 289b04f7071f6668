"""The tensors the vLLM plugin passes from its processor to its model, and each image's prompt layout.

Pure functions of tensors and integers (no vLLM import), shared by the processor and the model:

* ``pack_views`` / ``unpack_views``: every view of an image as flat patches, (P, 3·p·p), each view's
  patches in raster order and each patch flattened as (channel, y, x), with the (rows, cols) patch
  grid of every view beside them. vLLM moves a multimodal item as tensors it can cut along their
  first dimension (one item's rows), and views of different sizes cannot share one (V, 3, h, w)
  tensor; flat patches can.
* ``layout_ids``: the ids an image takes in the prompt, LLaVA-UHD's spatial schema: for each row of
  slices, each slice's visual tokens with the slice separator's ids between two slices, the row
  separator's ids after the row; then the global view's tokens. It reads only the slice grid, the
  views' patch grids and K′, so vLLM can lay a prompt out from the processed tensors alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KEEP_ALL = 0
"""``tokens_per_slice`` value in the per-image tensor that means "keep every token of each view"
(the folder's K is null, the LLaVA-1.5 budget)."""


def pack_views(views: Sequence[torch.Tensor], patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (each (3, h, w), h and w multiples of ``patch_size``) → (patches (P, 3·p·p), grids (V, 2)).

    The inverse of ``unpack_views``."""
    p = patch_size
    patches, grids = [], []
    for index, view in enumerate(views):
        channels, height, width = view.shape
        if height % p or width % p:
            raise ValueError(f"view {index} is {height}x{width} px, not a whole number of {p}-px patches")
        rows, cols = height // p, width // p
        # (3, rows, p, cols, p) → (rows, cols, 3, p, p): raster order, each patch as (channel, y, x)
        grid = view.reshape(channels, rows, p, cols, p).permute(1, 3, 0, 2, 4)
        patches.append(grid.reshape(rows * cols, channels * p * p))
        grids.append((rows, cols))
    return torch.cat(patches), torch.tensor(grids, dtype=torch.int64)


def unpack_views(patches: torch.Tensor, grids: torch.Tensor, patch_size: int,
                 channels: int = 3) -> list[torch.Tensor]:
    """(P, 3·p·p) patches and (V, 2) grids → the V views, each (3, rows·p, cols·p)."""
    p = patch_size
    if patches.dim() != 2 or patches.shape[1] != channels * p * p:
        raise ValueError(f"patches must be (P, {channels}·{p}·{p} = {channels * p * p}), got {tuple(patches.shape)}")
    sizes = [int(rows) * int(cols) for rows, cols in grids.tolist()]
    if sum(sizes) != patches.shape[0]:
        raise ValueError(f"the view grids hold {sum(sizes)} patches but {patches.shape[0]} were given")
    views = []
    for (rows, cols), flat in zip(grids.tolist(), patches.split(sizes)):
        grid = flat.reshape(rows, cols, channels, p, p).permute(2, 0, 3, 1, 4)   # (3, rows, p, cols, p)
        views.append(grid.reshape(channels, rows * p, cols * p))
    return views


def view_token_counts(view_grids: Sequence[tuple[int, int]], tokens_per_slice: int) -> list[int]:
    """Visual tokens of each view: K′ each, or with ``KEEP_ALL`` each view's patch count."""
    if tokens_per_slice == KEEP_ALL:
        return [int(rows) * int(cols) for rows, cols in view_grids]
    return [int(tokens_per_slice)] * len(view_grids)


def layout_ids(slice_grid: tuple[int, int], view_grids: Sequence[tuple[int, int]], tokens_per_slice: int,
               image_token_id: int, slice_separator_ids: Sequence[int], row_separator_ids: Sequence[int]
               ) -> list[int]:
    """An image's ids in the prompt (see the module docstring). ``slice_grid`` (rows, cols) of slices,
    (0, 0) for an unsliced image; ``view_grids`` the patch grids of its rows·cols + 1 views in LLM
    order (slices row by row, then the global view)."""
    rows, cols = int(slice_grid[0]), int(slice_grid[1])
    if len(view_grids) != rows * cols + 1:
        raise ValueError(f"a {rows}x{cols} slice grid has {rows * cols + 1} views, got {len(view_grids)} view grids")
    counts = view_token_counts(view_grids, tokens_per_slice)
    ids: list[int] = []
    for row in range(rows):
        for col in range(cols):
            if col:
                ids += slice_separator_ids
            ids += [image_token_id] * counts[row * cols + col]
        ids += row_separator_ids
    return ids + [image_token_id] * counts[-1]
