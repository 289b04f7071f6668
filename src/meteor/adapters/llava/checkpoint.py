"""Reading a LLaVA checkpoint folder: what it is (``inspect_llava``) and its parts (``load_llava``).

Two layouts, both local folders:

* **llava-hf** (transformers' ``LlavaForConditionalGeneration``): ``config.json`` with
  ``model_type`` "llava", a ``vision_config`` and a ``text_config``; the vision tower, the projector
  (``multi_modal_projector.linear_1`` / ``linear_2``: C → D, GELU, D → D) and the language model in
  the weights, the tokenizer (with ``<image>``) and ``preprocessor_config.json`` beside them.
  Weight names come in two generations: ``vision_tower.[vision_model.]…``, ``multi_modal_projector.…``,
  ``language_model.model.…``, ``language_model.lm_head.weight`` (what the hub's llava-hf folders and
  transformers 5's ``save_pretrained`` write), or ``model.vision_tower.…``,
  ``model.multi_modal_projector.…``, ``model.language_model.…``, ``lm_head.weight``; both are read.
  Features: ``hidden_states[vision_feature_layer]``, the CLS token dropped with
  ``vision_feature_select_strategy`` "default".
* **llava-1.5** (haotian-liu/LLaVA's ``LlavaLlamaForCausalLM``): a LLaMA ``config.json`` plus
  ``mm_vision_tower`` (a hub id such as openai/clip-vit-large-patch14-336: the tower is not in the
  folder), ``mm_projector_type`` "mlp2x_gelu" (``model.mm_projector.0`` / ``.2``),
  ``mm_vision_select_layer`` and ``mm_vision_select_feature`` "patch" (CLS dropped); the LLM's
  weights under ``model.…`` and ``lm_head.weight``; a sentencepiece LLaMA tokenizer without an image
  token (LLaVA splices its images in at id −200).

What Meteor does not reproduce is refused, naming the value: another projector type, several
feature layers, CLS kept as a token, LLaVA-NeXT's anyres tiling, image start/end tokens.
Differences that do not change the weights are reported as notes (``LlavaSource.notes``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from meteor.model.configuration import MeteorConfig
from meteor.model.vision import VisionTower
from meteor.adapters.llava.weights import CheckpointWeights

LlavaFormat = Literal["llava-hf", "llava-1.5"]

ORIGINAL_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
"""haotian-liu/LLaVA's model classes → the transformers model_type of their language model."""

_NEXT_MODEL_TYPES = ("llava_next", "llava_next_video", "llava_onevision", "vipllava", "video_llava")
_VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")
# LLaVA-1.5 config fields that describe the vision side, not the language model.
_ORIGINAL_EXTRAS = ("image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
                    "use_mm_proj", "tokenizer_model_max_length", "tokenizer_padding_side", "unfreeze_mm_vision_tower",
                    "s2", "s2_scales")

logger = logging.getLogger(__name__)


class UnsupportedCheckpoint(ValueError):
    """A LLaVA checkpoint with a setting Meteor does not reproduce; the message names it."""


@dataclass(frozen=True)
class LlavaSource:
    """What a LLaVA folder holds, read from its configuration files only (no weights)."""

    folder: Path
    format: LlavaFormat
    feature_layer: int
    """The vision hidden-states layer its projector reads (``vision_feature_layer`` /
    ``mm_vision_select_layer``), in the numbering of ``meteor.model.vision``."""
    text_config: Any
    """The language model's transformers config."""
    vision_config: Any
    """The vision tower's transformers config (llava-1.5: read from ``vision_folder``)."""
    vision_folder: Path | None = None
    """llava-1.5: the local CLIP folder the tower is loaded from; llava-hf: None (in the weights)."""
    notes: tuple[str, ...] = field(default=())
    """Where Meteor's inputs differ from the original model's, and choices it made."""

    @property
    def has_cls(self) -> bool:
        return self.vision_config.model_type == "clip_vision_model"


