"""Top-Down Compression (the paper's projector): Flash Global Fusion (top), Visual-Native Selection
(down), then LLaVA-1.5's MLP.

Per view: patch tokens (H·W × C) and the CLS attention row in, K tokens of the LLM's width D out.
"""

from __future__ import annotations

import torch
from torch import nn

from meteor.model.configuration import CompressorConfig
from meteor.model.projectors.top_down.fusion import FlashGlobalFusion
from meteor.model.projectors.top_down.selection import VisualNativeSelection
from meteor.model.projectors.mlp import CompressionOutput, Mlp2xGelu


class TopDownCompression(nn.Module):
    """``projector="meteor"``: F, INS' = FGF(T); keep Top-K of AS (Eq. 3-6) from F; MLP to D."""

    tokenwise = True

    def __init__(self, config: CompressorConfig):
        super().__init__()
        self.config = config
        self.fusion = FlashGlobalFusion(config)
        self.selection = VisualNativeSelection(config)
        self.mlp = Mlp2xGelu(config)
        # Built last, so the paper's parts start from the same weights with either instruction.
        self.question_map = None
        if config.instruction == "question":
            self.question_map = nn.Linear(config.text_width, config.vision_width, bias=False)
            nn.init.zeros_(self.question_map.weight)       # INS + W·q = INS at the start

    def forward(self, patch_tokens: torch.Tensor, cls_attention: torch.Tensor,
                grid: tuple[int, int], progress: float | None = None,
                tokens_per_slice: int | None = None, question: torch.Tensor | None = None) -> CompressionOutput:
        """patch_tokens: (B, H·W, C) of B views sharing the patch grid (H, W); cls_attention:
        (B, H·W); progress: fraction of training done, or None at inference; tokens_per_slice: a K
        other than the trained one (any K ≤ H·W); question: (B, D), the pooled embeddings of each
        view's question, read when ``instruction="question"``."""
        width = self.config.vision_width
        if patch_tokens.shape[-1] != width:
            raise ValueError(f"the compressor expects vision tokens of width C={width}, got "
                             f"{patch_tokens.shape[-1]}: set CompressorConfig.vision_width to the "
                             f"vision tower's hidden size")
        dtype = self.mlp.fc1.weight.dtype
        instruction = None
        if self.question_map is not None:
            if question is None:
                raise ValueError("this compressor conditions its instruction token on the question "
                                 "(instruction='question'): pass each view's pooled question embeddings "
                                 "(LlavaMeteorForConditionalGeneration does it from the prompt)")
            instruction = self.fusion.instruction_token + self.question_map(question.to(dtype))   # (B, C)
        fused = self.fusion(patch_tokens.to(dtype), grid, instruction)      # F (B, HW, C), INS' (B, C)
        selected = self.selection(fused.fused, fused.instruction, cls_attention, progress, tokens_per_slice)
        return CompressionOutput(
            tokens=self.mlp(selected.tokens),                                # (B, K, D)
            indices=selected.indices,
            visual_scores=selected.visual,
            native_scores=selected.native,
            aggregate_scores=selected.aggregate,
            grid=grid,
            mlp_inputs=fused.fused,
        )

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of each part of the paper's module (Table 4's "projector" column)."""
        return {
            "instruction_token": self.fusion.instruction_token.numel(),
            "flash_global_fusion": sum(p.numel() for p in self.fusion.layers.parameters()),
            "visual_native_selection": sum(p.numel() for p in self.selection.parameters()),
            "projector_mlp": sum(p.numel() for p in self.mlp.parameters()),
            **({"question_map": self.question_map.weight.numel()} if self.question_map is not None else {}),
        }
