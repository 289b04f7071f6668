"""The frozen CLIP vision tower: patch tokens and the CLS attention row of every view (SPEC §2, §4).

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
ViT-L counted from 1) gives both the features and, by default, the CLS attention (SPEC §4).
Index 0 (the embeddings) is rejected: no attention produces it. Layers after the deepest one needed
are never run (with the defaults the last layer is skipped).
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
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
from transformers.utils import logging as hf_logging
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

_CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
# Keys of a full CLIP checkpoint that a vision tower has no use for.
_TEXT_SIDE_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
_DTYPE_ALIASES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class VisionOutput:
    """What the vision tower gives for a batch of ``n`` views of one size (always batched, n ≥ 1).

    ``L = rows · cols`` patches, in raster order (row by row).
    """

    patch_tokens: Tensor
    """(n, L, C) hidden states of ``feature_layer`` without the CLS token, in the tower's dtype."""
    cls_attention: Tensor
    """(n, L) float32 visual-expert scores VS (Eq. 3): CLS→patch attention averaged over heads,
    CLS→CLS excluded, renormalised so every row sums to 1."""
    grid: tuple[int, int]
    """(rows, cols) of the patch grid: (h / patch_size, w / patch_size)."""


def cls_attention_row(cls_query: Tensor, keys: Tensor, num_heads: int, scale: float) -> Tensor:
    """The visual-expert scores VS of Eq. 3 from one attention layer's projections.

    cls_query: (n, C) the CLS token's query projection; keys: (n, 1 + L, C) all key projections,
    CLS first. Returns (n, L) float32: softmax(q·kᵀ·scale) per head over all 1 + L keys (as the
    encoder computes it), averaged over heads, the CLS→CLS entry dropped, renormalised to sum 1.
    """
    n, tokens, width = keys.shape
    head_dim = width // num_heads
    q = cls_query.float().view(n, num_heads, 1, head_dim)  # (n, h, 1, d)
    k = keys.float().view(n, tokens, num_heads, head_dim).transpose(1, 2)  # (n, h, 1+L, d)
    weights = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)  # (n, h, 1, 1+L)
    to_patches = weights.mean(dim=1)[:, 0, 1:]  # (n, L): head average, CLS→CLS dropped
    return to_patches / to_patches.sum(dim=-1, keepdim=True)  # Eq. 3


