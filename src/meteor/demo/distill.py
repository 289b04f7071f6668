"""Scene distillation: a training aid (an auxiliary loss) for the synthetic world, where each record
knows its scene.

The demo's tiny LLaMA was pretrained to answer questions about scenes written as text ("Scene:
large red star near the top left; …"). Stage 2 must carry that skill over to visual tokens, and
with next-token loss alone it gets one answer token per question to learn from. Scene distillation
adds a dense signal: a frozen copy of the starting LLM (the teacher) reads the same conversation
with the scene line (``meteor.demo.world.captions.scene_line`` of the record's ``meta``) where the image
was, and the trained model's hidden states on the conversation after the image are pulled towards
the teacher's on the same tokens:

    loss_i = mean over layers l of  mean((h_l - t_l)²) / mean(t_l²)

over the positions of the shared suffix (every token after the image placeholder), for each
decoder layer's output. The total loss adds ``weight × mean_i loss_i`` to the token loss.

It is not part of the paper's recipe: it needs the scene of every record (the world's ``meta``),
which real datasets do not have, and it holds a second copy of the LLM. ``docs/demo-findings.md``
gives what it changed in the demo.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from meteor.train.data import Example, LlavaDataset, RecordError, record_id
from meteor.processing.processor import Batch, LlavaMeteorProcessor, pad_batch
from meteor.train.args import TrainConfigError
from meteor.train.auxiliary import AuxiliaryTerm
from meteor.demo.world.captions import scene_line


def records_without_meta(records: Sequence[dict]) -> list[str]:
    """The ids of the records with an image but no scene ('meta'), which the synthetic world's
    training aids (scene distillation, glyph alignment) cannot use."""
    return [record_id(r, k) for k, r in enumerate(records)
            if isinstance(r, dict) and r.get("image") is not None and not isinstance(r.get("meta"), dict)]


class SceneDistillation:
    """The auxiliary loss (``meteor.train.auxiliary``): a frozen teacher LLM and the teacher inputs
    of a dataset's records (built once each)."""

    name = "distill"
    needs_hidden_states = True
    needs_views = False
    logged = ()

    def __init__(self, language_model: nn.Module, processor: LlavaMeteorProcessor, template: str,
                 records: Sequence[dict], weight: float = 1.0):
        missing = records_without_meta(records)
        if missing:
            raise TrainConfigError(
                f"scene distillation needs the scene of every record with an image ('meta', as the "
                f"synthetic world writes it); {len(missing)} of {len(records)} records have none (first: "
                f"{missing[0]}). Set scene_distillation to 0 for data from outside the world")
        self.teacher = copy.deepcopy(language_model).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.processor = processor
        self.template = template
        self.records = records
        self.weight = weight
        self._ids: dict[int, list[int] | None] = {}

    @classmethod
    def factory(cls, weight: float):
        """What ``meteor.train.train`` takes in ``auxiliary``: builds the term for the run's model and
        data (the teacher is copied from the LLM before the model is wrapped)."""
        def build(model, dataset: LlavaDataset, template: str) -> "SceneDistillation":
            return cls(model.language_model, dataset.processor, template, dataset.records, weight)
        return build

    def prepare(self, position: int, example: Example) -> None:
        self.teacher_ids(position)

    def units(self, position: int, example: Example) -> float:
        return 1.0   # the term is a mean over the global batch's samples

    def teacher_ids(self, position: int) -> list[int] | None:
        """Record ``position``'s conversation with the scene line in place of ``<image>``, tokenised;
        None for a text-only record (it has nothing to distil and trains on its tokens alone)."""
        if position not in self._ids:
            record = self.records[position]
            rid = record_id(record, position)
            if record.get("image") is None:
                self._ids[position] = None
                return None
            meta = record.get("meta")
            if not isinstance(meta, dict) or not {"size", "objects", "texts"} <= meta.keys():
                raise RecordError(rid, "scene distillation needs each record's 'meta' (the synthetic "
                                       "world's scene: size, objects, texts); this record has none. "
                                       "Set scene_distillation to 0 for data from outside the world")
            token = self.processor.config.image_token
            conversation = [dict(turn) for turn in record["conversations"]]
            first = next((turn for turn in conversation if token in str(turn.get("value", ""))), None)
            if first is None:   # an image without its tag: it goes first, as the processor puts it
                first = conversation[0]
                first["value"] = f"{token}\n{first.get('value', '')}"
            first["value"] = first["value"].replace(token, scene_line(meta), 1)
            self._ids[position] = self.processor.encode(conversation, [], self.template)[0]
        return self._ids[position]

    def loss(self, positions: Sequence[int], batch: Batch, output) -> AuxiliaryTerm:
        """Σ over the samples of loss_i, counted over the samples matched. A text-only sample, or one
        whose suffix does not match the teacher's tokens (e.g. it was truncated), adds nothing."""
        total, matched = self.distance(positions, batch, output.hidden_states)
        return AuxiliaryTerm(total, float(matched))

    def distance(self, positions: Sequence[int], batch: Batch, hidden_states: Sequence[torch.Tensor]
                 ) -> tuple[torch.Tensor, int]:
        """(Σ over samples of loss_i, number of samples matched)."""
        sequences = [self.teacher_ids(p) for p in positions]
        total = hidden_states[0].new_zeros(())
        rows = [row for row, sequence in enumerate(sequences) if sequence is not None]
        if not rows:
            return total, 0
        ids, mask, _ = pad_batch([(sequences[row], sequences[row]) for row in rows],
                                 self.processor.tokenizer.pad_token_id)
        device = hidden_states[0].device
        with torch.no_grad():
            teacher = self.teacher(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   output_hidden_states=True).hidden_states
        image_id = self.processor.image_token_id
        matched = 0
        for slot, row in enumerate(rows):
            sequence = sequences[row]
            length = int(batch.attention_mask[row].sum())
            student_ids = batch.input_ids[row, :length]
            images = (student_ids == image_id).nonzero()
            if len(images) == 0:
                continue
            start = int(images[-1]) + 1
            n = length - start
            if n <= 0 or n > len(sequence) or sequence[len(sequence) - n:] != student_ids[start:].tolist():
                continue
            offset = len(sequence) - n
            per_layer = []
            for student_h, teacher_h in zip(hidden_states[1:], teacher[1:]):   # each decoder layer's output
                target = teacher_h[slot, offset:offset + n].float()
                error = (student_h[row, start:length].float() - target).pow(2).mean()
                per_layer.append(error / target.pow(2).mean().clamp_min(1e-6))
            total = total + torch.stack(per_layer).mean()
            matched += 1
        return total, matched
