"""The paper's Figure 4 for any image: on every view, the patches the visual expert alone, the
native expert alone and their aggregate (what the model keeps) would keep.

Used by the demo's report, ``meteor explain`` and the web UI of ``meteor serve``. The drawing reads
only what ``image_selections`` returns (the model's ``ViewSelection``s), so
it needs no access to the model's internals:

    fig = draw_selection(sliced, selections, processor, title="photo.jpg")
    fig.savefig("photo_selection.png")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

COLUMNS = ("view", "visual expert (CLS attention)", "native expert (INS')", "aggregate: kept")
"""The figure's columns, left to right."""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def view_picture(view: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One normalised view (3, h, w) → the picture (h, w, 3) in [0, 1]."""
    pixels = view * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return pixels.clamp(0, 1).permute(1, 2, 0)


def highlight(picture: torch.Tensor, grid: tuple[int, int], kept: torch.Tensor, patch: int) -> torch.Tensor:
    """Fade every patch that was not kept towards white and outline the kept ones in red.
    picture: (h, w, 3) with h = rows·patch, w = cols·patch; kept: (K,) raster indices."""
    rows, cols = grid
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[kept] = True
    mask = mask.view(rows, cols).repeat_interleave(patch, 0).repeat_interleave(patch, 1)  # (h, w)
    out = picture.clone()
    out[~mask] = out[~mask] * 0.25 + 0.75
    edge = mask & ~(torch.nn.functional.max_pool2d((~mask).float()[None, None], 3, 1, 1)[0, 0] == 0)
    out[edge] = torch.tensor([0.85, 0.1, 0.1])
    return out


def expert_choices(selection) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(the visual expert's Top-K, the native expert's Top-K, the kept indices) of one view, each
    (K,) in raster order; None where the projector has no such scores (a baseline)."""
    if selection.indices is None:
        return None, None, None
    k = len(selection.indices)
    chosen = [None if scores is None else torch.topk(scores, k).indices.sort().values
              for scores in (selection.visual_scores, selection.native_scores)]
    return chosen[0], chosen[1], selection.indices


def draw_selection(sliced, selections: Sequence[Any], processor, title: str = "", by_view: str = "rows"):
    """The figure (matplotlib ``Figure``) of one image: a row per view (slices row by row, then the
    global view), the columns of ``COLUMNS``; ``by_view="columns"`` turns it (a column per view, for
    wide screens). ``sliced``: the image as ``processor.prepare_image`` gave it; ``selections``: its
    views' ``ViewSelection``s."""
    if by_view not in ("rows", "columns"):
        raise ValueError(f"by_view must be 'rows' or 'columns', got {by_view!r}")
    plt = _plt()
    views = sliced.views()
    mean, std = processor.image_mean or (0.5,) * 3, processor.image_std or (0.5,) * 3
    count = len(selections)
    shape, size = ((count, len(COLUMNS)), (9, 2.3 * count)) if by_view == "rows" \
        else ((len(COLUMNS), count), (1.9 * count + 1.2, 8))
    fig, axes = plt.subplots(*shape, figsize=size, squeeze=False)
    for row, selection in enumerate(selections):
        picture = view_picture(views[selection.view_index], mean, std)
        name = "global" if selection.is_global else f"slice {selection.view_index + 1}"
        choices = expert_choices(selection)
        for col, kept in enumerate((None, *choices)):
            ax = axes[row][col] if by_view == "rows" else axes[col][row]
            absent = col > 0 and kept is None and choices[2] is not None   # a selecting projector without this expert
            shown = picture if kept is None else highlight(picture, selection.grid, kept, processor.patch_size)
            ax.imshow((shown * 0.2 + 0.8 if absent else shown).numpy())
            if absent:
                ax.text(0.5, 0.5, "none in this projector", transform=ax.transAxes, ha="center", va="center",
                        fontsize=7, color="0.3")
            ax.set_xticks([])
            ax.set_yticks([])
            if by_view == "rows":
                if row == 0:
                    ax.set_title(COLUMNS[col], fontsize=8)
                if col == 0:
                    ax.set_ylabel(name, fontsize=8)
            else:
                if col == 0:
                    ax.set_title(name, fontsize=8)
                if row == 0:
                    ax.set_ylabel(COLUMNS[col].replace(" (", "\n("), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def selection_title(name: str, selections: Sequence[Any], question: str | None = None) -> str:
    """"photo.jpg: K=16 tokens kept per view" (and the question's first line under it)."""
    counts = sorted({len(s.indices) for s in selections if s.indices is not None})
    kept = f"K={counts[0]}" if len(counts) == 1 else "all" if not counts else f"K={counts}"
    first = question.strip().splitlines()[0] if question and question.strip() else ""
    return f"{name}: {kept} tokens kept per view" + (f"\nQ: {first}" if first else "")


def selection_figure(model, processor, image: Any, question: str | None, path: str | os.PathLike,
                     tokens_per_slice: int | None = None, name: str | None = None,
                     prompt_ids: Sequence[int] | None = None) -> list:
    """Encode ``image`` (anything ``processor.prepare_image`` accepts, or a prepared SlicedImage), draw its figure to ``path``
    (PNG) and return its views' ``ViewSelection``s. ``tokens_per_slice``: K′ instead of the
    model's K. ``name``: the title's name for the image (default: the file's name). ``prompt_ids``:
    the prompt the model answers (the image laid out in it), so that a question-conditioned
    instruction token selects for its question; without it, the selection made with no question."""
    from meteor.processing.slicing import SlicedImage

    plt = _plt()
    sliced = image if isinstance(image, SlicedImage) else processor.prepare_image(image)
    model.eval()
    selections = image_selections(model, processor, [sliced], prompt_ids, tokens_per_slice)
    if name is None:
        name = Path(image).name if isinstance(image, (str, os.PathLike)) else "image"
    fig = draw_selection(sliced, selections, processor, selection_title(name, selections, question))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return selections


@torch.no_grad()
def image_selections(model, processor, images: Sequence[Any], prompt_ids: Sequence[int] | None = None,
                     tokens_per_slice: int | None = None, feature_cache=None) -> list:
    """The ``ViewSelection`` of every view of ``images`` (prepared ``SlicedImage``s), image after
    image: what the model keeps of them when it reads ``prompt_ids`` (the prompt with the images laid
    out, so a question-conditioned instruction token selects for its question), or the images alone.
    ``feature_cache``: a ``FeatureCache`` the vision tower's outputs are read from and kept in."""
    from meteor.processing.image_processor import image_tensors

    k = processor.tokens_per_slice(tokens_per_slice, images)
    if prompt_ids is None:
        prompt_ids = [token for image in images for token in processor.image_layout(image, k)]
    inputs = image_tensors(images, processor.patch_size)
    tower_outputs = None if feature_cache is None else \
        feature_cache.encode_views(model.model, inputs["pixel_values"], inputs["view_grids"])
    return model.image_selections(torch.tensor([list(prompt_ids)]), inputs["pixel_values"], inputs["view_grids"],
                                  inputs["image_grids"], tokens_per_slice=k, tower_outputs=tower_outputs)
