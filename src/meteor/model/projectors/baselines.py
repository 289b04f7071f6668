"""The baselines of the paper's comparisons (Tables 1 and 4), on the projectors' interface.

Each takes a batch of views sharing one patch grid (patch tokens (B, H·W, C) and the CLS attention
row (B, H·W)) and returns a ``CompressionOutput`` with K tokens of width D per view. Indices are
the kept patch positions where tokens are patches (the Top-K baselines), and None where tokens are
mixtures (pooling, resampler); and LLaVA-1.5's projector, which keeps every token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meteor.model.configuration import CompressorConfig
from meteor.model.projectors.top_down.selection import select_top_k, visual_scores
from meteor.model.projectors.mlp import CompressionOutput, Mlp2xGelu


class AllTokensMLP(nn.Module):
    """LLaVA-1.5 (``projector="mlp"``): the 2-layer MLP on every patch token, no compression."""

    tokenwise = True

    def __init__(self, config: CompressorConfig):
        super().__init__()
        self.mlp = Mlp2xGelu(config)

    def forward(self, patch_tokens, cls_attention, grid, progress=None, tokens_per_slice=None,
                question=None) -> CompressionOutput:
        if tokens_per_slice is not None:
            raise ValueError(f"LLaVA-1.5's 'mlp' projector keeps every token and cannot keep K={tokens_per_slice}: "
                             f"load the model with projector='cls_topk' (same MLP weights, training-free Top-K) "
                             f"to compress it")
        batch, length, _ = patch_tokens.shape
        indices = torch.arange(length, device=patch_tokens.device).expand(batch, length)
        return CompressionOutput(self.mlp(patch_tokens), indices, visual_scores(cls_attention), None, None,
                                 grid, mlp_inputs=patch_tokens)


class ClsTopK(nn.Module):
    """Training-free selection by the visual expert alone (FasterVLM; VisionZip's dominant tokens):
    the raw CLIP tokens with the K highest CLS attention, then the MLP."""

    tokenwise = True

    def __init__(self, config: CompressorConfig):
        super().__init__()
        self.k = config.tokens_per_slice
        self.mlp = Mlp2xGelu(config)

    def forward(self, patch_tokens, cls_attention, grid, progress=None, tokens_per_slice=None,
                question=None) -> CompressionOutput:
        scores = visual_scores(cls_attention)                                 # (B, H·W)
        indices = select_top_k(scores, tokens_per_slice or self.k)           # (B, K)
        kept = torch.gather(patch_tokens, 1, indices[..., None].expand(-1, -1, patch_tokens.shape[-1]))
        return CompressionOutput(self.mlp(kept), indices,
                                 scores, None, scores, grid, mlp_inputs=patch_tokens)


class RandomTopK(nn.Module):
    """K tokens drawn uniformly at random (raster order kept): the floor any selection must beat.
    Random in training; a fixed seed at inference so evaluations are repeatable."""

    tokenwise = True

    def __init__(self, config: CompressorConfig, eval_seed: int = 0):
        super().__init__()
        self.k = config.tokens_per_slice
        self.eval_seed = eval_seed
        self.mlp = Mlp2xGelu(config)

    def forward(self, patch_tokens, cls_attention, grid, progress=None, tokens_per_slice=None,
                question=None) -> CompressionOutput:
        batch, length, width = patch_tokens.shape
        generator = None if self.training else torch.Generator().manual_seed(self.eval_seed)
        scores = torch.rand(batch, length, generator=generator).to(patch_tokens.device)
        indices = select_top_k(scores, tokens_per_slice or self.k)
        kept = torch.gather(patch_tokens, 1, indices[..., None].expand(-1, -1, width))
        return CompressionOutput(self.mlp(kept), indices,
                                 None, None, scores, grid, mlp_inputs=patch_tokens)


def pooled_grid(grid: tuple[int, int], k: int) -> tuple[int, int]:
    """The (rows, cols) with rows·cols = K, fitting in the grid, closest to its aspect ratio."""
    rows, cols = grid
    fits = [(r, k // r) for r in range(1, k + 1) if k % r == 0 and r <= rows and k // r <= cols]
    if not fits:
        raise ValueError(f"average pooling cannot make exactly K={k} tokens from a {rows}×{cols} patch "
                         f"grid: choose a K with a factorisation r×c, r ≤ {rows}, c ≤ {cols} (e.g. a square)")
    aspect = math.log(rows / cols)
    return min(fits, key=lambda rc: (abs(math.log(rc[0] / rc[1]) - aspect), rc[0]))


class AvgPool(nn.Module):
    """Adaptive average pooling of the patch grid to K cells (a fixed merging rule), then the MLP."""

    tokenwise = True

    def __init__(self, config: CompressorConfig):
        super().__init__()
        self.k = config.tokens_per_slice
        self.mlp = Mlp2xGelu(config)

    def forward(self, patch_tokens, cls_attention, grid, progress=None, tokens_per_slice=None,
                question=None) -> CompressionOutput:
        batch, _, width = patch_tokens.shape
        fmap = patch_tokens.transpose(1, 2).reshape(batch, width, *grid)       # (B, C, H, W)
        pooled = F.adaptive_avg_pool2d(fmap, pooled_grid(grid, tokens_per_slice or self.k))  # (B, C, r, c)
        tokens = pooled.flatten(2).transpose(1, 2)                             # (B, K, C)
        return CompressionOutput(self.mlp(tokens), None,
                                 None, None, None, grid, mlp_inputs=patch_tokens)


def sincos_2d(grid: tuple[int, int], width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (rows·cols, width): half the channels encode the
    row, half the column, at geometric frequencies (as in MAE / the Qwen-VL resampler)."""
    rows, cols = grid
    quarter = width // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    ys, xs = torch.meshgrid(torch.arange(rows, dtype=torch.float32),
                            torch.arange(cols, dtype=torch.float32), indexing="ij")
    parts = []
    for positions in (ys.flatten(), xs.flatten()):
        angles = positions[:, None] * frequencies[None]                        # (H·W, width/4)
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=1)                                        # (H·W, 4·quarter)
    return F.pad(embedding, (0, width - embedding.shape[1]))