def inspect_llava(path: str | Path, vision: str | Path | None = None) -> LlavaSource:
    """Identify a local LLaVA folder and check that Meteor supports it, before any weight is read.

    ``vision``: for a llava-1.5 folder, the local folder of the vision tower its ``mm_vision_tower``
    names (needed unless that is itself an existing local path); not accepted for llava-hf, whose
    tower is in the checkpoint.
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        problem = "does not exist" if not folder.exists() else "has no config.json"
        raise FileNotFoundError(f"LLaVA checkpoint folder {folder} {problem}: give a local llava-hf folder "
                                f"(LlavaForConditionalGeneration) or an original LLaVA-1.5 folder")
    raw = json.loads(config_file.read_text())
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type in _NEXT_MODEL_TYPES:
        raise UnsupportedCheckpoint(
            f"{config_file}: model_type {model_type!r} (LLaVA-NeXT family: anyres tiling, image_newline) is "
            f"not supported; Meteor converts LLaVA-1.5-style checkpoints (one view, a 2-layer GELU projector)")
    if "mm_vision_tower" in raw:
        return _inspect_original(folder, raw, vision)
    if model_type == "llava" and "text_config" in raw:
        if vision is not None:
            raise ValueError(f"{folder} is a llava-hf checkpoint, which holds its own vision tower: "
                             f"give no vision folder (it is for original LLaVA-1.5 folders)")
        return _inspect_hf(folder, raw)
    raise UnsupportedCheckpoint(
        f"{config_file} is not a LLaVA checkpoint Meteor reads (model_type {model_type!r}, architectures "
        f"{architectures}): expected LlavaForConditionalGeneration (llava-hf) or LlavaLlamaForCausalLM "
        f"with mm_vision_tower (haotian-liu/LLaVA)")


def _inspect_hf(folder: Path, raw: dict) -> LlavaSource:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    notes: list[str] = []
    where = f"{folder / 'config.json'}"
    if config.projector_hidden_act != "gelu":
        raise UnsupportedCheckpoint(
            f"{where}: projector_hidden_act {config.projector_hidden_act!r}; Meteor's projector MLP is "
            f"LLaVA-1.5's mlp2x_gelu (exact GELU), so only 'gelu' converts")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise UnsupportedCheckpoint(
            f"{where}: vision_feature_layer {layer} concatenates several layers; Meteor reads one layer "
            f"(a single int such as -2)")
    vision_config = config.vision_config
    if vision_config.model_type not in _VISION_MODEL_TYPES:
        raise UnsupportedCheckpoint(
            f"{where}: the vision tower is {vision_config.model_type!r}; Meteor supports CLIP and SigLIP "
            f"towers ({', '.join(_VISION_MODEL_TYPES)})")
    strategy = config.vision_feature_select_strategy
    if vision_config.model_type == "clip_vision_model" and strategy != "default":
        raise UnsupportedCheckpoint(
            f"{where}: vision_feature_select_strategy {strategy!r} keeps CLIP's CLS token as a visual token; "
            f"Meteor compresses patch tokens only ('default')")
    if vision_config.model_type == "siglip_vision_model" and strategy != "full":
        raise UnsupportedCheckpoint(
            f"{where}: vision_feature_select_strategy {strategy!r} with a SigLIP tower drops its first patch "
            f"(SigLIP has no CLS token), which leaves no patch grid to select on; Meteor reads every "
            f"patch ('full')")
    if not config.multimodal_projector_bias:
        notes.append("the projector has no biases (multimodal_projector_bias false): Meteor's MLP gets zero biases")
    notes += _image_processor_notes(folder, vision_config)
    return LlavaSource(folder, "llava-hf", layer, config.text_config, vision_config, None, tuple(notes))


def _inspect_original(folder: Path, raw: dict, vision: str | Path | None) -> LlavaSource:
    from transformers import AutoConfig

    where = f"{folder / 'config.json'}"
    architecture = (raw.get("architectures") or ["?"])[0]
    if architecture not in ORIGINAL_ARCHITECTURES:
        raise UnsupportedCheckpoint(
            f"{where}: architecture {architecture!r}; Meteor converts haotian-liu/LLaVA's "
            f"{' and '.join(ORIGINAL_ARCHITECTURES)}")
    projector_type = raw.get("mm_projector_type", "linear")    # LLaVA's builder defaults to 'linear'
    if projector_type != "mlp2x_gelu":
        raise UnsupportedCheckpoint(
            f"{where}: mm_projector_type {projector_type!r}; Meteor's projector MLP has LLaVA-1.5's shape, "
            f"'mlp2x_gelu' (Linear, GELU, Linear), so only that type converts")
    checks = [("mm_vision_select_feature", "patch", "keeps CLS as a visual token; Meteor compresses patch tokens"),
              ("mm_patch_merge_type", "flat", "is LLaVA-NeXT's tiling layout"),
              ("mm_use_im_start_end", False, "wraps images in <im_start>/<im_end> tokens, which Meteor's layout has not"),
              ("s2", False, "is S²-wrapper multi-scale features")]
    for name, expected, why in checks:
        value = raw.get(name, expected)
        if value != expected:
            raise UnsupportedCheckpoint(f"{where}: {name} {value!r} {why}; supported: {expected!r}")
    aspect = raw.get("image_aspect_ratio", "square")
    if aspect == "anyres" or str(aspect).startswith("anyres"):
        raise UnsupportedCheckpoint(f"{where}: image_aspect_ratio {aspect!r} is LLaVA-NeXT's anyres tiling; "
                                    f"supported: 'pad' or 'square' (LLaVA-1.5)")
    layer = raw.get("mm_vision_select_layer")
    if not isinstance(layer, int):
        raise UnsupportedCheckpoint(f"{where}: mm_vision_select_layer is {layer!r}; expected one layer index (-2)")
    hub_name = raw["mm_vision_tower"]
    if vision is None:
        if not Path(hub_name).is_dir():
            raise FileNotFoundError(
                f"{where} names the vision tower {hub_name!r}, which LLaVA-1.5 checkpoints do not include; "
                f"download {hub_name} to a local folder (e.g. huggingface-cli download {hub_name} --local-dir "
                f"clip) and pass it: vision='clip' (meteor convert --vision clip)")
        vision = hub_name
    vision_folder = Path(vision)
    vision_config = AutoConfig.from_pretrained(vision_folder)
    if vision_config.model_type in ("clip", "siglip"):          # a full CLIP / SigLIP folder
        vision_config = vision_config.vision_config
    if vision_config.model_type != "clip_vision_model":
        raise UnsupportedCheckpoint(
            f"the vision folder {vision_folder} holds a {vision_config.model_type!r} model; LLaVA-1.5's "
            f"tower is CLIP ({hub_name})")
    expected_width = raw.get("mm_hidden_size")
    if expected_width is not None and expected_width != vision_config.hidden_size:
        raise ValueError(
            f"the vision folder {vision_folder} has width {vision_config.hidden_size} but {where} expects "
            f"mm_hidden_size {expected_width} (from {hub_name}): pass the tower the checkpoint was trained with")
    notes = []
    if aspect == "pad":
        notes.append("LLaVA-1.5 pads a non-square image to a square with the mean colour before resizing to the "
                     "tower's size (image_aspect_ratio 'pad'); Meteor's processor resizes the whole image to "
                     "about that area with its aspect ratio kept (and adds slices when max_slices > 1), so "
                     "only square images see exactly LLaVA's pixels")
    text_config = _original_text_config(raw, ORIGINAL_ARCHITECTURES[architecture])
    return LlavaSource(folder, "llava-1.5", layer, text_config, vision_config, vision_folder, tuple(notes))


def _original_text_config(raw: dict, model_type: str):
    """The language model's own config from a LLaVA-1.5 config.json: its LLaMA / Mistral fields
    (legacy ``rope_theta`` / ``rope_scaling`` included), without the mm_* and image fields."""
    from transformers import AutoConfig

    config_class = type(AutoConfig.for_model(model_type))
    known = set(config_class().to_dict()) | {"rope_theta", "rope_scaling", "torch_dtype"}
    skip = {"model_type", "architectures", "transformers_version", "_name_or_path"}
    values = {key: value for key, value in raw.items()
              if key in known and key not in skip and not key.startswith("mm_") and key not in _ORIGINAL_EXTRAS}
    return config_class(**values)


def _image_processor_notes(folder: Path, vision_config) -> list[str]:
    """Notes on the llava-hf folder's image processor where it differs from what Meteor does."""
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return [f"{folder} has no preprocessor_config.json: the tower's usual normalisation is used"]
    settings = json.loads(file.read_text())
    notes = []
    patch, side_px = vision_config.patch_size, vision_config.image_size
    if side_px % patch:
        covered = side_px // patch * patch
        notes.append(f"the tower's {side_px} px are {side_px // patch} whole patches of {patch} px: transformers "
                     f"resizes to {side_px} px and the encoder ignores the last {side_px - covered} px, Meteor's "
                     f"processor resizes views to {covered} px")
    crop = settings.get("crop_size") or settings.get("size") or {}
    side = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
    if side is not None and side != vision_config.image_size:
        notes.append(f"the image processor crops to {side} px but the tower's native size is "
                     f"{vision_config.image_size} px; Meteor uses the tower's")
    if settings.get("do_pad"):
        notes.append("the image processor pads images to a square first; Meteor's processor resizes with the "
                     "aspect ratio kept instead, so only square images see exactly the original's pixels")
    return notes


