"""A LLaVA-Meteor model → folders plain transformers loads, one per component.

    OUT/language_model/   the causal LM and its tokenizer (AutoModelForCausalLM, AutoTokenizer)
    OUT/vision_tower/     the CLIP / SigLIP vision model and its image processor
                          (CLIPVisionModel / SiglipVisionModel, AutoImageProcessor)
    OUT/compressor.safetensors, OUT/meteor_config.json   the projector and the options, for reference

Nothing of Meteor is needed to load the first two: the language model keeps its vocabulary (the
``<image>`` placeholder is added by ``LlavaMeteorProcessor`` at load time and never reaches the LLM's
embedding table), and the tokenizer files are the ones the model was built from, copied as they are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from meteor.processing.processor import LlavaMeteorProcessor
from meteor.processing.tokenizer import save_tokenizer

EXPORT_LANGUAGE = "language_model"
EXPORT_VISION = "vision_tower"


def export_components(model, processor: LlavaMeteorProcessor, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model``'s language model (with the tokenizer), vision tower (with its image
    processor) and compressor into ``out`` (the layout above), each written to a scratch folder
    beside ``out`` and moved into place at the end."""
    from meteor.pretrained import COMPRESSOR_FILE

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: choose another folder or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        causal_lm(model).save_pretrained(staging / EXPORT_LANGUAGE)
        save_tokenizer(processor.tokenizer, staging / EXPORT_LANGUAGE, processor.config.image_token)
        model.model.tower.save_pretrained(staging / EXPORT_VISION)
        processor.config.save(staging)
        save_file({k: v.detach().contiguous().cpu() for k, v in model.compressor.state_dict().items()},
                  staging / COMPRESSOR_FILE, metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def causal_lm(model):
    """The model's decoder and head as the causal LM of its text configuration (e.g. a
    ``LlamaForCausalLM``), sharing their weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(model.config.text_config)
    setattr(lm, lm.base_model_prefix, model.language_model)
    lm.lm_head = model.lm_head
    return lm
