"""The functions behind ``meteor convert``: a LLaVA folder → a LLaVA-Meteor folder, a folder in the
format before 0.2 → the transformers-native one, and a LLaVA-Meteor folder → folders plain
transformers loads."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from meteor.adapters.llava.convert import from_llava
from meteor.adapters.llava.export import export_components
from meteor.model.configuration import MeteorConfig


def convert_llava(path: str | os.PathLike, out: str | os.PathLike, config: MeteorConfig | None = None,
                  vision: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                  overwrite: bool = False) -> Path:
    """``meteor convert --from-llava PATH --out OUT``: ``from_llava`` saved as a LLaVA-Meteor folder
    (``AutoModelForImageTextToText``, ``meteor eval`` and ``meteor train --model`` read it)."""
    from meteor.pretrained import save_pretrained

    model, processor = from_llava(path, config, vision, dtype)
    return save_pretrained(out, model, processor, overwrite=overwrite)


def upgrade_model(model_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """``meteor convert --upgrade MODEL --out OUT``: a folder in the format before 0.2
    (``meteor_config.json``, ``compressor.safetensors``, ``vision_tower/``, ``language_model/``)
    rewritten as one transformers folder, the same weights."""
    from meteor.pretrained import is_legacy_folder, load_pretrained, save_pretrained

    if not is_legacy_folder(model_dir):
        raise ValueError(f"{model_dir} is not in the format before 0.2 (it has no meteor_config.json, or it has "
                         f"a config.json already): nothing to upgrade")
    model, processor = load_pretrained(model_dir)
    return save_pretrained(out, model, processor, overwrite=overwrite)


def export_model(model_dir: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """``meteor convert --export MODEL --out OUT``: a saved LLaVA-Meteor model's components as
    transformers folders (``meteor.adapters.llava.export``)."""
    from meteor.pretrained import load_pretrained

    model, processor = load_pretrained(model_dir)
    return export_components(model, processor, out, overwrite=overwrite)
