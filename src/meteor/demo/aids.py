"""The demo's two training aids, as options of ``meteor train`` and of the demo's recipe.

Neither is in the paper, and both need each record's scene, which only the synthetic world writes
(``meta``): scene distillation (``meteor.demo.distill``) and glyph alignment
(``meteor.demo.glyphs``). Each is an auxiliary loss of the trainer (``meteor.train.auxiliary``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meteor.train.args import TrainConfigError
from meteor.train.auxiliary import AuxiliaryFactory
from meteor.demo.distill import SceneDistillation
from meteor.demo.glyphs import GlyphAlignment


@dataclass(frozen=True)
class TrainingAids:
    """The weights of the demo's auxiliary losses (0: off)."""

    scene_distillation: float = 0.0
    """Synthetic-world records only (they carry their scene in 'meta'): weight of a loss pulling the
    LLM's hidden states after the image towards those of a frozen copy of the starting LLM reading
    the scene as text (meteor.demo.distill). Not in the paper; 0 turns it off."""

    glyph_alignment: float = 0.0
    """Synthetic-world records only (they say where each text is in 'meta'): weight of a loss
    teaching the projector the world's texts: its output on each patch a text covers is classified,
    by cosine similarity to the LLM's input embeddings, as the text's token (meteor.demo.glyphs).
    Needs a token-wise projector (not the resampler). Not in the paper; 0 turns it off."""

    def __post_init__(self) -> None:
        for name in ("scene_distillation", "glyph_alignment"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise TrainConfigError(f"{name} must be a finite weight ≥ 0 (0: off), got {value!r}")

    def factories(self) -> list[AuxiliaryFactory]:
        """The auxiliary losses to pass to ``meteor.train.train``, in the order they are added."""
        built: list[AuxiliaryFactory] = []
        if self.scene_distillation > 0:
            built.append(SceneDistillation.factory(self.scene_distillation))
        if self.glyph_alignment > 0:
            built.append(GlyphAlignment.factory(self.glyph_alignment))
        return built