class VisionTower(nn.Module):
    """A frozen ``CLIPVisionModel`` that encodes views of any patch-multiple size (SPEC §1, §2, §4).

    Build it with ``from_pretrained`` (a local folder), ``from_config`` (random init, for tests) or
    ``from_model``. Parameters never require grad and the module stays in eval mode, even when a
    parent calls ``.train()``. See the module docstring for the layer numbering.
    """

    def __init__(
        self,
        model: CLIPVisionModel,
        feature_layer: int = -2,
        attention_layer: int | None = None,
        image_mean: Sequence[float] = tuple(OPENAI_CLIP_MEAN),
        image_std: Sequence[float] = tuple(OPENAI_CLIP_STD),
    ):
        super().__init__()
        if not isinstance(model, CLIPVisionModel):
            raise TypeError(
                f"VisionTower wraps a transformers CLIPVisionModel, got {type(model).__name__}; "
                "use VisionTower.from_model, which also accepts a full CLIPModel"
            )
        self.clip = model
        num_layers = model.config.num_hidden_layers
        self.feature_layer = _resolve_layer(feature_layer, num_layers, "feature_layer")
        self.attention_layer = _resolve_layer(
            feature_layer if attention_layer is None else attention_layer, num_layers, "attention_layer"
        )
        self.num_layers_run = max(self.feature_layer, self.attention_layer)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
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
    ) -> VisionTower:
        """Load a local CLIPVisionModel folder, or the vision half of a full CLIPModel folder.

        ``dtype`` None means float32. ``image_mean``/``image_std`` come from the folder's
        ``preprocessor_config.json`` when it has one, OpenAI CLIP's otherwise.
        """
        folder = Path(path)
        model_type = _clip_model_type(folder)
        # A full CLIP checkpoint carries the text tower too; its keys are expected to go unused, so
        # transformers' long "UNEXPECTED" load report would only be noise: drop that one record.
        # (Raising the logger's level instead makes transformers log a tensor-parallel warning.)
        # Missing or stray vision keys are checked below instead.
        loader_logger = hf_logging.get_logger("transformers.modeling_utils")
        drop_report = _DropLoadReport() if model_type == "clip" else None
        if drop_report is not None:
            loader_logger.addFilter(drop_report)
        try:
            model, info = CLIPVisionModel.from_pretrained(
                folder,
                dtype=_resolve_dtype(dtype),
                attn_implementation=attn_implementation,
                output_loading_info=True,
            )
        finally:
            if drop_report is not None:
                loader_logger.removeFilter(drop_report)
        if info["missing_keys"]:
            raise ValueError(
                f"the checkpoint in {folder} lacks {len(info['missing_keys'])} vision weights "
                f"(e.g. {sorted(info['missing_keys'])[:3]}); is it a CLIP vision checkpoint?"
            )
        stray = sorted(k for k in info["unexpected_keys"] if not k.startswith(_TEXT_SIDE_PREFIXES))
        if stray:
            raise ValueError(
                f"the checkpoint in {folder} has weights a CLIP vision model does not know: {stray[:3]}"
            )
        mean, std = _read_normalisation(folder)
        return cls(model, feature_layer, attention_layer, image_mean=mean, image_std=std)

    @classmethod
    def from_config(
        cls,
        config: CLIPVisionConfig | CLIPConfig,
        feature_layer: int = -2,
        attention_layer: int | None = None,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str = "sdpa",
    ) -> VisionTower:
        """A randomly initialised tower (tests, benchmarks); ``dtype`` None means float32."""
        if isinstance(config, CLIPConfig):
            config = config.vision_config
        # A copy of the config: set_attn_implementation must not change the caller's.
        model = CLIPVisionModel(CLIPVisionConfig.from_dict(config.to_dict()))
        model.set_attn_implementation(attn_implementation)
        return cls(model.to(_resolve_dtype(dtype)), feature_layer, attention_layer)

    @classmethod
    def from_model(
        cls,
        model: CLIPVisionModel | CLIPModel,
        feature_layer: int = -2,
        attention_layer: int | None = None,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
    ) -> VisionTower:
        """Wrap an existing model (a full CLIPModel gives its ``vision_model``), in place.

        ``dtype`` and ``attn_implementation`` None keep the model's own.
        """
        if isinstance(model, CLIPModel):
            model = model.vision_model
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        if dtype is not None:
            model = model.to(_resolve_dtype(dtype))
        return cls(model, feature_layer, attention_layer)

    # ------------------------------------------------------------------------------- properties

    @property
    def config(self) -> CLIPVisionConfig:
        return self.clip.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.embeddings.patch_embedding.weight.dtype

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the CLIP vision model (safetensors) and its normalisation, loadable by
        ``from_pretrained``."""
        folder = Path(folder)
        self.clip.save_pretrained(folder)
        preprocessor = {"image_mean": list(self.image_mean), "image_std": list(self.image_std),
                        "crop_size": self.image_size, "size": self.image_size}
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
        return folder

    def train(self, mode: bool = True) -> VisionTower:
        """Always eval: the tower is frozen (no dropout), whatever a parent module asks."""
        return super().train(False)

    # ---------------------------------------------------------------------------------- forward

    # no_grad, not inference_mode: the outputs feed trainable modules, and inference tensors
    # could not be saved for their backward pass.
    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> VisionOutput:
        """Encode ``pixel_values`` (n, 3, h, w): n views of one size, CLIP-normalised, h and w
        multiples of the patch size (the grid may differ from the native one and be non-square)."""
        rows, cols = self._check_pixel_values(pixel_values)
        hidden = self.clip.embeddings(pixel_values, interpolate_pos_encoding=True)  # (n, 1+L, C)
        hidden = self.clip.pre_layrnorm(hidden)  # hidden_states[0]
        features = cls_attention = None
        for index, layer in enumerate(self.clip.encoder.layers[: self.num_layers_run], start=1):
            if index == self.attention_layer:
                with _capture_query_key(layer.self_attn) as projections:
                    hidden = layer(hidden, None)  # hidden_states[index]
                attention = layer.self_attn
                cls_attention = cls_attention_row(
                    projections["query"][:, 0], projections["key"], attention.num_heads, attention.scale
                )  # (n, L)
            else:
                hidden = layer(hidden, None)  # hidden_states[index]
            if index == self.feature_layer:
                features = hidden[:, 1:]  # (n, L, C): CLS dropped
        return VisionOutput(patch_tokens=features, cls_attention=cls_attention, grid=(rows, cols))

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
                "resize views with meteor.slicing, which rounds both sides to patch multiples"
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
    """Record the q/k projections an attention module computes anyway, so the CLS row costs no
    extra projection and works with SDPA, which never returns attention weights."""
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


def _clip_model_type(folder: Path) -> str:
    """Check that ``folder`` holds a CLIP checkpoint; returns its model_type."""
    config_file = folder / "config.json"
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(
            f"vision tower folder {folder} {problem}; pass a local folder holding a CLIP "
            "checkpoint (config.json + weights), e.g. a download of openai/clip-vit-large-patch14-336"
        )
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json, so it is not a transformers CLIP checkpoint folder"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in _CLIP_MODEL_TYPES:
        raise ValueError(
            f"{config_file} has model_type {model_type!r}; the vision tower loads a CLIP checkpoint "
            f"(model_type one of {_CLIP_MODEL_TYPES})"
        )
    return model_type


def _read_normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std from the folder's preprocessor_config.json, OpenAI CLIP's otherwise."""
    mean, std = tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)
    preprocessor_file = folder / "preprocessor_config.json"
    if preprocessor_file.is_file():
        preprocessor = json.loads(preprocessor_file.read_text())
        mean = tuple(preprocessor.get("image_mean", mean))
        std = tuple(preprocessor.get("image_std", std))
    return mean, std
