"""Auxiliary losses: extra training terms added to the language-model loss, as plug-ins.

The trainer knows nothing about what a term measures. It asks each ``AuxiliaryLoss`` to look at
every record it reads (``prepare``), to say how many units the record brings to the term's
normaliser (``units``), and, after the forward pass of a micro-batch, for the term's sum over that
micro-batch (``loss``). It adds ``weight × sum / (units over the global batch)`` to the loss, so
the term is a mean over the global batch whatever the number of processes or micro-batches, as the
token loss is. What each term logs is a named sum and count, reduced across processes with the
trainer's other figures in one call.

The synthetic world's two training aids (``meteor.demo.distill``, ``meteor.demo.glyphs``) are
written this way; a new one is a class with these members, passed to ``meteor.train.train``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import torch

if TYPE_CHECKING:   # annotations only: the trainer's own modules import this one
    from meteor.train.data import Example, LlavaDataset
    from meteor.model.modeling import LlavaMeteorForConditionalGeneration
    from meteor.processing.processor import Batch


@dataclass
class AuxiliaryTerm:
    """One micro-batch's contribution of an auxiliary loss."""

    loss: torch.Tensor
    """The sum over the micro-batch (a scalar with gradients); the trainer scales it."""
    count: float
    """What the logged mean divides this term's sum by (samples matched, patches scored, …)."""
    sums: dict[str, float] = field(default_factory=dict)
    """Further sums to log over the same count, by the names the term's ``logged`` declares (e.g.
    the patches classified right)."""


@runtime_checkable
class AuxiliaryLoss(Protocol):
    """A loss added to the language-model loss during training."""

    name: str
    """Names the term in the logs: ``<name>`` (its mean), ``<name>_count`` and ``<name>_<sum>``."""
    weight: float
    """The term's weight in the total loss."""
    needs_hidden_states: bool
    """Whether ``loss`` reads the language model's hidden states (``output.hidden_states``)."""
    needs_views: bool
    """Whether ``loss`` reads the projector's per-view outputs (``output.views``)."""
    logged: tuple[str, ...]
    """The names of the further sums ``loss`` returns in ``AuxiliaryTerm.sums`` (declared up front:
    every process must reduce the same figures, even one whose micro-batches were all padding)."""

    def prepare(self, position: int, example: Example) -> None:
        """Called for each record a step reads, once it is encoded; raises ``RecordError`` (the
        record is then skipped and counted like any bad record) when the term cannot use it."""

    def units(self, position: int, example: Example) -> float:
        """The record's share of the term's normaliser (1 per sample, its patches, …)."""

    def loss(self, positions: Sequence[int], batch: Batch, output) -> AuxiliaryTerm:
        """The term over one micro-batch: ``positions`` are its records (in batch order), ``batch``
        what the model read, ``output`` the model's output (``LlavaMeteorCausalLMOutput``)."""


class AuxiliaryFactory(Protocol):
    """Builds an auxiliary loss once the run's model and data exist, before the model is wrapped
    for DDP or FSDP (so it may keep a copy of a part of the model, as a teacher)."""

    def __call__(self, model: LlavaMeteorForConditionalGeneration, dataset: LlavaDataset, template: str) -> AuxiliaryLoss: ...


def log_entries(name: str, loss_sum: float, count: float, sums: dict[str, float]) -> dict[str, float]:
    """What a term logs, from its global sums: its mean, its count, and each further sum's mean."""
    entries = {name: loss_sum / max(count, 1.0), f"{name}_count": int(count)}
    entries.update({f"{name}_{key}": value / max(count, 1.0) for key, value in sums.items()})
    return entries
