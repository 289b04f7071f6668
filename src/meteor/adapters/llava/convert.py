"""A LLaVA checkpoint → a LLaVA-Meteor model: its tower, its LLM and tokenizer, its projector's
weights as the initial weights of Meteor's projector MLP (the same C → D → D shape).

    model, processor = from_llava("llava-1.5-7b-hf")          # the LLaVA as it is
    model, processor = from_llava("llava-v1.5-7b", vision="clip-vit-large-patch14-336",
                                  config=MeteorConfig(compressor=CompressorConfig(projector="cls_topk",
                                                                                  tokens_per_slice=64)))

With ``projector="mlp"`` (the default: every token, one view) the converted model computes what
the original computes. With ``"cls_topk"`` it keeps K tokens per view by the visual expert alone,
without any training (FasterVLM's setting). With ``"meteor"`` the MLP starts from LLaVA's and
Flash Global Fusion starts fresh: stage 1 then trains the fusion (and whatever else is unfrozen).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from meteor.model.configuration import CompressorConfig, MeteorConfig
from meteor.adapters.llava.checkpoint import LlavaSource, inspect_llava, load_llava

logger = logging.getLogger(__name__)


def meteor_config_for(source: LlavaSource, config: MeteorConfig | None = None) -> MeteorConfig:
    """The MeteorConfig of the converted model: ``config`` (default: LLaVA's own computation,
    the all-tokens MLP on one view, ``max_slices`` 1) with the checkpoint's feature layer, and for a
    tower without CLS the visual expert "attention_received" unless ``config`` names one."""
    if config is None:
        config = MeteorConfig(compressor=CompressorConfig(projector="mlp", tokens_per_slice=None), max_slices=1,
                              visual_expert="cls" if source.has_cls else "attention_received")
    if config.feature_layer != source.feature_layer:
        logger.info("feature_layer %s replaced by the checkpoint's %s", config.feature_layer, source.feature_layer)
    return dataclasses.replace(config, feature_layer=source.feature_layer)


def load_projector_mlp(compressor: torch.nn.Module, projector: dict[str, torch.Tensor], source: str = "LLaVA") -> None:
    """Copy LLaVA's mlp2x_gelu weights into the projector's ``mlp`` (``Mlp2xGelu``), exactly."""
    mlp = getattr(compressor, "mlp", None)
    if mlp is None:
        from meteor.model.projectors import TOKENWISE

        raise ValueError(f"the {type(compressor).__name__} projector has no token-wise MLP to start from "
                         f"{source}'s mlp2x_gelu: choose one of {', '.join(TOKENWISE)}")
    own = mlp.state_dict()
    for name, tensor in projector.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"{source}'s projector {name} has shape {tuple(tensor.shape)} but Meteor's MLP has "
                             f"{tuple(own[name].shape)}: leave projector_hidden None (= the LLM width)")
    mlp.load_state_dict(projector, strict=True)


def read_llava_for_meteor(path: str | os.PathLike, config: MeteorConfig | None = None,
                          vision: str | os.PathLike | None = None, dtype: torch.dtype | None = None):
    """What ``from_llava`` builds from: (the converted model's MeteorConfig, the loaded
    LlavaParts). The folder is checked from its config files before any weight is read."""
    source = inspect_llava(path, vision)
    for note in source.notes:
        logger.warning("%s: %s", source.folder, note)
    config = meteor_config_for(source, config)
    return config, load_llava(source, config, dtype)


def from_llava(path: str | os.PathLike, config: MeteorConfig | None = None, vision: str | os.PathLike | None = None,
               dtype: torch.dtype | None = None):
    """(model, processor): a LLaVA-Meteor ``LlavaMeteorForConditionalGeneration`` from a local llava-hf
    (``LlavaForConditionalGeneration``) or original LLaVA-1.5 (``LlavaLlamaForCausalLM``) folder: its
    vision tower, language model and tokenizer, and its mlp2x_gelu projector as the initial weights
    of the projector's MLP. ``config`` None keeps LLaVA's own computation (projector "mlp", every
    token, one view); the feature layer is always the checkpoint's. ``vision``: the local CLIP folder
    an original LLaVA-1.5 folder names by hub id in ``mm_vision_tower``."""
    from meteor.pretrained import build

    config, parts = read_llava_for_meteor(path, config, vision, dtype)
    model, processor = build(parts.vision, parts.language_model, parts.tokenizer, config, dtype)
    load_projector_mlp(model.compressor, parts.projector, str(path))
    return model, processor
