"""The frozen vision tower: patch tokens and the visual expert's scores of every view (docs/design.md,
"The vision tower", "Visual expert").

Each view (a UHD slice or the global view) is encoded at its own size: its height and width are
multiples of the patch size, and the 24×24 grid of position embeddings learnt at 336 px is
interpolated bicubically to the view's patch grid, the CLS position embedding kept, no padding.
transformers' ``interpolate_pos_encoding=True`` does exactly that for square and non-square grids
(bicubic, ``align_corners=False``, output size = the view's (rows, cols), CLS embedding concatenated
unchanged; the table is used as is at the native square size), so this module relies on it.

Layer numbering. ``feature_layer`` and ``attention_layer`` index transformers' ``hidden_states``
tuple, which has ``L + 1`` entries for ``L`` encoder layers: ``hidden_states[0]`` is the embedding
output (after ``pre_layrnorm``) and ``hidden_states[j]`` is the output of ``encoder.layers[j - 1]``.
The attention "at" index ``j`` is the self-attention inside ``encoder.layers[j - 1]``, the layer that
produces ``hidden_states[j]``; in transformers' ``attentions`` tuple (``L`` entries) that is
``attentions[j - 1]`` for ``j > 0`` and ``attentions[j]`` for ``j < 0``. So the default
``feature_layer = -2`` (LLaVA's penultimate layer; ``encoder.layers[L - 2]``, layer 23 of 24 for
ViT-L counted from 1) gives both the features and, by default, the CLS attention (docs/design.md,
"Visual expert").
Index 0 (the embeddings) is rejected: no attention produces it. Layers after the deepest one needed
are never run (with the defaults the last layer is skipped).

Encoders. CLIP (``CLIPVisionModel``, the paper's), SigLIP (``SiglipVisionModel``, as in
LLaVA-OneVision and PaliGemma) and DINOv2 (``Dinov2Model`` and ``Dinov2WithRegistersModel``, as in
Cambrian and Prismatic). SigLIP has no CLS token and no pre-layernorm: every token is a
patch, ``hidden_states[0]`` is the embedding output, and its learned position table (a square
grid, no CLS entry) is interpolated the same way by transformers' ``interpolate_pos_encoding``
(bicubic, ``align_corners=False``, to the view's (rows, cols); the table as is at the native
square size). A SigLIP whose ``image_size`` is not a multiple of its patch (384 px at 14 px)
covers ``image_size // patch_size`` patches per side: ``image_size`` here is that grid in pixels.
DINOv2's sequence is its CLS token, then its register tokens (``Dinov2WithRegistersModel`` only:
transformers puts them between the CLS token and the patches), then the patches; it has no
pre-layernorm, and its embeddings always interpolate the position table (bicubic,
``align_corners=False``, to the view's (rows, cols); ``Dinov2WithRegistersModel`` with
``antialias=True``; the table as is at the native square size: 518 px, a 37×37 grid, for the
released checkpoints). Its final ``layernorm`` applies to the last hidden state only, so
``hidden_states[j]`` are the raw layer outputs, as transformers returns them.

The visual expert (``visual_expert``, ``meteor.model.visual_expert``): "cls" (the CLS row, the paper's;
CLIP and DINOv2), "attention_received" (the attention each patch receives at ``attention_layer``, for
towers without CLS; defined for every tower), or "pooling_head" (SigLIP's attention-pooling head's probe over the last
layer, after ``post_layernorm``; every layer then runs). Whichever it is, ``VisionOutput``
carries it as ``cls_attention``, the name the projectors read. The CLS token and DINOv2's register
tokens are never patch tokens: they are left out of the features, and out of the scores as keys
(and, for "attention_received", as queries).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
                          Dinov2WithRegistersConfig, Dinov2WithRegistersModel, SiglipConfig, SiglipModel,
                          SiglipVisionConfig, SiglipVisionModel)
from transformers.utils import logging as hf_logging
from transformers.utils.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_STANDARD_MEAN,
                                          IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

from meteor.model.configuration import VisualExpert
from meteor.model.visual_expert import attention_received, cls_attention_row, pooling_head_attention

_CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
_SIGLIP_MODEL_TYPES = ("siglip", "siglip_vision_model")
_DINOV2_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
VISION_MODEL_TYPES = _CLIP_MODEL_TYPES + _SIGLIP_MODEL_TYPES + _DINOV2_MODEL_TYPES
"""The ``model_type`` of every checkpoint folder ``VisionTower.from_pretrained`` loads."""
# Keys of a full CLIP / SigLIP checkpoint that a vision tower has no use for.
_TEXT_SIDE_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")
EncoderModel = CLIPVisionModel | SiglipVisionModel | Dinov2Model | Dinov2WithRegistersModel
_ENCODERS = (CLIPVisionModel, SiglipVisionModel, Dinov2Model, Dinov2WithRegistersModel)
_DINOV2_ENCODERS = (Dinov2Model, Dinov2WithRegistersModel)
_DTYPE_ALIASES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class VisionOutput:
    """What the vision tower gives for a batch of ``n`` views of one size (always batched, n ≥ 1).

    ``L = rows · cols`` patches, in raster order (row by row).
    """

    patch_tokens: Tensor
    """(n, L, C) hidden states of ``feature_layer`` without the CLS (and register) tokens, in the
    tower's dtype."""
    cls_attention: Tensor
    """(n, L) float32 visual-expert scores VS (Eq. 3), every row summing to 1: with the default
    visual expert "cls", CLS→patch attention averaged over heads, CLS→CLS excluded, renormalised;
    with another, that expert's scores (``meteor.model.visual_expert``)."""
    grid: tuple[int, int]
    """(rows, cols) of the patch grid: (h / patch_size, w / patch_size)."""