def read_normalisation(source: LlavaSource) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """image_mean / image_std of the checkpoint's image processor (llava-hf's folder, or the
    llava-1.5 vision folder); None where it has none (the tower's usual ones then apply)."""
    folder = source.folder if source.format == "llava-hf" else source.vision_folder
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return None, None
    settings = json.loads(file.read_text())
    mean, std = settings.get("image_mean"), settings.get("image_std")
    return (tuple(mean) if mean else None), (tuple(std) if std else None)


# ------------------------------------------------------------------------------------ the weights

@dataclass
class LlavaParts:
    """A LLaVA checkpoint's parts, loaded: what ``LlavaMeteor.build`` and the projector need."""

    vision: VisionTower
    language_model: Any
    tokenizer: Any
    projector: dict[str, Tensor]
    """LLaVA's mlp2x_gelu under Meteor's ``Mlp2xGelu`` names: fc1.weight (D, C), fc1.bias (D),
    fc2.weight (D, D), fc2.bias (D)."""


def load_llava(source: LlavaSource, config: MeteorConfig, dtype: torch.dtype | None = None) -> LlavaParts:
    """Load the vision tower (with ``config``'s layers and visual expert), the language model, the
    tokenizer and the projector weights of an inspected LLaVA folder. ``dtype`` None: float32 for the
    tower, the checkpoint's own for the language model."""
    from transformers import AutoTokenizer

    weights = CheckpointWeights(source.folder)
    mean, std = read_normalisation(source)
    if source.format == "llava-hf":
        vision_state = _strip_vision_model(_first_prefix(weights, ("model.vision_tower.", "vision_tower."), "vision tower"))
        encoder = _from_state_dict(_vision_class(source.vision_config), source.vision_config, vision_state,
                                   dtype or torch.float32, "vision tower", source.folder)
        encoder.set_attn_implementation("sdpa")
        vision = VisionTower(encoder, config.feature_layer, config.attention_layer, mean, std, config.visual_expert)
        projector = _hf_projector(weights, source)
        base, head = (("model.language_model.", "lm_head.weight") if any(k.startswith("model.language_model.") for k in weights.keys())
                      else ("language_model.model.", "language_model.lm_head.weight"))
    else:
        vision = VisionTower.from_pretrained(source.vision_folder, config.feature_layer, config.attention_layer,
                                             dtype=dtype, visual_expert=config.visual_expert)
        if mean is not None:
            vision.image_mean, vision.image_std = tuple(mean), tuple(std)
        inside = _strip_vision_model(weights.with_prefix("model.vision_tower.vision_tower."))
        if inside:       # a checkpoint that trained its tower keeps it: those weights win over the folder's
            vision.clip.load_state_dict({k: v.to(vision.dtype) for k, v in inside.items()}, strict=True)
            logger.info("the vision tower's weights come from %s (it was trained), not %s", source.folder,
                        source.vision_folder)
        projector = _original_projector(weights, source)
        base, head = "model.", "lm_head.weight"
    language_model = _language_model(weights, source, base, head, dtype)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    return LlavaParts(vision, language_model, tokenizer, projector)


