"""What the vLLM plugin reads from a LLaVA-Meteor folder's config.json, and what it refuses.

``LlavaMeteorConfig`` here is the transformers configuration of model_type "llava_meteor" that the
plugin registers with ``AutoConfig`` when the package does not provide one, so that vLLM (which loads
every config through ``AutoConfig``) can read the folder. It holds the vision tower's and the language
model's own configs (``vision_config``, ``text_config``, as llava-hf's ``LlavaConfig``) and Meteor's
fields as config.json writes them.

``serving_config`` turns it into the package's ``MeteorConfig`` (every field validated as everywhere
else) and refuses, naming the reason, what the plugin cannot serve.
"""

from __future__ import annotations

from dataclasses import dataclass

from meteor.model.configuration import CompressorConfig, ConfigError, MeteorConfig

MODEL_TYPE = "llava_meteor"
ARCHITECTURE = "LlavaMeteorForConditionalGeneration"
VISION_MODEL_TYPES = ("clip_vision_model", "clip", "siglip_vision_model", "siglip")
"""The towers the plugin runs: those ``meteor.model.vision.VisionTower`` wraps (CLIP, SigLIP)."""
CHAT_PLACEHOLDER = "<image>"
"""What vLLM's chat API writes into the prompt for each image (the model class's placeholder)."""


class UnservableFolder(ValueError):
    """A folder the vLLM plugin cannot serve; the message says why and what to do."""


def config_class() -> type:
    """The transformers config class of model_type "llava_meteor": the package's own
    (``meteor.model.configuration_llava_meteor``) when this version has it, else the one defined here."""
    try:
        from meteor.model.configuration_llava_meteor import LlavaMeteorConfig
    except ImportError:
        return _fallback_config_class()
    return LlavaMeteorConfig


def register_config() -> None:
    """Make ``AutoConfig`` read model_type "llava_meteor" (a no-op when it already can)."""
    from transformers import AutoConfig, CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, config_class(), exist_ok=True)


_FALLBACK: type | None = None


def _fallback_config_class() -> type:
    # Defined on first use: the plugin's entry point runs in every vLLM process and stays cheap.
    global _FALLBACK
    if _FALLBACK is not None:
        return _FALLBACK
    from huggingface_hub.dataclasses import strict
    from transformers import AutoConfig, CONFIG_MAPPING, PreTrainedConfig

    @strict
    class LlavaMeteorConfig(PreTrainedConfig):
        """A LLaVA-Meteor folder's config.json: the tower's and the LLM's configs and Meteor's fields
        (``meteor.model.configuration.MeteorConfig`` documents each)."""

        model_type = MODEL_TYPE
        sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

        vision_config: dict | PreTrainedConfig | None = None
        text_config: dict | PreTrainedConfig | None = None
        compressor: dict | None = None
        feature_layer: int = -2
        attention_layer: int | None = None
        visual_expert: str = "cls"
        max_slices: int = 6
        image_token: str = "<image>"
        image_token_id: int | None = None
        slice_separator: str = ","
        row_separator: str = "\n"
        template: str = "auto"
        tie_word_embeddings: bool = False

        def __post_init__(self, **kwargs):
            for name in ("vision_config", "text_config"):
                value = getattr(self, name)
                if isinstance(value, dict):
                    if "model_type" not in value:
                        raise ValueError(f"config.json's {name} has no model_type: write the sub-model's "
                                         f"own config (its to_dict()) there")
                    setattr(self, name, CONFIG_MAPPING[value["model_type"]](**value))
            super().__post_init__(**kwargs)

    _FALLBACK = LlavaMeteorConfig
    return _FALLBACK


def text_architectures(text_config) -> list[str]:
    """The language model's class names: text_config's ``architectures``, else the causal-LM class
    transformers maps its model_type to (a config built in memory has no architectures)."""
    if getattr(text_config, "architectures", None):
        return list(text_config.architectures)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(text_config, "model_type", None))
    return [name] if isinstance(name, str) else []