class VisionTower(nn.Module):
    """A frozen ``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model`` or
    ``Dinov2WithRegistersModel`` that encodes views of any patch-multiple size.

    Build it with ``from_pretrained`` (a local folder), ``from_config`` (random init, for tests) or
    ``from_model``. Parameters never require grad and the module stays in eval mode, even when a
    parent calls ``.train()``. See the module docstring for the layer numbering, the encoders and
    the visual experts. ``image_mean``/``image_std`` None: the encoder's usual ones (OpenAI CLIP's;
    0.5 for SigLIP; ImageNet's for DINOv2).
    """

    def __init__(
        self,
        model: EncoderModel,
        feature_layer: int = -2,
        attention_layer: int | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        visual_expert: VisualExpert = "cls",
    ):
        super().__init__()
        if not isinstance(model, _ENCODERS):
            raise TypeError(
                f"VisionTower wraps a transformers CLIPVisionModel, SiglipVisionModel, Dinov2Model or "
                f"Dinov2WithRegistersModel, got {type(model).__name__}; use VisionTower.from_model, which also "
                "accepts a full CLIPModel or SiglipModel"
            )
        self.clip = model
        """The wrapped encoder (the name is historical: whichever encoder the tower wraps)."""
        self.has_cls = not isinstance(model, SiglipVisionModel)
        self.num_prefix = (1 + getattr(model.config, "num_register_tokens", 0)) if self.has_cls else 0
        """Tokens before the patches in the encoder's sequence: the CLS token and, for a DINOv2 with
        registers, its register tokens; 0 for SigLIP."""
        self.visual_expert = _check_visual_expert(visual_expert, model, attention_layer)
        num_layers = model.config.num_hidden_layers
        self.feature_layer = _resolve_layer(feature_layer, num_layers, "feature_layer")
        self.attention_layer = _resolve_layer(
            feature_layer if attention_layer is None else attention_layer, num_layers, "attention_layer"
        )
        if visual_expert == "pooling_head":
            self.attention_layer = num_layers  # the head reads the last layer's output
        self.num_layers_run = max(self.feature_layer, self.attention_layer)
        default_mean, default_std = _default_normalisation(model)
        self.image_mean = tuple(float(v) for v in (default_mean if image_mean is None else image_mean))
        self.image_std = tuple(float(v) for v in (default_std if image_std is None else image_std))
        self.requires_grad_(False)
        self.train(False)

    # ----------------------------------------------------------------------------- constructors

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        feature_layer: int = -2,
        attention_layer: int | None = None,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str = "sdpa",
        visual_expert: VisualExpert = "cls",
    ) -> VisionTower:
        """Load a local CLIPVisionModel, SiglipVisionModel, Dinov2Model or Dinov2WithRegistersModel
        folder, or the vision half of a full CLIPModel or SiglipModel folder.

        ``dtype`` None means float32. ``image_mean``/``image_std`` come from the folder's
        ``preprocessor_config.json`` when it has one, the encoder's usual ones otherwise.
        """
        folder = Path(path)
        model_type = _vision_model_type(folder)
        model_class = _model_class(model_type)
        # A full CLIP checkpoint carries the text tower too; its keys are expected to go unused, so
        # transformers' long "UNEXPECTED" load report would only be noise: drop that one record.
        # (Raising the logger's level instead makes transformers log a tensor-parallel warning.)
        # Missing or stray vision keys are checked below instead.
        loader_logger = hf_logging.get_logger("transformers.modeling_utils")
        drop_report = _DropLoadReport() if model_type in ("clip", "siglip") else None
        if drop_report is not None:
            loader_logger.addFilter(drop_report)
        try:
            model, info = model_class.from_pretrained(
                folder,
                dtype=_resolve_dtype(dtype),
                attn_implementation=attn_implementation,
                output_loading_info=True,
            )
        finally:
            if drop_report is not None:
                loader_logger.removeFilter(drop_report)
        encoder = _ENCODER_NAMES[model_class]
        if info["missing_keys"]:
            raise ValueError(
                f"the checkpoint in {folder} lacks {len(info['missing_keys'])} vision weights "
                f"(e.g. {sorted(info['missing_keys'])[:3]}); is it a {encoder} vision checkpoint?"
            )
        stray = sorted(k for k in info["unexpected_keys"] if not k.startswith(_TEXT_SIDE_PREFIXES))
        if stray:
            raise ValueError(
                f"the checkpoint in {folder} has weights a {encoder} vision model does not know: {stray[:3]}"
            )
        mean, std = _read_normalisation(folder, model)
        return cls(model, feature_layer, attention_layer, image_mean=mean, image_std=std,
                   visual_expert=visual_expert)

    @classmethod
    def from_config(
        cls,
        config: CLIPVisionConfig | CLIPConfig | SiglipVisionConfig | SiglipConfig | Dinov2Config
        | Dinov2WithRegistersConfig,
        feature_layer: int = -2,
        attention_layer: int | None = None,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str = "sdpa",
        visual_expert: VisualExpert = "cls",
    ) -> VisionTower:
        """A randomly initialised tower (tests, benchmarks); ``dtype`` None means float32."""
        if isinstance(config, (CLIPConfig, SiglipConfig)):
            config = config.vision_config
        # A copy of the config: set_attn_implementation must not change the caller's.
        for config_class, model_class in ((SiglipVisionConfig, SiglipVisionModel), (Dinov2Config, Dinov2Model),
                                          (Dinov2WithRegistersConfig, Dinov2WithRegistersModel),
                                          (CLIPVisionConfig, CLIPVisionModel)):
            if isinstance(config, config_class):
                model = model_class(config_class.from_dict(config.to_dict()))
                break
        else:
            raise TypeError(f"VisionTower.from_config takes a CLIP, SigLIP or DINOv2 configuration, got "
                            f"{type(config).__name__}")
        model.set_attn_implementation(attn_implementation)
        return cls(model.to(_resolve_dtype(dtype)), feature_layer, attention_layer, visual_expert=visual_expert)

    @classmethod
    def from_model(
        cls,
        model: CLIPVisionModel | CLIPModel | SiglipVisionModel | SiglipModel,
        feature_layer: int = -2,
        attention_layer: int | None = None,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
        visual_expert: VisualExpert = "cls",
    ) -> VisionTower:
        """Wrap an existing model (a full CLIPModel or SiglipModel gives its ``vision_model``), in
        place. ``dtype`` and ``attn_implementation`` None keep the model's own.
        """
        if isinstance(model, (CLIPModel, SiglipModel)):
            model = model.vision_model
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        if dtype is not None:
            model = model.to(_resolve_dtype(dtype))
        return cls(model, feature_layer, attention_layer, visual_expert=visual_expert)

    # ------------------------------------------------------------------------------- properties

    @property
    def config(self) -> CLIPVisionConfig | SiglipVisionConfig | Dinov2Config | Dinov2WithRegistersConfig:
        return self.clip.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def image_size(self) -> int:
        """The native view side in pixels: the square grid the position table was learnt on
        (``image_size`` rounded down to whole patches; 336 for CLIP ViT-L/14-336, 518 for DINOv2)."""
        return self.config.image_size // self.patch_size * self.patch_size

    @property
    def encoder(self) -> EncoderModel:
        """The wrapped transformers model (also ``clip``, its historical name)."""
        return self.clip

    @property
    def dtype(self) -> torch.dtype:
        return self._patch_projection().weight.dtype

    def _patch_projection(self) -> nn.Conv2d:
        embeddings = self.clip.embeddings
        return embeddings.patch_embeddings.projection if self.is_dinov2 else embeddings.patch_embedding

    @property
    def is_dinov2(self) -> bool:
        return isinstance(self.clip, _DINOV2_ENCODERS)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the vision model (safetensors) and its normalisation, loadable by
        ``from_pretrained``, and by transformers as the model and its image processor."""
        folder = Path(folder)
        self.clip.save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(json.dumps(self.image_processor_config(), indent=2) + "\n")
        return folder

    def image_processor_config(self) -> dict:
        """A ``preprocessor_config.json`` for transformers' own image processor of this encoder
        (CLIPImageProcessor / SiglipImageProcessor / DINOv2's BitImageProcessor) at the native size
        with this tower's normalisation: what a plain transformers user of the saved tower would
        load."""
        side = self.image_size
        common = {"image_mean": list(self.image_mean), "image_std": list(self.image_std), "do_resize": True,
                  "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                  "resample": 3}
        if self.is_dinov2:
            return {"image_processor_type": "BitImageProcessor", **common, "size": {"shortest_edge": side},
                    "do_center_crop": True, "crop_size": {"height": side, "width": side}}
        if self.has_cls:
            return {"image_processor_type": "CLIPImageProcessor", **common, "size": {"shortest_edge": side},
                    "do_center_crop": True, "crop_size": {"height": side, "width": side}}
        return {"image_processor_type": "SiglipImageProcessor", **common, "size": {"height": side, "width": side}}

    def train(self, mode: bool = True) -> VisionTower:
        """Always eval: the tower is frozen (no dropout), whatever a parent module asks."""
        return super().train(False)

    # ---------------------------------------------------------------------------------- forward

    # no_grad, not inference_mode: the outputs feed trainable modules, and inference tensors
    # could not be saved for their backward pass.
    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> VisionOutput:
        """Encode ``pixel_values`` (n, 3, h, w): n views of one size, normalised with
        ``image_mean``/``image_std``, h and w multiples of the patch size (the grid may differ from
        the native one and be non-square)."""
        rows, cols = self._check_pixel_values(pixel_values)
        if self.is_dinov2:
            # DINOv2's embeddings always interpolate; CLS, then any registers, then the patches
            hidden = self.clip.embeddings(pixel_values.to(self.dtype))  # (n, T, C) = hidden_states[0]
            layers = self.clip.encoder.layer
        else:
            hidden = self.clip.embeddings(pixel_values, interpolate_pos_encoding=True)  # (n, T, C)
            if self.has_cls:
                hidden = self.clip.pre_layrnorm(hidden)  # hidden_states[0]
            layers = self.clip.encoder.layers
        prefix = self.num_prefix  # CLS (and registers) lead the sequence; SigLIP has none
        features = scores = None
        for index, layer in enumerate(layers[: self.num_layers_run], start=1):
            if index == self.attention_layer and self.visual_expert != "pooling_head":
                attention = _self_attention(layer)
                with _capture_query_key(attention) as projections:
                    hidden = layer(hidden, None)  # hidden_states[index]
                scores = self._attention_scores(projections, attention)  # (n, L)
            else:
                hidden = layer(hidden, None)  # hidden_states[index]
            if index == self.feature_layer:
                features = hidden[:, prefix:] if prefix else hidden  # (n, L, C): CLS and registers dropped
        if self.visual_expert == "pooling_head":
            scores = pooling_head_attention(self.clip.head, self.clip.post_layernorm(hidden))  # (n, L)
        return VisionOutput(patch_tokens=features, cls_attention=scores, grid=(rows, cols))

    def _attention_scores(self, projections: dict[str, Tensor], attention: nn.Module) -> Tensor:
        """The "cls" or "attention_received" scores (n, L) from one layer's q/k projections."""
        heads, scale = _heads_and_scale(attention)
        if self.visual_expert == "cls":
            return cls_attention_row(projections["query"][:, 0], projections["key"], heads, scale,
                                     num_prefix=self.num_prefix)
        return attention_received(projections["query"], projections["key"], heads, scale,
                                  num_prefix=self.num_prefix)

    def encode_views(self, views: Sequence[Tensor]) -> list[VisionOutput]:
        """Encode views of possibly different sizes, each (3, h, w).

        Views of one size run as one batch; the result has one VisionOutput per view (n = 1), in
        the order of ``views``.
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for position, view in enumerate(views):
            if view.dim() != 3:
                raise ValueError(
                    f"view {position} has shape {tuple(view.shape)}; encode_views expects each view "
                    "as (3, h, w) (batches of one size go to forward)"
                )
            groups.setdefault((view.shape[-2], view.shape[-1]), []).append(position)
        outputs: list[VisionOutput | None] = [None] * len(views)
        for positions in groups.values():
            batch = self(torch.stack([views[p] for p in positions]))
            for row, position in enumerate(positions):
                outputs[position] = VisionOutput(
                    patch_tokens=batch.patch_tokens[row : row + 1],
                    cls_attention=batch.cls_attention[row : row + 1],
                    grid=batch.grid,
                )
        return outputs

    def _check_pixel_values(self, pixel_values: Tensor) -> tuple[int, int]:
        """Validate a batch of views; returns its (rows, cols) patch grid."""
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4:
            is_tensor = isinstance(pixel_values, Tensor)
            shape = tuple(pixel_values.shape) if is_tensor else type(pixel_values).__name__
            raise ValueError(
                f"pixel_values must be (n, 3, h, w), got {shape}; add a batch dimension with "
                "unsqueeze(0), or use encode_views for a list of (3, h, w) views"
            )
        channels, height, width = pixel_values.shape[1:]
        if channels != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels, the vision tower expects {self.config.num_channels} "
                "(RGB); convert grey or RGBA images with PIL's image.convert('RGB') first"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values has dtype {pixel_values.dtype}; expected floats scaled to [0, 1] and "
                f"normalised with image_mean={self.image_mean}, image_std={self.image_std}"
            )
        p = self.patch_size
        bad = [f"{name} {size}" for name, size in (("height", height), ("width", width)) if size % p]
        if bad:
            raise ValueError(
                f"view size {height}x{width}: {' and '.join(bad)} not a multiple of the patch size {p}; "
                "resize views with meteor.processing.slicing, which rounds both sides to patch multiples"
            )
        if height < p or width < p:
            raise ValueError(
                f"view size {height}x{width} gives a {height // p}x{width // p} patch grid; each side "
                f"needs at least one patch ({p} px)"
            )
        return height // p, width // p


# ------------------------------------------------------------------------------------- helpers


@contextmanager
def _capture_query_key(attention: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record the q/k projections an attention module computes anyway, so the visual expert costs
    no extra projection and works with SDPA, which never returns attention weights."""
    captured: dict[str, Tensor] = {}

    def recorder(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            captured[name] = output  # (n, 1+L, C)

        return hook

    handles = [
        attention.q_proj.register_forward_hook(recorder("query")),
        attention.k_proj.register_forward_hook(recorder("key")),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _self_attention(layer: nn.Module) -> nn.Module:
    """An encoder layer's self-attention module (``self_attn`` in CLIP / SigLIP, ``attention`` in
    DINOv2); each has ``q_proj`` and ``k_proj``."""
    attention = getattr(layer, "self_attn", None)
    return attention if attention is not None else layer.attention


def _heads_and_scale(attention: nn.Module) -> tuple[int, float]:
    """(heads, softmax scale) of a CLIP / SigLIP (``num_heads``, ``scale``) or DINOv2
    (``num_attention_heads``, ``scaling``) attention module."""
    heads = getattr(attention, "num_heads", None) or attention.num_attention_heads
    scale = getattr(attention, "scale", None)
    return heads, float(attention.scaling if scale is None else scale)


_ENCODER_NAMES = {CLIPVisionModel: "CLIP", SiglipVisionModel: "SigLIP", Dinov2Model: "DINOv2",
                  Dinov2WithRegistersModel: "DINOv2 (with registers)"}


def _model_class(model_type: str) -> type:
    if model_type in _CLIP_MODEL_TYPES:
        return CLIPVisionModel
    if model_type in _SIGLIP_MODEL_TYPES:
        return SiglipVisionModel
    return Dinov2WithRegistersModel if model_type == "dinov2_with_registers" else Dinov2Model


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _resolve_layer(index: int, num_layers: int, name: str) -> int:
    """A hidden-states index (negative from the end) → its position j in 1..num_layers."""
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"{name} must be an int, got {index!r}")
    resolved = index if index >= 0 else num_layers + 1 + index
    if not 1 <= resolved <= num_layers:
        raise ValueError(
            f"{name}={index} is out of range for a {num_layers}-layer encoder: use 1..{num_layers} or "
            f"-{num_layers}..-1 (hidden_states numbering; 0, the embeddings, has no attention)"
        )
    return resolved


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = _DTYPE_ALIASES.get(dtype, getattr(torch, dtype, None))
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
        dtype = resolved
    if not dtype.is_floating_point:
        raise ValueError(f"the vision tower needs a floating dtype, got {dtype}")
    return dtype


def _vision_model_type(folder: Path) -> str:
    """Check that ``folder`` holds a CLIP, SigLIP or DINOv2 checkpoint; returns its model_type."""
    config_file = folder / "config.json"
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"vision tower folder {folder} {problem}; pass a local folder holding a CLIP, SigLIP or DINOv2 "
            "checkpoint (config.json + weights), e.g. a download of openai/clip-vit-large-patch14-336"
        )
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json, so it is not a transformers CLIP, SigLIP or DINOv2 checkpoint folder"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in VISION_MODEL_TYPES:
        raise ValueError(
            f"{config_file} has model_type {model_type!r}; the vision tower loads a CLIP, SigLIP or DINOv2 "
            f"checkpoint (model_type one of {VISION_MODEL_TYPES})"
        )
    return model_type


def _default_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The encoder's usual image_mean / image_std: OpenAI CLIP's, SigLIP's 0.5 / 0.5, or DINOv2's
    ImageNet statistics."""
    if isinstance(model, SiglipVisionModel):
        return tuple(IMAGENET_STANDARD_MEAN), tuple(IMAGENET_STANDARD_STD)
    if isinstance(model, _DINOV2_ENCODERS):
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)


def _read_normalisation(folder: Path, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std from the folder's preprocessor_config.json, the encoder's usual ones
    otherwise."""
    mean, std = _default_normalisation(model)
    preprocessor_file = folder / "preprocessor_config.json"
    if preprocessor_file.is_file():
        preprocessor = json.loads(preprocessor_file.read_text())
        mean = tuple(preprocessor.get("image_mean", mean))
        std = tuple(preprocessor.get("image_std", std))
    return mean, std


def _check_visual_expert(visual_expert: str, model: nn.Module, attention_layer: int | None) -> str:
    """Refuse a visual expert the encoder cannot give, naming the ones it can."""
    name = type(model).__name__
    if visual_expert == "cls" and isinstance(model, SiglipVisionModel):
        raise ValueError(
            f"visual_expert='cls' needs a CLS token, and {name} has none: use "
            "visual_expert='attention_received' (the attention each patch receives) or, for a SigLIP with "
            "its pooling head, 'pooling_head' (MeteorConfig.visual_expert)"
        )
    if visual_expert == "pooling_head":
        if getattr(model, "head", None) is None:
            raise ValueError(
                f"visual_expert='pooling_head' reads SigLIP's attention-pooling head, and this {name} has "
                f"none (vision_use_head is false, or it is not a SigLIP): use 'attention_received'"
                + (" or 'cls'" if not isinstance(model, SiglipVisionModel) else "")
            )
        if attention_layer is not None:
            raise ValueError(
                f"visual_expert='pooling_head' reads the last layer, so attention_layer must be None, "
                f"not {attention_layer}"
            )
    elif visual_expert != "attention_received" and visual_expert != "cls":
        raise ValueError(
            f"visual_expert must be 'cls', 'attention_received' or 'pooling_head', got {visual_expert!r}"
        )
    return visual_expert