class Resampler(nn.Module):
    """LLaVA-UHD's compression layer: K learned queries attend once to the view's tokens (keys carry
    2-D sine-cosine positions of the view's own grid), then a linear map; all at the LLM width D."""

    tokenwise = False   # K queries mix the view's tokens: no per-patch MLP

    def __init__(self, config: CompressorConfig):
        super().__init__()
        width = config.text_width
        self.queries = nn.Parameter(torch.randn(config.tokens_per_slice, width) * 0.02)
        self.kv_proj = nn.Linear(config.vision_width, width, bias=False)
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, config.resolved_resampler_heads, batch_first=True)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, width) * width ** -0.5)

    def forward(self, patch_tokens, cls_attention, grid, progress=None, tokens_per_slice=None,
                question=None) -> CompressionOutput:
        if tokens_per_slice not in (None, self.queries.shape[0]):
            raise ValueError(f"the resampler has {self.queries.shape[0]} learned queries and makes exactly that "
                             f"many tokens per view, not {tokens_per_slice}: keep its trained K")
        dtype = self.kv_proj.weight.dtype
        values = self.ln_kv(self.kv_proj(patch_tokens.to(dtype)))              # (B, H·W, D)
        keys = values + sincos_2d(grid, values.shape[-1]).to(values)           # (B, H·W, D)
        queries = self.ln_q(self.queries).expand(values.shape[0], -1, -1)      # (B, K, D)
        attended, _ = self.attention(queries, keys, values, need_weights=False)  # (B, K, D)
        return CompressionOutput(self.ln_post(attended) @ self.proj, None, None, None, None, grid)

