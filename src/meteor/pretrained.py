"""A LLaVA-Meteor model and its processor as one folder: build, load, save; the Auto-class registration.

    import meteor
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained("path/to/folder")     # transformers' way
    processor = AutoProcessor.from_pretrained("path/to/folder")

    from meteor.pretrained import build, load_pretrained, save_pretrained
    model, processor = build(vision="clip-vit-large-patch14-336", language_model="vicuna-13b-v1.5",
                             tokenizer="vicuna-13b-v1.5", config=MeteorConfig())   # the paper's recipe
    model, processor = load_pretrained("path/to/folder")        # also the format before 0.2
    save_pretrained("path/to/new", model, processor)            # written aside, moved into place

The folder is laid out as llava-hf's (docs/design.md, "The folder"): ``config.json``
(``model_type`` "llava_meteor"), ``model.safetensors`` (sharded with an index above
``MAX_SHARD_SIZE``), the tokenizer's files, ``preprocessor_config.json``, ``processor_config.json``,
``chat_template.jinja`` and ``generation_config.json``. A folder in the format before this one
(``meteor_config.json``, ``compressor.safetensors``, ``vision_tower/``, ``language_model/``) still
loads through ``load_pretrained``, with a note; ``meteor convert --upgrade`` rewrites it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meteor.model.configuration import CONFIG_NAME, ConfigError, MeteorConfig

logger = logging.getLogger(__name__)

MAX_SHARD_SIZE = "5GB"
"""Weights above this size are written as several safetensors files with an index (transformers')."""
COMPRESSOR_FILE = "compressor.safetensors"
"""The projector's weights alone: what stage 1 hands to stage 2, and the old format's file."""
LEGACY_VISION_DIR, LEGACY_LANGUAGE_DIR = "vision_tower", "language_model"

_registered = False


def register_with_transformers() -> None:
    """Register ``LlavaMeteorConfig``, ``LlavaMeteorForConditionalGeneration``, ``LlavaMeteorProcessor``
    and ``LlavaMeteorImageProcessor`` with transformers' Auto classes (``AutoConfig``, ``AutoModel``,
    ``AutoModelForImageTextToText``, ``AutoModelForCausalLM``, ``AutoProcessor``,
    ``AutoImageProcessor``). Idempotent; ``import meteor`` arranges for it to run as soon as
    transformers' Auto classes are imported."""
    global _registered
    if _registered:
        return
    _registered = True
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText,
                              AutoProcessor)

    from meteor.model.configuration_llava_meteor import MODEL_TYPE, LlavaMeteorConfig
    from meteor.model.modeling import LlavaMeteorForConditionalGeneration, LlavaMeteorModel
    from meteor.processing.image_processor import LlavaMeteorImageProcessor
    from meteor.processing.processor import LlavaMeteorProcessor

    AutoConfig.register(MODEL_TYPE, LlavaMeteorConfig, exist_ok=True)
    AutoModel.register(LlavaMeteorConfig, LlavaMeteorModel, exist_ok=True)
    AutoModelForImageTextToText.register(LlavaMeteorConfig, LlavaMeteorForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(LlavaMeteorConfig, slow_image_processor_class=LlavaMeteorImageProcessor,
                                exist_ok=True)
    AutoProcessor.register(LlavaMeteorConfig, LlavaMeteorProcessor, exist_ok=True)


# --- building from parts ------------------------------------------------------------------------------

def build(vision, language_model, tokenizer, config: MeteorConfig | None = None, dtype: torch.dtype | None = None,
          base_size: int | None = None):
    """A new model and its processor from a vision tower and a causal LM (the paper's recipe: a CLIP
    folder and a Vicuna folder); the compressor is freshly initialised, everything else is the
    parts' own weights. ``vision``: a CLIP / SigLIP / DINOv2 folder, a ``VisionTower`` or a
    transformers vision model; ``language_model``: a causal-LM folder or model; ``tokenizer``: a
    folder or a tokenizer. ``base_size``: the side in pixels that UHD slicing sizes every view to
    (about ``base_size``² pixels each), a multiple of the patch size; None: the tower's native side
    (336 for CLIP ViT-L/14-336, 518 for DINOv2), whose position table the tower interpolates to any
    other. The processor saved with the model keeps it."""
    from transformers import AutoTokenizer

    from meteor.processing.processor import build_processor

    config = config or MeteorConfig()
    tower = _vision_tower(vision, config, dtype)
    causal_lm = _causal_lm(language_model, dtype)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if base_size is None:
        base_size = tower.image_size
    elif isinstance(base_size, bool) or not isinstance(base_size, int) or base_size < tower.patch_size \
            or base_size % tower.patch_size:
        raise ValueError(f"base_size must be a positive multiple of the tower's {tower.patch_size}-pixel patch, got "
                         f"{base_size!r}; None keeps the tower's native {tower.image_size} px")
    processor = build_processor(tokenizer, config, tower.patch_size, base_size, tower.image_mean, tower.image_std)
    model = assemble(tower, causal_lm, processor.config, processor.image_token_id, dtype)
    processor.set_config(model.config.meteor)              # the same options, with the parts' widths
    return model, processor


def assemble(tower, causal_lm, config: MeteorConfig, image_token_id: int, dtype: torch.dtype | None = None):
    """The model made of a ``VisionTower``'s encoder and a causal LM's decoder and head (their weights,
    not copies) and a freshly initialised compressor."""
    from meteor.model.configuration_llava_meteor import LlavaMeteorConfig
    from meteor.model.modeling import LlavaMeteorForConditionalGeneration
    from meteor.model.projectors import build_projector

    hf_config = LlavaMeteorConfig.from_parts(tower.encoder.config, causal_lm.config, config,
                                             image_token_id=image_token_id)
    if not hf_config.text_config.architectures:   # so tools (vLLM) find the causal LM class of the decoder
        hf_config.text_config.architectures = [type(causal_lm).__name__]
    with torch.device("meta"):                  # a shell: every part is replaced below
        model = LlavaMeteorForConditionalGeneration(hf_config)
    model.model.vision_tower = tower.encoder
    model.model.language_model = causal_lm.get_decoder()
    model.lm_head = causal_lm.get_output_embeddings()
    model.model.multi_modal_projector = build_projector(hf_config.compressor_config)
    model.model.multi_modal_projector.to(next(causal_lm.parameters()).device)
    if dtype is not None:
        model.model.multi_modal_projector.to(dtype)
    return model.eval()


def _vision_tower(vision, config: MeteorConfig, dtype):
    from meteor.model.vision import VisionTower

    if isinstance(vision, VisionTower):
        if vision.visual_expert != config.visual_expert:
            raise ValueError(f"the vision tower computes the visual expert {vision.visual_expert!r} but the "
                             f"config asks for {config.visual_expert!r}: build the tower with "
                             f"visual_expert={config.visual_expert!r} or set MeteorConfig.visual_expert")
        return vision
    kwargs = dict(feature_layer=config.feature_layer, attention_layer=config.attention_layer,
                  visual_expert=config.visual_expert)
    if isinstance(vision, nn.Module):
        return VisionTower.from_model(vision, dtype=dtype, **kwargs)
    return VisionTower.from_pretrained(vision, dtype=dtype, **kwargs)


def _causal_lm(language_model, dtype):
    from transformers import AutoModelForCausalLM

    if isinstance(language_model, nn.Module):
        return language_model
    path = Path(language_model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no causal language model at {path}: expected a Hugging Face folder "
                                f"with config.json and weights (e.g. a local Vicuna checkout)")
    return AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))


