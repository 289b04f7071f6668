"""Glyph alignment (not in the paper): an auxiliary loss that teaches the projector what the
synthetic world's small texts say.

Next-token loss alone does not teach the demo's model to read the world's texts: the tiny CLIP's
patch tokens name a text's character, yet the model answers reading questions at the majority
baseline. This loss gives the projector the missing mapping directly. On every patch that a text
covers (in each view: slices and the global view), the projector's output for that patch,
``projector.mlp(mlp_inputs[patch])``, is scored by cosine similarity against every row of the
LLM's input-embedding table; the loss is the cross-entropy of those scores (divided by a
temperature) with the text's token as the label, the token the LLM reads when the scene is written
as text (``word "MAP"`` → ``MAP``).

The loss is computed on the tokens before Visual-Native Selection, so the selection is not told
which tokens to keep: a text whose patches are dropped still cannot be read. The MLP, Top-K and
pooling baselines train the same way, on their raw patch tokens; LLaVA-UHD's resampler is not
token-wise and cannot (``meteor.model.projectors.is_tokenwise``). Like scene distillation it needs each
record's ``meta`` (where each text is), which only the synthetic world writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meteor.train.data import Example, LlavaDataset, RecordError, record_id
from meteor.processing.processor import Batch, LlavaMeteorProcessor
from meteor.model.projectors import TOKENWISE, is_tokenwise
from meteor.processing.slicing import SlicePlan, patch_overlap
from meteor.train.args import TrainConfigError
from meteor.train.auxiliary import AuxiliaryTerm
from meteor.demo.distill import records_without_meta

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
    texts = [(t["bbox"], text_token(tokenizer, t["text"])) for t in meta["texts"]]
    views = []
    for region, size in zip(plan.view_regions, plan.view_sizes):
        patches, tokens = [], []
        for box, token in texts:
            covered = patch_overlap(tuple(box), region, size, plan.patch_size).covered(cover).flatten()
            indices = covered.nonzero().flatten().tolist()
            patches += indices
            tokens += [token] * len(indices)
        views.append(ViewGlyphs(torch.tensor(patches, dtype=torch.long),
                                torch.tensor(tokens, dtype=torch.long)))
    return views


class GlyphAlignment:
    """The auxiliary loss (``meteor.train.auxiliary``) and the glyph targets of a dataset's records,
    built once each."""

    name = "glyph"
    needs_hidden_states = False
    needs_views = True
    logged = ("accuracy",)

    def __init__(self, processor: LlavaMeteorProcessor, records: Sequence[dict], mlp: torch.nn.Module,
                 embeddings: torch.nn.Module, weight: float = 1.0, cover: float = 0.3):
        """``mlp``: the projector's token-wise MLP; ``embeddings``: the LLM's input embeddings (the
        labels' table, not trained by this loss)."""
        missing = records_without_meta(records)
        if missing:
            raise TrainConfigError(
                f"glyph alignment needs where the texts of every record with an image are ('meta', as "
                f"the synthetic world writes it); {len(missing)} of {len(records)} records have none "
                f"(first: {missing[0]}). Set glyph_alignment to 0 for data from outside the world")
        self.processor = processor
        self.records = records
        self.mlp = mlp
        self.embeddings = embeddings
        self.weight = weight
        self.cover = cover
        self._targets: dict[int, list[ViewGlyphs] | None] = {}

    @classmethod
    def factory(cls, weight: float, cover: float = 0.3):
        """What ``meteor.train.train`` takes in ``auxiliary``; refuses a projector that is not token-wise."""
        def build(model, dataset: LlavaDataset, template: str) -> "GlyphAlignment":
            projector = model.meteor_config.compressor.projector
            if not is_tokenwise(projector):
                raise TrainConfigError(f"glyph_alignment needs a projector that maps each patch token on its "
                                       f"own ({', '.join(TOKENWISE)}); this model's is {projector!r}. "
                                       f"Set glyph_alignment to 0")
            return cls(dataset.processor, dataset.records, model.compressor.mlp,
                       model.language_model.get_input_embeddings(), weight, cover)
        return build

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

    def prepare(self, position: int, example: Example) -> None:
        self.targets(position, example)

    def units(self, position: int, example: Example) -> float:
        views = self.targets(position, example)
        return float(sum(len(view.patches) for view in views)) if views else 0.0

    def loss(self, positions: Sequence[int], batch: Batch, output) -> AuxiliaryTerm:
        """Σ cross-entropy over the micro-batch's text patches, counted over those patches, with the
        patches classified right as ``accuracy``. The i-th image of the batch belongs to the i-th of
        its records that has one."""
        per_image = [targets for targets in (self._targets[p] for p in positions) if targets is not None]
        picked, labels = [], []
        for group in output.views:
            for row, (image_index, view_index) in enumerate(group.owners):
                target = per_image[image_index][view_index]
                if len(target.patches):
                    picked.append(group.output.mlp_inputs[row, target.patches.to(group.output.mlp_inputs.device)])
                    labels.append(target.tokens)
        if not picked:
            return AuxiliaryTerm(self.mlp.fc1.weight.new_zeros(()), 0.0, {"accuracy": 0.0})
        projected = self.mlp(torch.cat(picked))
        loss, hits = glyph_loss(projected, torch.cat(labels), self.embeddings.weight)
        return AuxiliaryTerm(loss, float(len(torch.cat(labels))), {"accuracy": float(hits)})

def glyph_loss(projected: torch.Tensor, tokens: torch.Tensor, embeddings: torch.Tensor,
               temperature: float = TEMPERATURE) -> tuple[torch.Tensor, int]:
    """(Σ cross-entropy, number right): ``projected`` (n, D) against the rows of ``embeddings``
    (V, D, not trained by this loss) by cosine similarity / temperature, ``tokens`` (n,) the labels."""
    table = F.normalize(embeddings.detach().float(), dim=-1)
    logits = F.normalize(projected.float(), dim=-1) @ table.T / temperature
    loss = F.cross_entropy(logits, tokens.to(logits.device), reduction="sum")
    hits = int((logits.detach().argmax(-1) == tokens.to(logits.device)).sum())
    return loss, hits
