"""Glyph alignment (not in the paper): teach the projector what the world's small texts say.

Stage 2 alone does not learn to read the synthetic world's texts: the tiny CLIP's patch tokens name
a text's character (a linear probe reads it at 0.57), yet the model answers reading questions at the
majority baseline (docs/demo-learning.md, seventh session). This loss gives the projector the
missing mapping directly. On every patch that a text covers (in each view: slices and the global
view), the compressor's output for that patch, ``projector(fused token)``, is scored by cosine
similarity against every row of the LLM's input-embedding table; the loss is the cross-entropy of
those scores (divided by a temperature) with the text's token as the label, the token the LLM reads
when the scene is written as text (``word "MAP"`` → ``MAP``).

The loss is computed on the fused tokens before Visual-Native Selection, so the selection is not
told which tokens to keep: a text whose patches are dropped still cannot be read. The MLP, Top-K
and pooling baselines train the same way, on their raw patch tokens; LLaVA-UHD's resampler has no
token-wise projector and cannot.
Like scene distillation it needs each record's ``meta`` (where each text is), which only the
synthetic world writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data import Example, RecordError, record_id
from ..processor import MeteorProcessor
from ..slicing import SlicePlan
from .args import TrainConfigError
from .distill import records_without_meta

PROJECTORS = ("meteor", "mlp", "cls_topk", "random_topk", "avgpool")
"""The projectors with a token-wise MLP that glyph alignment can train (not the resampler)."""

TEMPERATURE = 0.1
"""Divides the cosine similarities before the softmax (CLIP's learnt value is near 0.01; 0.1 keeps
the gradient alive for a projector that starts far from every embedding)."""


@dataclass(frozen=True)
class ViewGlyphs:
    """The patches of one view that a text covers, and each one's label."""

    patches: torch.Tensor
    """(n,) int64: raster indices in the view's patch grid."""
    tokens: torch.Tensor
    """(n,) int64: the LLM token id of the text covering each patch."""


def text_token(tokenizer, text: str) -> int:
    """The first token of ``text`` as the scene line writes it, inside quotes after a space."""
    ids = tokenizer(f' "{text}"', add_special_tokens=False).input_ids
    quote = tokenizer(' "', add_special_tokens=False).input_ids
    if len(ids) <= len(quote) or ids[:len(quote)] != quote:
        raise ValueError(f"the tokenizer does not split {text!r} from its opening quote "
                         f"({ids} against {quote}): glyph alignment cannot name its token")
    return ids[len(quote)]


def view_glyphs(meta: dict, plan: SlicePlan, tokenizer, cover: float = 0.3) -> list[ViewGlyphs]:
    """One ``ViewGlyphs`` per view of ``plan`` (its slices, then the global view): the patches of
    which at least ``cover`` of the area lies inside a text's box (boxes in original-image pixels)."""
    boxes = list(plan.crop_boxes) + [(0, 0, *plan.image_size)]
    texts = [(t["bbox"], text_token(tokenizer, t["text"])) for t in meta["texts"]]
    views = []
    for box, (width, height), (rows, cols) in zip(boxes, plan.view_sizes, plan.view_patches):
        # One patch of this view, in original-image pixels.
        step_x = (box[2] - box[0]) / width * plan.patch_size
        step_y = (box[3] - box[1]) / height * plan.patch_size
        patches, tokens = [], []
        for (left, top, right, bottom), token in texts:
            for row in range(rows):
                y0 = box[1] + row * step_y
                overlap_y = min(y0 + step_y, bottom) - max(y0, top)
                if overlap_y <= 0:
                    continue
                for col in range(cols):
                    x0 = box[0] + col * step_x
                    overlap_x = min(x0 + step_x, right) - max(x0, left)
                    if overlap_x > 0 and overlap_x * overlap_y >= cover * step_x * step_y:
                        patches.append(row * cols + col)
                        tokens.append(token)
        views.append(ViewGlyphs(torch.tensor(patches, dtype=torch.long),
                                torch.tensor(tokens, dtype=torch.long)))
    return views


class GlyphAligner:
    """The glyph targets of a dataset's records, built once each."""

    def __init__(self, processor: MeteorProcessor, records: Sequence[dict], cover: float = 0.3):
        missing = records_without_meta(records)
        if missing:
            raise TrainConfigError(
                f"glyph alignment needs where the texts of every record with an image are ('meta', as "
                f"the synthetic world writes it); {len(missing)} of {len(records)} records have none "
                f"(first: {missing[0]}). Set glyph_alignment to 0 for data from outside the world")
        self.processor = processor
        self.records = records
        self.cover = cover
        self._targets: dict[int, list[ViewGlyphs] | None] = {}

    def targets(self, position: int, example: Example) -> list[ViewGlyphs] | None:
        """Record ``position``'s targets, one per view of its image; None without an image."""
        if position not in self._targets:
            if example.image is None:
                self._targets[position] = None
                return None
            record = self.records[position]
            meta = record.get("meta")
            if not isinstance(meta, dict) or not isinstance(meta.get("texts"), list):
                raise RecordError(record_id(record, position),
                                  "glyph alignment needs each record's 'meta' with its 'texts' (the "
                                  "synthetic world's scene); this record has none. Set glyph_alignment "
                                  "to 0 for data from outside the world")
            self._targets[position] = view_glyphs(meta, example.image.plan, self.processor.tokenizer,
                                                  self.cover)
        return self._targets[position]


def glyph_loss(projected: torch.Tensor, tokens: torch.Tensor, embeddings: torch.Tensor,
               temperature: float = TEMPERATURE) -> tuple[torch.Tensor, int]:
    """(Σ cross-entropy, number right): ``projected`` (n, D) against the rows of ``embeddings``
    (V, D, not trained by this loss) by cosine similarity / temperature, ``tokens`` (n,) the labels."""
    table = F.normalize(embeddings.detach().float(), dim=-1)
    logits = F.normalize(projected.float(), dim=-1) @ table.T / temperature
    loss = F.cross_entropy(logits, tokens.to(logits.device), reduction="sum")
    hits = int((logits.detach().argmax(-1) == tokens.to(logits.device)).sum())
    return loss, hits
