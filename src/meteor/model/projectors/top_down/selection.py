"""Visual-Native Selection (paper §3.3): score every fused token twice, keep the Top-K.

Pure functions for each equation, and a parameter-free module that applies them per view.
All scores are per view: (B, H·W), each row summing to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meteor.model.configuration import CompressorConfig


def visual_scores(cls_attention: torch.Tensor) -> torch.Tensor:
    """Eq. 3: VSⁱ = Attn(CLS, Tⁱ) / Σ_i Attn(CLS, Tⁱ), over patch tokens only.

    cls_attention: (B, H·W) ≥ 0, the CLS row without its self-attention → (B, H·W).
    """
    attention = cls_attention.float().clamp_min(0)
    return attention / attention.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def native_scores(fused: torch.Tensor, instruction: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Eq. 4: NSⁱ = softmax_i(⟨Fⁱ, INS'⟩ / τ). fused: (B, H·W, C), instruction: (B, C) → (B, H·W)."""
    logits = torch.einsum("blc,bc->bl", fused.float(), instruction.float())  # (B, H·W)
    return torch.softmax(logits / temperature, dim=-1)


def native_weight(lam: float, progress: float | None, warmup: float) -> float:
    """The native expert's weight: ramps linearly from 0 to 1 − λ over the first `warmup` fraction
    of training (paper §3.3); `progress` is the fraction of training done, None outside training."""
    if progress is None or warmup <= 0:
        return 1.0 - lam
    return (1.0 - lam) * min(1.0, max(0.0, progress) / warmup)


def aggregate_scores(visual: torch.Tensor | None, native: torch.Tensor | None,
                     lam: float, native_w: float) -> torch.Tensor:
    """Eq. 5: ASⁱ = λ·VSⁱ + w·NSⁱ, w = 1 − λ after warm-up. A missing expert contributes nothing
    and the other is used alone (the "visual" and "native" ablations)."""
    if visual is None and native is None:
        raise ValueError("aggregate_scores needs at least one expert's scores")
    if native is None:
        return visual
    if visual is None:
        return native
    return lam * visual + native_w * native


def select_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 6: indices of the K highest scores per row, returned in raster (ascending) order.

    scores: (B, H·W) → (B, K) int64. Ties go to the earlier token, so selection is deterministic.
    """
    length = scores.shape[-1]
    if k > length:
        raise ValueError(f"cannot keep K={k} tokens from a view of {length} patch tokens: lower "
                         f"tokens_per_slice to at most {length}, or use None to keep all tokens")
    # A stable descending sort gives the earliest index among equal scores; topk does not promise it.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=-1).values


@dataclass
class SelectionOutput:
    tokens: torch.Tensor
    """(B, K, C): the kept fused tokens, raster order."""
    indices: torch.Tensor
    """(B, K): their positions in the view's H·W grid (row-major)."""
    visual: torch.Tensor | None
    """(B, H·W) VS, or None when the visual expert is off."""
    native: torch.Tensor | None
    """(B, H·W) NS, or None when the native expert is off."""
    aggregate: torch.Tensor
    """(B, H·W) AS, the scores Top-K ran on."""


class VisualNativeSelection(nn.Module):
    """No parameters: Eq. 3-6 applied to a batch of views sharing one grid."""

    def __init__(self, config: CompressorConfig):
        super().__init__()
        self.k = config.tokens_per_slice
        self.lam = config.lam
        self.expert_mode = config.expert_mode
        self.warmup = config.native_warmup
        self.temperature = config.native_temperature
        self.straight_through = config.native_gradient == "straight_through"

    def forward(self, fused: torch.Tensor, instruction: torch.Tensor, cls_attention: torch.Tensor,
                progress: float | None = None, k: int | None = None) -> SelectionOutput:
        """fused: (B, H·W, C), instruction: (B, C), cls_attention: (B, H·W); progress: fraction of
        training done (drives the warm-up) or None at inference; k: tokens to keep instead of the
        configured K (selection has no parameters, so any K ≤ H·W works at inference)."""
        k = self.k if k is None else k
        length = fused.shape[1]
        if cls_attention.shape != fused.shape[:2]:
            raise ValueError(f"CLS attention has shape {tuple(cls_attention.shape)} but the view has "
                             f"{tuple(fused.shape[:2])} (batch, tokens): they must come from the same views")
        visual = visual_scores(cls_attention) if self.expert_mode in ("visual", "both") else None
        native = (native_scores(fused, instruction, self.temperature)
                  if self.expert_mode in ("native", "both") else None)
        aggregate = aggregate_scores(visual, native, self.lam,
                                     native_weight(self.lam, progress, self.warmup))
        if k is None:
            indices = torch.arange(length, device=fused.device).expand(fused.shape[0], length)
        else:
            indices = select_top_k(aggregate.detach(), k)                        # (B, K)
        kept = torch.gather(fused, 1, indices[..., None].expand(-1, -1, fused.shape[-1]))
        if self.straight_through and aggregate.requires_grad:
            # Values unchanged; the gradient ⟨∂L/∂Fⁱ, Fⁱ⟩ reaches the scores of kept tokens.
            picked = torch.gather(aggregate, 1, indices)                         # (B, K)
            kept = kept * (1.0 + picked - picked.detach()).unsqueeze(-1).to(kept.dtype)
        return SelectionOutput(kept, indices, visual, native, aggregate)
