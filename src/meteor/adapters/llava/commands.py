"""The functions behind ``meteor convert``: a LLaVA folder → a LLaVA-Meteor folder, and a
LLaVA-Meteor folder → folders plain transformers loads."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from meteor.model.configuration import MeteorConfig
from meteor.adapters.llava.export import export_components


def convert_llava(path: str | os.PathLike, out: str | os.PathLike, config: MeteorConfig | None = None,
                  vision: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                  overwrite: bool = False) -> Path:
    """``meteor convert --from-llava PATH --out OUT``: ``LlavaMeteor.from_llava`` saved as a LLaVA-Meteor
    folder (``LlavaMeteor.from_pretrained``, ``meteor eval`` and ``meteor train --model`` read it)."""
    from meteor.model.modeling import LlavaMeteor

    model, processor = LlavaMeteor.from_llava(path, config, vision, dtype)
    return model.save_pretrained(out, processor, overwrite=overwrite)


def export_model(model_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """``meteor convert --export MODEL --out OUT``: a saved LLaVA-Meteor model's components as
    transformers folders (``meteor.adapters.llava.export``)."""
    from meteor.model.modeling import LlavaMeteor

    model, processor = LlavaMeteor.from_pretrained(model_dir)
    return export_components(model, processor, out, overwrite=overwrite)
