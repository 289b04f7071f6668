"""Top-Down Compression: Flash Global Fusion (top), Visual-Native Selection (down), projector.

The module that replaces LLaVA's projector: per view, patch tokens (H·W × C) and the CLS
attention row in, K tokens of the LLM's width D out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import CompressorConfig
from .fusion import FlashGlobalFusion
from .selection import VisualNativeSelection


class Projector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu: C → hidden → D. Token-wise, so it runs after selection."""

    def __init__(self, config: CompressorConfig):
        super().__init__()
        hidden = config.resolved_projector_hidden
        self.fc1 = nn.Linear(config.vision_width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, config.text_width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(tokens)))


@dataclass
class CompressionOutput:
    tokens: torch.Tensor
    """(B, K, D): the compressed views, ready for the LLM."""
    indices: torch.Tensor | None
    """(B, K): kept positions in each view's patch grid, raster order; None when the tokens are
    mixtures of patches (pooling, resampler baselines)."""
    visual_scores: torch.Tensor | None
    native_scores: torch.Tensor | None
    aggregate_scores: torch.Tensor | None
    grid: tuple[int, int]
    fused: torch.Tensor | None = None
    """(B, H·W, C): per patch, the token the compressor's token-wise projector would map: Flash
    Global Fusion's output for Top-Down Compression, the patch token itself for the MLP, Top-K
    and pooling baselines; None for the resampler, which has no token-wise projector. The
    glyph-alignment loss (``meteor.train.glyphs``) projects the tokens of text patches from it."""


class TopDownCompression(nn.Module):
    def __init__(self, config: CompressorConfig):
        super().__init__()
        self.config = config
        self.fusion = FlashGlobalFusion(config)
        self.selection = VisualNativeSelection(config)
        self.projector = Projector(config)

    def forward(self, patch_tokens: torch.Tensor, cls_attention: torch.Tensor,
                grid: tuple[int, int], progress: float | None = None) -> CompressionOutput:
        """patch_tokens: (B, H·W, C) of B views sharing the patch grid (H, W); cls_attention:
        (B, H·W); progress: fraction of training done, or None at inference."""
        width = self.config.vision_width
        if patch_tokens.shape[-1] != width:
            raise ValueError(f"the compressor expects vision tokens of width C={width}, got "
                             f"{patch_tokens.shape[-1]}: set CompressorConfig.vision_width to the "
                             f"vision tower's hidden size")
        dtype = self.projector.fc1.weight.dtype
        fused = self.fusion(patch_tokens.to(dtype), grid)                   # F (B, HW, C), INS' (B, C)
        selected = self.selection(fused.fused, fused.instruction, cls_attention, progress)
        return CompressionOutput(
            tokens=self.projector(selected.tokens),                          # (B, K, D)
            indices=selected.indices,
            visual_scores=selected.visual,
            native_scores=selected.native,
            aggregate_scores=selected.aggregate,
            grid=grid,
            fused=fused.fused,
        )


def build_compressor(config: CompressorConfig) -> nn.Module:
    """The projector named by `config.projector`: Top-Down Compression or a baseline."""
    if config.projector == "meteor":
        return TopDownCompression(config)
    from .projectors import BASELINES

    return BASELINES[config.projector](config)


def count_parameters(config: CompressorConfig) -> dict[str, int]:
    """Parameter counts of the projector's parts, built on the meta device (no memory used)."""
    with torch.device("meta"):
        module = build_compressor(config)
    if not isinstance(module, TopDownCompression):
        parts = {name: sum(p.numel() for p in child.parameters()) for name, child in module.named_children()}
        parts.update({name: p.numel() for name, p in module.named_parameters(recurse=False)})
        parts["total"] = sum(parts.values())
        return parts
    parts = {
        "instruction_token": module.fusion.instruction_token.numel(),
        "flash_global_fusion": sum(p.numel() for p in module.fusion.layers.parameters()),
        "visual_native_selection": sum(p.numel() for p in module.selection.parameters()),
        "projector_mlp": sum(p.numel() for p in module.projector.parameters()),
    }
    parts["total"] = sum(parts.values())
    return parts
