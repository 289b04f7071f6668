"""What every projector returns, and LLaVA-1.5's token-wise MLP that most of them end with.

A *projector* is the vision-to-language module of a LLaVA-style model: per view, the vision
tower's patch tokens (B, H·W, C) and CLS-attention row (B, H·W) in, tokens of the LLM's width D
out. Top-Down Compression is the paper's; the others (``baselines``) are the comparisons of its
Tables 1 and 4. All of them share ``CompressionOutput``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meteor.model.configuration import CompressorConfig


class Mlp2xGelu(nn.Module):
    """LLaVA-1.5's ``mlp2x_gelu``: C → hidden → D with a GELU between. Token-wise, so a projector
    may run it after selection (on K tokens instead of H·W) with the same result."""

    def __init__(self, config: CompressorConfig):
        super().__init__()
        hidden = config.resolved_projector_hidden
        self.fc1 = nn.Linear(config.vision_width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, config.text_width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(tokens.to(self.fc1.weight.dtype))))


@dataclass
class CompressionOutput:
    """A projector's output for B views sharing one patch grid."""

    tokens: torch.Tensor
    """(B, K, D): the views' tokens for the LLM (K = H·W for the all-tokens MLP)."""
    indices: torch.Tensor | None
    """(B, K): kept positions in each view's patch grid, raster order; None when the tokens are
    mixtures of patches (pooling, resampler)."""
    visual_scores: torch.Tensor | None
    """(B, H·W): VS of Eq. 3, where the projector computes it."""
    native_scores: torch.Tensor | None
    """(B, H·W): NS of Eq. 4 (Top-Down Compression only)."""
    aggregate_scores: torch.Tensor | None
    """(B, H·W): the scores Top-K ran on."""
    grid: tuple[int, int]
    """(rows, cols) of the views' patch grid."""
    mlp_inputs: torch.Tensor | None = None
    """(B, H·W, C): per patch, the token the projector's MLP (``Mlp2xGelu``) maps, before any
    selection: Flash Global Fusion's output Fⁱ for Top-Down Compression, the patch token itself for
    the MLP, Top-K and pooling baselines; None for projectors that are not token-wise (the
    resampler). ``projector.mlp(mlp_inputs[:, i])`` is what patch i would become in the LLM."""