# --- loading ------------------------------------------------------------------------------------------

def is_legacy_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is in the format before the transformers-native one."""
    folder = Path(folder)
    return (folder / CONFIG_NAME).is_file() and not (folder / "config.json").is_file()


def load_pretrained(folder: str | os.PathLike, dtype: torch.dtype | None = None,
                    compressor_overrides: dict[str, Any] | None = None, **kwargs):
    """(model, processor) from a saved folder, in either format.

    ``compressor_overrides``: CompressorConfig fields to change at load time, e.g.
    ``{"projector": "cls_topk", "tokens_per_slice": 16}`` to compress an all-tokens LLaVA-1.5 model
    without training (its ``mlp.*`` weights are what cls_topk uses), or ``{"tokens_per_slice": 16,
    "expert_mode": "visual"}``. The new projector's weights must all be in the saved folder with the
    same shapes; saved weights it does not use are left out (and logged). ``kwargs`` go to
    transformers' ``from_pretrained`` (``device_map``, ``attn_implementation``, …)."""
    from meteor.model.modeling import LlavaMeteorForConditionalGeneration
    from meteor.processing.processor import LlavaMeteorProcessor

    folder = Path(folder)
    if is_legacy_folder(folder):
        model, processor = _load_legacy(folder, dtype)
    else:
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = LlavaMeteorForConditionalGeneration.from_pretrained(folder, **kwargs)
        processor = LlavaMeteorProcessor.from_pretrained(folder)
        _check_agreement(model, processor, folder)
    if compressor_overrides:
        _override_compressor(model, processor, compressor_overrides, folder)
    return model, processor


