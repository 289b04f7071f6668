"""``LlavaMeteorConfig``: LLaVA-Meteor's transformers configuration (``model_type`` "llava_meteor").

Laid out as transformers' ``LlavaConfig``: ``vision_config`` and ``text_config`` are the vision
tower's and the language model's own configurations (any that ``AutoModel.from_config`` builds:
CLIP, SigLIP, … and LLaMA, Qwen2, …). Beside them sit every option of ``MeteorConfig``
(``meteor.model.configuration``), validated as it validates them: the compressor's under
``compressor`` (a dict of ``CompressorConfig`` fields, its widths C and D read from the two
sub-configurations), the rest at the top level, and ``image_token_id``, the tokenizer's id of the
``<image>`` placeholder. ``config.meteor`` gives them back as one ``MeteorConfig``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from meteor.model.configuration import CompressorConfig, ConfigError, MeteorConfig

MODEL_TYPE = "llava_meteor"
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(MeteorConfig) if f.name != "compressor")
"""MeteorConfig's options other than the compressor's, stored at the top level of config.json."""


class LlavaMeteorConfig(PreTrainedConfig):
    model_type = MODEL_TYPE
    sub_configs = {"vision_config": "AutoConfig", "text_config": "AutoConfig"}

    def __init__(self, vision_config=None, text_config=None, compressor: dict | CompressorConfig | None = None,
                 image_token_id: int | None = None, **kwargs):
        self.vision_config = _sub_config(vision_config, "clip_vision_model", "vision_config")
        self.text_config = _sub_config(text_config, "llama", "text_config")
        options = {name: kwargs.pop(name) for name in MODEL_FIELDS if name in kwargs}
        if isinstance(compressor, CompressorConfig):
            compressor = dataclasses.asdict(compressor)
        compressor = dict(compressor or {})
        compressor["vision_width"] = self.vision_config.hidden_size
        compressor["text_width"] = self.text_config.hidden_size
        meteor = MeteorConfig(compressor=compressor, **options)        # validates every option
        self.compressor = dataclasses.asdict(meteor.compressor)
        for name in MODEL_FIELDS:
            setattr(self, name, getattr(meteor, name))
        self.image_token_id = image_token_id
        kwargs.setdefault("tie_word_embeddings", bool(getattr(self.text_config, "tie_word_embeddings", False)))
        super().__init__(**kwargs)

    @property
    def meteor(self) -> MeteorConfig:
        """The LLaVA-Meteor options as one ``MeteorConfig``."""
        return MeteorConfig(compressor=CompressorConfig(**self.compressor),
                            **{name: getattr(self, name) for name in MODEL_FIELDS})

    @property
    def compressor_config(self) -> CompressorConfig:
        return CompressorConfig(**self.compressor)

    @classmethod
    def from_parts(cls, vision_config, text_config, meteor: MeteorConfig | None = None,
                   image_token_id: int | None = None, **kwargs) -> "LlavaMeteorConfig":
        """From the two sub-configurations and a ``MeteorConfig`` (the paper's defaults when None)."""
        meteor = meteor or MeteorConfig()
        options = {name: getattr(meteor, name) for name in MODEL_FIELDS}
        return cls(vision_config=vision_config, text_config=text_config, compressor=dataclasses.asdict(meteor.compressor),
                   image_token_id=image_token_id, **options, **kwargs)

    def with_meteor(self, meteor: MeteorConfig) -> "LlavaMeteorConfig":
        """A copy with other LLaVA-Meteor options (the sub-configurations and the rest kept)."""
        data = self.to_dict()
        data.update({name: getattr(meteor, name) for name in MODEL_FIELDS})
        data["compressor"] = dataclasses.asdict(meteor.compressor)
        data.pop("model_type", None)
        data.pop("transformers_version", None)
        return type(self)(**data)


def _sub_config(value: Any, default_type: str, name: str) -> PreTrainedConfig:
    """A sub-configuration from a config object, a dict (its ``model_type`` picks the class) or None."""
    if isinstance(value, PreTrainedConfig):
        return copy.deepcopy(value)     # ours to change (transformers sets attention options on sub-configs)
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{name} must be a transformers configuration or a dict, got {type(value).__name__}")
    data = dict(value or {})
    model_type = data.pop("model_type", default_type)
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{name} has model_type {model_type!r}, which transformers does not know: is it "
                          f"from a newer transformers than this one?")
    return CONFIG_MAPPING[model_type](**data)


__all__ = ["LlavaMeteorConfig", "MODEL_FIELDS", "MODEL_TYPE"]