@dataclass(frozen=True)
class ServingConfig:
    """What the plugin serves a folder with, read and checked once."""

    meteor: MeteorConfig
    """The model's options, validated by MeteorConfig and CompressorConfig (widths filled in)."""
    image_token_id: int
    patch_size: int
    base_size: int
    """The tower's native view side in px: ``image_size`` rounded down to whole patches."""
    max_view_patches: int
    """The most patches one view can have: (base_size / patch_size)²."""


def serving_config(hf_config) -> ServingConfig:
    """The folder's config as the plugin uses it; ``UnservableFolder`` naming every reason it cannot."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type != MODEL_TYPE:
        raise UnservableFolder(
            f"the folder's model_type is {model_type!r}, not {MODEL_TYPE!r}: the LLaVA-Meteor vLLM plugin "
            f"serves folders written by LlavaMeteorForConditionalGeneration.save_pretrained (a llava-hf "
            f"folder of model_type 'llava' is served by vLLM's own LlavaForConditionalGeneration)")
    vision, text = getattr(hf_config, "vision_config", None), getattr(hf_config, "text_config", None)
    problems = []
    vision_type = getattr(vision, "model_type", None)
    if vision_type not in VISION_MODEL_TYPES:
        problems.append(f"its vision tower is {vision_type!r}; the plugin runs CLIP and SigLIP towers "
                        f"(vision_config.model_type one of {', '.join(VISION_MODEL_TYPES)})")
    if text is None:
        problems.append("it has no text_config (the language model's own config)")
    elif not text_architectures(text):
        problems.append(f"its text_config names no architectures and transformers knows no causal LM of "
                        f"model_type {text.model_type!r}, so vLLM cannot pick its implementation of the "
                        f"language model: add \"architectures\" (e.g. [\"LlamaForCausalLM\"]) to text_config")
    image_token_id = getattr(hf_config, "image_token_id", None)
    if not isinstance(image_token_id, int) or isinstance(image_token_id, bool):
        problems.append(f"its image_token_id is {image_token_id!r}; it must be the tokenizer's id of "
                        f"{getattr(hf_config, 'image_token', '<image>')!r}")
    meteor = None
    try:
        compressor = dict(getattr(hf_config, "compressor", None) or {})
        if vision is not None and text is not None:
            compressor.update(vision_width=vision.hidden_size, text_width=text.hidden_size)
        meteor = MeteorConfig(
            compressor=CompressorConfig(**compressor),
            feature_layer=hf_config.feature_layer, attention_layer=hf_config.attention_layer,
            visual_expert=hf_config.visual_expert, max_slices=hf_config.max_slices,
            image_token=hf_config.image_token, slice_separator=hf_config.slice_separator,
            row_separator=hf_config.row_separator, template=hf_config.template)
    except (ConfigError, TypeError) as err:
        problems.append(f"its Meteor options are invalid ({err})")
    if meteor is not None:
        if meteor.image_token != CHAT_PLACEHOLDER:
            problems.append(f"its image_token is {meteor.image_token!r}; vLLM's chat API marks each image "
                            f"with the one placeholder the model class names, {CHAT_PLACEHOLDER!r}")
        if meteor.compressor.instruction == "question":
            problems.append("its compressor conditions the instruction token on the question "
                            "(instruction='question'), which needs the prompt's text around each image; "
                            "vLLM encodes images apart from their prompt, so only instruction='learned' "
                            "(the paper's) is served")
        if meteor.visual_expert == "cls" and vision_type in ("siglip_vision_model", "siglip"):
            problems.append("visual_expert='cls' needs a CLS token and a SigLIP tower has none "
                            "(use 'attention_received' or 'pooling_head')")
    if problems:
        raise UnservableFolder("the LLaVA-Meteor vLLM plugin cannot serve this folder: " + "; ".join(problems))
    patch_size = int(vision.patch_size)
    side = int(vision.image_size) // patch_size
    return ServingConfig(meteor=meteor, image_token_id=image_token_id, patch_size=patch_size,
                         base_size=side * patch_size, max_view_patches=side * side)
