"""What a compressed Qwen-VL model kept, as numbers and as a picture.

``selection_report(model)`` (or ``selection_report(model, inputs)``) gives one ``FrameSelection`` per
image or video frame; ``selection_table`` makes it JSON-ready, and ``draw_frames`` draws each frame
with its kept merged tokens outlined and the rest faded, with ``meteor.serve.visualize``'s helpers:

    selections = selection_report(model, inputs)
    fig = draw_frames(selections, inputs["pixel_values"], inputs["image_grid_thw"], processor.image_processor)
    fig.savefig("kept.png")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from meteor.adapters.qwen_vl.compressor import FrameSelection


def selection_table(selections: Sequence[FrameSelection]) -> list[dict]:
    """One JSON-ready dict per frame: modality, item, frame, row, grid, kept, the kept tokens' share
    of the score (``mass_kept``), and the scores."""
    table = []
    for selection in selections:
        total = sum(selection.scores) or 1.0
        table.append({"modality": selection.modality, "item": selection.item, "frame": selection.frame,
                      "row": selection.row, "grid": list(selection.grid), "kept": list(selection.kept),
                      "mass_kept": round(sum(selection.scores[i] for i in selection.kept) / total, 4),
                      "scores": [round(float(v), 6) for v in selection.scores]})
    return table


def item_frames(pixel_values: Tensor, grid_thw: Tensor, patch_size: int, temporal_patch_size: int,
                merge: int) -> list[Tensor]:
    """Undo the Qwen image processor's patch layout: (patches, C · tp · p · p) → per item (t, C, H, W),
    the first of each temporal patch's frames, still normalised.

    The processor orders an item's patches (t, h / m, w / m, m, m) and each patch's values
    (C, tp, p, p); H = h · p, W = w · p.
    """
    frames, start = [], 0
    for t, h, w in grid_thw.tolist():
        count = t * h * w
        patches = pixel_values[start:start + count].float()
        start += count
        channels = patches.shape[-1] // (temporal_patch_size * patch_size * patch_size)
        grid = patches.view(t, h // merge, w // merge, merge, merge, channels, temporal_patch_size, patch_size,
                            patch_size)[..., 0, :, :]  # (t, h/m, w/m, m, m, C, p, p): first frame of each pair
        picture = grid.permute(0, 5, 1, 3, 6, 2, 4, 7)  # (t, C, h/m, m, p, w/m, m, p)
        frames.append(picture.reshape(t, channels, h * patch_size, w * patch_size))
    return frames


def draw_frames(selections: Sequence[FrameSelection], pixel_values: Tensor, grid_thw: Tensor, image_processor,
                modality: str = "image", title: str = ""):
    """A matplotlib Figure: each frame of ``modality`` as the model saw it (left) and what it kept
    (right). ``pixel_values`` / ``grid_thw``: that modality's processor output; ``image_processor``:
    the processor's, for its patch size, merge size and normalisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meteor.serve.visualize import highlight, view_picture

    patch, merge = image_processor.patch_size, image_processor.merge_size
    frames = item_frames(pixel_values, grid_thw, patch, image_processor.temporal_patch_size, merge)
    shown = [s for s in selections if s.modality == modality]
    if not shown:
        raise ValueError(f"no {modality} in this selection report")
    fig, axes = plt.subplots(len(shown), 2, figsize=(6, 2.6 * len(shown)), squeeze=False)
    for row, selection in enumerate(shown):
        picture = view_picture(frames[selection.item][selection.frame], image_processor.image_mean,
                               image_processor.image_std)  # (H, W, 3)
        kept = torch.tensor(selection.kept, dtype=torch.long)
        rows, cols = selection.grid
        name = f"{modality} {selection.item + 1}" + (f", frame {selection.frame + 1}" if modality == "video" else "")
        for col, image in enumerate((picture, highlight(picture, selection.grid, kept, patch * merge))):
            ax = axes[row][col]
            ax.imshow(image.numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name if col == 0 else f"kept {len(selection.kept)} of {rows * cols}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