def _check_agreement(model, processor, folder: Path) -> None:
    """The model's options and its processor's must agree (both were saved from one model)."""
    if processor.config != model.config.meteor:
        ours, theirs = model.config.meteor.to_dict(), processor.config.to_dict()
        differ = sorted(key for key in ours if ours[key] != theirs.get(key))
        raise ConfigError(f"{folder}: config.json and processor_config.json disagree on {differ}: the files come "
                          f"from different models; save the model and its processor together (meteor.pretrained."
                          f"save_pretrained)")
    if processor.image_token_id != model.config.image_token_id:
        raise ConfigError(f"{folder}: the tokenizer's {processor.config.image_token} is id {processor.image_token_id} "
                          f"but config.json says image_token_id {model.config.image_token_id}: the tokenizer files "
                          f"belong to another model")


def _load_legacy(folder: Path, dtype):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    logger.warning("%s is in LLaVA-Meteor's format before 0.2 (meteor_config.json); it loads, and `meteor convert "
                   "--upgrade %s --out NEW` rewrites it as one transformers folder", folder, folder)
    config = MeteorConfig.load(folder)
    model, processor = build(folder / LEGACY_VISION_DIR, folder / LEGACY_LANGUAGE_DIR,
                             AutoTokenizer.from_pretrained(folder), config, dtype)
    weights_file = folder / COMPRESSOR_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"{folder} lacks {COMPRESSOR_FILE}, the compressor's weights of this format")
    model.compressor.load_state_dict(load_file(str(weights_file)))
    return model, processor


def _override_compressor(model, processor, overrides: dict[str, Any], folder: Path) -> None:
    """Replace the model's projector with the one ``overrides`` describe, made of the saved weights."""
    from meteor.model.projectors import build_projector

    compressor = model.config.compressor_config
    known = {f.name for f in dataclasses.fields(compressor)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown compressor option(s) {unknown} to override; known: {sorted(known)}")
    fixed = sorted(set(overrides) & {"vision_width", "text_width"})
    if fixed:
        raise ConfigError(f"{fixed} are the widths of the vision tower and the LLM, read from them: they cannot be "
                          f"overridden")
    new = dataclasses.replace(compressor, **overrides)
    saved = model.compressor.state_dict()
    projector = build_projector(new).to(next(iter(saved.values())).dtype)
    own = projector.state_dict()
    missing = sorted(name for name in own if name not in saved)
    if missing:
        raise ValueError(f"the {compressor.projector!r} compressor saved in {folder} has no weights for the "
                         f"{new.projector!r} projector's {missing[:4]}{' …' if len(missing) > 4 else ''}: override to "
                         f"a projector made of the saved one's parts (the token-wise ones share mlp.*)")
    mismatched = [f"{name} {tuple(saved[name].shape)} vs {tuple(own[name].shape)}" for name in own
                  if saved[name].shape != own[name].shape]
    if mismatched:
        raise ValueError(f"the saved compressor's weights do not fit the {new.projector!r} projector: {mismatched[:3]}")
    unused = sorted({name.split(".")[0] for name in saved if name not in own})
    if unused:
        logger.warning("the %r projector loaded from %s's %r compressor leaves its %s weights unused", new.projector,
                       folder, compressor.projector, ", ".join(unused))
    projector.load_state_dict({name: saved[name] for name in own}, strict=True)
    meteor = dataclasses.replace(model.config.meteor, compressor=new)
    model.model.multi_modal_projector = projector.to(model.device)
    model.config = model.model.config = model.config.with_meteor(meteor)
    processor.set_config(meteor)


# --- saving -------------------------------------------------------------------------------------------

def save_pretrained(folder: str | os.PathLike, model, processor=None, overwrite: bool = False,
                    max_shard_size: str = MAX_SHARD_SIZE) -> Path:
    """Write ``model`` (transformers' ``save_pretrained``: config.json, safetensors, generation config)
    and ``processor`` into one folder. It is written beside its destination and moved into place at
    the end, so an interrupted save never leaves a half-written model; an existing non-empty folder is
    replaced only with ``overwrite=True``."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty: choose another folder or pass "
                              f"overwrite=True to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if processor is not None:
            if processor.config != model.config.meteor:     # e.g. a template set on one of them
                model.config = model.model.config = model.config.with_meteor(processor.config)
            processor.save_pretrained(staging)
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def save_compressor(model, path: str | os.PathLike) -> Path:
    """The projector's weights alone, as one safetensors file (LLaVA's "projector file")."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.compressor.state_dict().items()}, str(path),
              metadata={"format": "pt"})
    return Path(path)


def load_compressor(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compressor weights not found at {path}")
    return load_file(str(path))


def _replace_folder(staging: Path, folder: Path) -> None:
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(folder)


__all__ = ["COMPRESSOR_FILE", "assemble", "build", "is_legacy_folder", "load_compressor", "load_pretrained",
           "register_with_transformers", "save_compressor", "save_pretrained"]
