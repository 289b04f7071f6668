"""What the vLLM plugin reads from a LLaVA-Meteor folder's config.json, and what it refuses.

vLLM loads every model config through transformers' ``AutoConfig``; ``register_config`` makes it read
model_type "llava_meteor" as the package's ``LlavaMeteorConfig``. ``serving_config`` checks a loaded
config and refuses, naming every reason, what the plugin cannot serve. No vLLM import here.
"""

from __future__ import annotations

from dataclasses import dataclass

from meteor.model.configuration import ConfigError, MeteorConfig

MODEL_TYPE = "llava_meteor"
ARCHITECTURE = "LlavaMeteorForConditionalGeneration"
VISION_MODEL_TYPES = ("clip_vision_model", "clip", "siglip_vision_model", "siglip", "dinov2", "dinov2_with_registers")
"""The towers the plugin runs: those ``meteor.model.vision.VisionTower`` wraps (CLIP, SigLIP, DINOv2)."""
CHAT_PLACEHOLDER = "<image>"
"""What vLLM's chat API writes into the prompt for each image (the model class's placeholder)."""


class UnservableFolder(ValueError):
    """A folder the vLLM plugin cannot serve; the message says why and what to do."""


def register_config() -> None:
    """Make ``AutoConfig`` read model_type "llava_meteor" (a no-op when it already can)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if MODEL_TYPE not in CONFIG_MAPPING:
        from meteor.model.configuration_llava_meteor import LlavaMeteorConfig

        AutoConfig.register(MODEL_TYPE, LlavaMeteorConfig, exist_ok=True)


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
    """The model's options (validated by MeteorConfig, the compressor's widths those of the parts)."""
    image_token_id: int
    patch_size: int
    base_size: int
    """The tower's native view side in px: ``image_size`` rounded down to whole patches (the folder's
    processor may slice to another side: ``MeteorProcessingInfo`` reads that one)."""
    max_view_patches: int
    """(base_size / patch_size)²: the patches of one view at the tower's native side."""


def serving_config(hf_config) -> ServingConfig:
    """The folder's config as the plugin uses it; ``UnservableFolder`` naming every reason it cannot."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type != MODEL_TYPE:
        raise UnservableFolder(
            f"the folder's model_type is {model_type!r}, not {MODEL_TYPE!r}: the LLaVA-Meteor vLLM plugin "
            f"serves folders saved by LlavaMeteorForConditionalGeneration (meteor.pretrained.save_pretrained); "
            f"a llava-hf folder (model_type 'llava') is served by vLLM's own LlavaForConditionalGeneration")
    vision, text = hf_config.vision_config, hf_config.text_config
    problems = []
    vision_type = getattr(vision, "model_type", None)
    if vision_type not in VISION_MODEL_TYPES:
        problems.append(f"its vision tower is {vision_type!r}; the plugin runs CLIP, SigLIP and DINOv2 towers "
                        f"(vision_config.model_type one of {', '.join(VISION_MODEL_TYPES)})")
    if not text_architectures(text):
        problems.append(f"its text_config names no architectures and transformers knows no causal LM of "
                        f"model_type {getattr(text, 'model_type', None)!r}, so vLLM cannot pick its "
                        f"implementation of the language model: add \"architectures\" (e.g. "
                        f"[\"LlamaForCausalLM\"]) to text_config")
    image_token_id = getattr(hf_config, "image_token_id", None)
    if not isinstance(image_token_id, int) or isinstance(image_token_id, bool):
        problems.append(f"its image_token_id is {image_token_id!r}; it must be the tokenizer's id of the "
                        f"image placeholder")
    meteor = None
    try:
        meteor = hf_config.meteor
    except (ConfigError, TypeError) as err:
        problems.append(f"its LLaVA-Meteor options are invalid ({err})")
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
        if meteor.visual_expert == "pooling_head" and vision_type not in ("siglip_vision_model", "siglip"):
            problems.append(f"visual_expert='pooling_head' reads SigLIP's attention-pooling head and a "
                            f"{vision_type!r} tower has none (use 'cls' or 'attention_received')")
    if problems:
        raise UnservableFolder("the LLaVA-Meteor vLLM plugin cannot serve this folder: " + "; ".join(problems))
    patch_size = int(vision.patch_size)
    side = int(vision.image_size) // patch_size
    return ServingConfig(meteor=meteor, image_token_id=image_token_id, patch_size=patch_size,
                         base_size=side * patch_size, max_view_patches=side * side)
