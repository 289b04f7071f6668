"""Flash Global Fusion (paper §3.2): local-to-single scan + instruction token + bidirectional SSM.

Per view (slice or global view) with patch tokens T (Hu·Wu × C):
1. Local-to-single: TLⁱ summarises the window around Tⁱ in the 2-D grid; the sequence is
   TL¹, T¹, TL², T², …, TL^{HW}, T^{HW} (Eq. 1).
2. The shared learnable instruction token INS is inserted at the centre of the sequence.
3. Bidirectional Mamba layers propagate global context in linear time (Eq. 2).
4. Fⁱ is the output at Tⁱ's position (TL outputs are dropped); INS' is the output at INS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from meteor.model.configuration import CompressorConfig
from meteor.model.projectors.top_down.mamba import FusionLayer


def local_to_single(tokens: torch.Tensor, grid: tuple[int, int], window_size: int = 3) -> torch.Tensor:
    """TLⁱ: the mean of the window_size × window_size neighbourhood of each token.

    tokens: (B, H·W, C) in raster order; grid: (H, W) → (B, H·W, C). Stride 1; at the borders the
    mean is over the tokens that exist (no zero padding bias).
    """
    batch, length, width = tokens.shape
    rows, cols = grid
    if rows * cols != length:
        raise ValueError(f"grid {rows}×{cols} = {rows * cols} tokens, but the view has {length}")
    fmap = tokens.transpose(1, 2).reshape(batch, width, rows, cols)       # (B, C, H, W)
    pooled = F.avg_pool2d(fmap, window_size, stride=1, padding=window_size // 2,
                          count_include_pad=False)                          # (B, C, H, W)
    return pooled.flatten(2).transpose(1, 2)                              # (B, H·W, C)


def interleave(local: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, C), (B, L, C) → (B, 2L, C) ordered TL¹, T¹, TL², T², … (Eq. 1)."""
    return torch.stack([local, tokens], dim=2).flatten(1, 2)


def insert_at_centre(sequence: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, L, C), (C,) or (B, C) → (B, L+1, C) with the token (one per sequence, or one for all) at
    index L // 2, and that index."""
    centre = sequence.shape[1] // 2
    ins = token.to(sequence.dtype)
    ins = ins.expand(sequence.shape[0], 1, -1) if ins.dim() == 1 else ins[:, None, :]   # (B, 1, C)
    return torch.cat([sequence[:, :centre], ins, sequence[:, centre:]], dim=1), centre


@dataclass
class FusionOutput:
    fused: torch.Tensor
    """F: (B, H·W, C), one fused token per patch, raster order."""
    instruction: torch.Tensor
    """INS': (B, C), the instruction token after fusion."""


class FlashGlobalFusion(nn.Module):
    """Patch tokens (B, H·W, C) of views sharing one grid → F (B, H·W, C) and INS' (B, C)."""

    def __init__(self, config: CompressorConfig):
        super().__init__()
        self.scan_mode = config.scan_mode
        self.window_size = config.window_size
        # INS: one learnable token shared by all views and images (paper §3.2). Its scale does not
        # matter much since every layer normalises its input first.
        self.instruction_token = nn.Parameter(torch.randn(config.vision_width) * 0.02)
        self.layers = nn.ModuleList(FusionLayer(config) for _ in range(config.fgf_layers))

    def _run(self, sequence: torch.Tensor, instruction: torch.Tensor, keep=None) -> tuple[torch.Tensor, int]:
        """Insert INS at the centre and run the layers; `keep(centre)` names the positions whose
        outputs the last layer must produce (earlier layers need every position)."""
        sequence, centre = insert_at_centre(sequence, instruction)
        for layer in self.layers[:-1]:
            sequence = layer(sequence)
        return self.layers[-1](sequence, None if keep is None else keep(centre)), centre

    def _single(self, tokens: torch.Tensor, instruction: torch.Tensor) -> FusionOutput:
        out, centre = self._run(tokens, instruction)                          # (B, HW+1, C)
        fused = torch.cat([out[:, :centre], out[:, centre + 1:]], dim=1)       # (B, HW, C)
        return FusionOutput(fused, out[:, centre])

    def _local_to_single(self, tokens: torch.Tensor, grid: tuple[int, int], instruction: torch.Tensor
                         ) -> FusionOutput:
        local = local_to_single(tokens, grid, self.window_size)             # (B, HW, C)
        # In TL¹,T¹,…,TL^HW,T^HW the Tⁱ sit at odd indices; INS goes in at c = HW, so after it
        # they sit one further (c even: between pairs; c odd: between a TLⁱ and its Tⁱ). Only
        # the Tⁱ outputs and INS' are computed by the last layer; TL outputs are never needed.
        out, centre = self._run(interleave(local, tokens), instruction,
                                keep=lambda c: [slice(1, c, 2), slice(c, c + 1), slice(c + 2 - c % 2, None, 2)])
        half = centre // 2                                                  # Tⁱ before INS
        fused = torch.cat([out[:, :half], out[:, half + 1:]], dim=1)        # (B, HW, C)
        return FusionOutput(fused, out[:, half])

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], instruction: torch.Tensor | None = None
                ) -> FusionOutput:
        """tokens: (B, H·W, C); instruction: (B, C), one INS per view in place of the learned one
        (the question-conditioned variant), or None."""
        instruction = self.instruction_token if instruction is None else instruction
        if self.scan_mode == "single":
            return self._single(tokens, instruction)
        if self.scan_mode == "l2s":
            return self._local_to_single(tokens, grid, instruction)
        single, l2s = self._single(tokens, instruction), self._local_to_single(tokens, grid, instruction)
        return FusionOutput(0.5 * (single.fused + l2s.fused),
                            0.5 * (single.instruction + l2s.instruction))
