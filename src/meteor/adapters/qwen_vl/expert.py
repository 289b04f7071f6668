"""The visual expert on a Qwen2.5-VL / Qwen3-VL vision tower: the attention each merged token receives.

These towers have no CLS token, so the paper's CLS row (Eq. 3) does not exist; the score is the one
``meteor.model.visual_expert.attention_received`` computes for SigLIP: the attention each patch
receives in one full-attention block, summed over every patch query and every head, renormalised
over the patches of its frame. A merged token (one LLM token = a ``m × m`` group of patches, m = 2)
scores the sum of its patches' scores, so the scores of one frame's merged tokens sum to 1 too.

Why a full-attention block: Qwen2.5-VL attends within windows of 112 px (8 × 8 patches) in every
block but those of ``fullatt_block_indexes`` (7, 15, 23, 31 in the 7B tower), and a windowed
block's attention only says which patch matters inside its window, not across the image. Every
Qwen3-VL block attends over the whole frame. The default is the last full-attention block (the
7B's block 31, its last; Qwen3-VL's last block): the one nearest the features the language model
receives, as the paper reads its CLS row at the feature layer; ``layer=`` picks another.
Summing over heads and queries ranks tokens as the paper's average over heads does.

What this reads from transformers' code, without changing it: the block's ``attn`` module is
called with ``cu_seqlens`` (its attention segments: one per frame in a full-attention block) and
``position_embeddings`` (cos, sin) as keyword arguments, its ``qkv`` linear gives (q | k | v) per
patch, and the module's own ``apply_rotary_pos_emb_vision`` rotates q and k, so the score uses the
q/k the block itself compares, with whichever attention kernel runs (SDPA never returns weights).
Qwen2.5-VL runs its patches in window order (``get_vision_window_index``, in units of merged
tokens); the scores are put back in raster order, the order of ``get_image_features``' output.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from meteor.model.visual_expert import attention_received


@dataclass(frozen=True)
class TowerLayout:
    """What the scoring needs to know about one vision tower."""

    layer: int
    """The block whose attention is read (0-based index into ``visual.blocks``)."""
    merge: int
    """``spatial_merge_size``: one LLM token per ``merge × merge`` patches."""
    windowed: bool
    """True for Qwen2.5-VL, whose patches run in window order."""


def full_attention_blocks(visual: nn.Module) -> list[int]:
    """The blocks that attend over whole frames: ``fullatt_block_indexes`` for Qwen2.5-VL, all for Qwen3-VL."""
    depth = len(visual.blocks)
    if hasattr(visual, "fullatt_block_indexes"):
        return sorted(int(i) % depth for i in visual.fullatt_block_indexes)
    return list(range(depth))


def tower_layout(visual: nn.Module, layer: int | None) -> TowerLayout:
    """Check ``layer`` against the tower (None: the last full-attention block) and describe the tower.

    Raises ValueError naming the blocks that can be used when ``layer`` is a windowed block, or the
    tower has no full-attention block at all.
    """
    depth = len(visual.blocks)
    full = full_attention_blocks(visual)
    if not full:
        raise ValueError(
            f"this {type(visual).__name__} has no full-attention block (fullatt_block_indexes is empty): every "
            "block attends within 112-px windows, so no block's attention ranks tokens across the image and "
            "meteor.compress cannot score them")
    if layer is None:
        layer = full[-1]
    if not isinstance(layer, int) or isinstance(layer, bool) or not -depth <= layer < depth:
        raise ValueError(f"layer={layer!r} is not a block of this {depth}-block vision tower: use 0..{depth - 1} "
                         f"(or -{depth}..-1), one of the full-attention blocks {full}")
    layer %= depth
    if layer not in full:
        raise ValueError(
            f"vision block {layer} attends within windows (window_size {visual.window_size} px), so its attention "
            f"does not rank tokens across the image: use one of the full-attention blocks {full} "
            "(fullatt_block_indexes), or layer=None for the last of them")
    return TowerLayout(layer=layer, merge=int(visual.spatial_merge_size),
                       windowed=hasattr(visual, "fullatt_block_indexes"))


def patch_scores(captured: dict, attention: nn.Module) -> Tensor:
    """The attention each patch receives in the captured block, per attention segment (frame).

    Returns (patches,) float32 in the tower's order; the scores of each ``cu_seqlens`` segment sum to 1.
    """
    qkv = captured["qkv"]
    patches = qkv.shape[0]
    heads = attention.num_heads
    q, k, _ = qkv.reshape(patches, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # (patches, h, d) each
    cos, sin = captured["position_embeddings"]
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
    q, k = rotate(q, k, cos, sin)  # as the block rotates them before attending
    bounds = captured["cu_seqlens"].tolist()
    scores = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        segment_q = q[start:end].reshape(1, end - start, -1)  # (1, T, h · d): head-major, as attention_received reads
        segment_k = k[start:end].reshape(1, end - start, -1)
        scores.append(attention_received(segment_q, segment_k, heads, attention.scaling)[0])  # (T,)
    return torch.cat(scores)


def merged_token_scores(scores: Tensor, grid_thw: Tensor, layout: TowerLayout, visual: nn.Module) -> list[Tensor]:
    """Patch scores (tower order) → each item's merged-token scores, (t, rows · cols) in raster order.

    grid_thw: (items, 3) patches per item as the processor gives it (t, h, w); rows = h / merge,
    cols = w / merge. Each frame's row sums to 1.
    """
    unit = layout.merge ** 2
    merged = scores.view(-1, unit).sum(dim=-1)  # (tokens,): the tower keeps each merged group contiguous
    if layout.windowed:
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=layout.merge,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        raster = torch.empty_like(merged)
        raster[window_index.to(merged.device)] = merged  # token window_index[i] sits at window position i
        merged = raster
    sizes = [int(t) * (int(h) // layout.merge) * (int(w) // layout.merge) for t, h, w in grid_thw.tolist()]
    return [item.view(int(thw[0]), -1) for item, thw in zip(merged.split(sizes), grid_thw.tolist())]


class ScoreRecorder:
    """Scores every run of the vision tower while installed, from hooks on the tower and on the scored
    block: the tower's output object → (grid_thw, one (t, rows · cols) score tensor per item).

    Hooking the tower, not calling it, is what makes ``generate`` work: it encodes the images itself
    (``get_image_features``) before the prefill and hands the prefill the encoder outputs only.
    """

    KEPT = 16
    """Scored outputs kept for a prefill to claim, each once (the oldest dropped first): those of the
    user's own ``get_image_features`` calls, which no prefill claims, cannot pile up."""

    def __init__(self, visual: nn.Module, layout: TowerLayout):
        self.visual, self.layout = visual, layout
        self._records: OrderedDict[int, tuple] = OrderedDict()
        self._local = threading.local()  # what one tower run captured, per thread
        block = visual.blocks[layout.layer]
        self._handles = [visual.register_forward_pre_hook(self._tower_starts, with_kwargs=True),
                         visual.register_forward_hook(self._tower_ends),
                         block.attn.register_forward_pre_hook(self._attention_starts, with_kwargs=True),
                         block.attn.qkv.register_forward_hook(self._projected)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records.clear()

    def claim(self, output) -> tuple[Tensor, list[Tensor]] | None:
        """(grid_thw, per-item scores) of a tower output this recorder saw (then forgotten), else None."""
        record = self._records.pop(id(output), None)
        return None if record is None or record[0] is not output else record[1:]

    def _tower_starts(self, module, args, kwargs):
        self._local.captured = {"grid_thw": kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]}

    def _attention_starts(self, module, args, kwargs):
        captured = getattr(self._local, "captured", None)
        if captured is None:  # the block run on its own, not inside the tower
            return
        captured["cu_seqlens"] = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        captured["position_embeddings"] = kwargs.get("position_embeddings")

    def _projected(self, module, args, output):
        captured = getattr(self._local, "captured", None)
        if captured is not None:
            captured["qkv"] = output  # (patches, 3 · C)

    def _tower_ends(self, module, args, output):
        captured, self._local.captured = getattr(self._local, "captured", None), None
        if not captured or "qkv" not in captured:
            return
        with torch.no_grad():
            scores = patch_scores(captured, self.visual.blocks[self.layout.layer].attn)
            per_item = merged_token_scores(scores, captured["grid_thw"], self.layout, self.visual)
        # The output object itself is kept with its scores, so its id cannot be reused meanwhile.
        self._records[id(output)] = (output, captured["grid_thw"], per_item)
        while len(self._records) > self.KEPT:
            self._records.popitem(last=False)