def _vision_class(vision_config):
    from transformers import CLIPVisionModel, SiglipVisionModel

    return CLIPVisionModel if vision_config.model_type == "clip_vision_model" else SiglipVisionModel


def _first_prefix(weights: CheckpointWeights, prefixes: tuple[str, ...], what: str) -> dict[str, Tensor]:
    for prefix in prefixes:
        found = weights.with_prefix(prefix)
        if found:
            return found
    raise ValueError(f"{weights.folder} has no {what} weights (looked for names starting with "
                     f"{' or '.join(prefixes)})")


def _strip_vision_model(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers 4 nested the tower under ``vision_model.``; transformers 5's classes do not."""
    return {(k[len("vision_model."):] if k.startswith("vision_model.") else k): v for k, v in state.items()}


def _hf_projector(weights: CheckpointWeights, source: LlavaSource) -> dict[str, Tensor]:
    state = _first_prefix(weights, ("model.multi_modal_projector.", "multi_modal_projector."), "projector")
    names = {"linear_1.weight": "fc1.weight", "linear_1.bias": "fc1.bias",
             "linear_2.weight": "fc2.weight", "linear_2.bias": "fc2.bias"}
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise UnsupportedCheckpoint(f"{source.folder}: the projector has weights {unknown} beyond linear_1 / "
                                    f"linear_2; only LLaVA-1.5's 2-layer MLP converts")
    projector = {names[k]: v for k, v in state.items()}
    for layer in ("fc1", "fc2"):                 # multimodal_projector_bias false: zero biases are exact
        projector.setdefault(f"{layer}.bias", torch.zeros(projector[f"{layer}.weight"].shape[0],
                                                          dtype=projector[f"{layer}.weight"].dtype))
    return projector


def _original_projector(weights: CheckpointWeights, source: LlavaSource) -> dict[str, Tensor]:
    state = weights.with_prefix("model.mm_projector.")
    expected = {"0.weight": "fc1.weight", "0.bias": "fc1.bias", "2.weight": "fc2.weight", "2.bias": "fc2.bias"}
    if set(state) != set(expected):
        raise UnsupportedCheckpoint(
            f"{source.folder}: the mm_projector weights are {sorted(state)}, not mlp2x_gelu's {sorted(expected)}")
    return {expected[k]: v for k, v in state.items()}


def _language_model(weights: CheckpointWeights, source: LlavaSource, base: str, head: str,
                    dtype: torch.dtype | None):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    lm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(source.text_config)]
    prefix = lm_class.base_model_prefix
    skip = ("mm_projector.", "vision_tower.", "image_newline")
    state = {f"{prefix}.{k}": v for k, v in weights.with_prefix(base).items()
             if not k.startswith(skip) and not k.endswith(".rotary_emb.inv_freq")}   # old LLaMA files saved inv_freq
    if head in weights:
        state["lm_head.weight"] = weights.get(head)
    return _from_state_dict(lm_class, source.text_config, state, dtype, "language model", source.folder)


def _from_state_dict(model_class, config, state: dict[str, Tensor], dtype: torch.dtype | None, what: str,
                     folder: Path):
    """``model_class`` built from ``config`` (a copy) with exactly the weights in ``state``."""
    from transformers.utils import logging as hf_logging

    config = type(config).from_dict(config.to_dict())
    loader_logger = hf_logging.get_logger("transformers.modeling_utils")
    quiet = _DropLoadReport()            # the problems are raised below, with the checkpoint's name
    loader_logger.addFilter(quiet)
    try:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model, info = model_class.from_pretrained(None, config=config, state_dict=state, output_loading_info=True,
                                                  **kwargs)
    finally:
        loader_logger.removeFilter(quiet)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info["missing_keys"]) - tied)
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"the {what} weights in {folder} do not fit a {model_class.__name__} of its config: missing "
            f"{missing[:3]}, unexpected {sorted(info['unexpected_keys'])[:3]}, mismatched "
            f"{sorted(map(str, info['mismatched_keys']))[:3]}")
    return model.eval()


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()
