"""The visual expert's scores VSⁱ (Eq. 3) from a frozen encoder, one function per choice.

``MeteorConfig.visual_expert`` picks one; ``meteor.model.vision.VisionTower`` computes it from what its
encoder computes anyway (the query/key projections of one attention layer, or the last layer's
output), so it works with SDPA, which never returns attention weights. Every function returns
float32 scores over the L patches of each view, each row summing to 1:

* ``cls_attention_row`` ("cls", the paper's, as FasterVLM): the CLS token's attention to each
  patch, averaged over heads, CLS→CLS (and CLS→register, for DINOv2 with registers) excluded,
  renormalised. Needs a CLS token (CLIP, DINOv2).
* ``attention_received`` ("attention_received"): the attention each patch receives, averaged over
  every patch query and every head, the CLS token (where there is one) excluded as query and as
  key, renormalised. For encoders without a CLS token (SigLIP); defined for CLIP too.
* ``pooling_head_attention`` ("pooling_head"): the attention of SigLIP's attention-pooling head
  (its learned probe query) to each patch of the last layer's output after ``post_layernorm``,
  averaged over heads: what the encoder's own image embedding is made of.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def cls_attention_row(cls_query: Tensor, keys: Tensor, num_heads: int, scale: float, num_prefix: int = 1) -> Tensor:
    """The visual-expert scores VS of Eq. 3 from one attention layer's projections.

    cls_query: (n, C) the CLS token's query projection; keys: (n, P + L, C) all key projections,
    the ``num_prefix`` = P non-patch tokens first (the CLS token, then DINOv2's registers, if any).
    Returns (n, L) float32: softmax(q·kᵀ·scale) per head over all P + L keys (as the encoder
    computes it), averaged over heads, the P prefix columns dropped, renormalised to sum 1.
    """
    n, tokens, width = keys.shape
    head_dim = width // num_heads
    q = cls_query.float().view(n, num_heads, 1, head_dim)  # (n, h, 1, d)
    k = keys.float().view(n, tokens, num_heads, head_dim).transpose(1, 2)  # (n, h, 1+L, d)
    weights = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)  # (n, h, 1, 1+L)
    to_patches = weights.mean(dim=1)[:, 0, num_prefix:]  # (n, L): head average, CLS→CLS (and registers) dropped
    return to_patches / to_patches.sum(dim=-1, keepdim=True)  # Eq. 3


def attention_received(queries: Tensor, keys: Tensor, num_heads: int, scale: float, num_prefix: int = 0,
                       chunk: int = 256) -> Tensor:
    """The attention each patch receives, averaged over patch queries and heads, renormalised.

    queries, keys: (n, T, C) one attention layer's projections, T = num_prefix + L (num_prefix = 1
    for CLIP's and DINOv2's CLS token, 1 + registers for DINOv2 with registers, 0 for SigLIP). Each query's softmax runs over all T keys, as the encoder
    computes it; the prefix tokens' rows (as queries) and columns (as keys) are then dropped and
    the column sums renormalised. Returns (n, L) float32 summing to 1. Queries go ``chunk`` at a
    time, so memory is O(n · h · chunk · T), not O(n · h · T²); the result does not depend on it.
    """
    n, tokens, width = keys.shape
    head_dim = width // num_heads
    k = keys.float().view(n, tokens, num_heads, head_dim).transpose(1, 2)  # (n, h, T, d)
    q = queries.float()[:, num_prefix:]
    q = q.reshape(n, tokens - num_prefix, num_heads, head_dim).transpose(1, 2)  # (n, h, L, d)
    received = torch.zeros(n, tokens, dtype=torch.float32, device=keys.device)
    for start in range(0, q.shape[2], chunk):
        weights = torch.softmax((q[:, :, start:start + chunk] @ k.transpose(-1, -2)) * scale, dim=-1)  # (n, h, c, T)
        received += weights.sum(dim=(1, 2))  # (n, T): summed over heads and these queries
    to_patches = received[:, num_prefix:]  # (n, L): prefix columns dropped
    return to_patches / to_patches.sum(dim=-1, keepdim=True)


def pooling_head_attention(head: nn.Module, hidden: Tensor) -> Tensor:
    """The attention-pooling head's probe → patch attention, averaged over heads.

    head: a SigLIP ``SiglipMultiheadAttentionPoolingHead`` (a learned ``probe`` (1, 1, C) and an
    ``nn.MultiheadAttention`` ``attention``); hidden: (n, L, C) the tokens the head reads (the
    last layer's output after ``post_layernorm``). Returns (n, L) float32, each row the head
    average of softmax(q·kᵀ / √d) over the L patches, as ``head.attention`` computes it.
    """
    attention: nn.MultiheadAttention = head.attention
    if attention.in_proj_weight is None:
        raise ValueError("the pooling head's attention has separate q/k/v projections (kdim ≠ embed_dim); "
                         "only SigLIP's packed in_proj layout is supported")
    n, length, width = hidden.shape
    heads = attention.num_heads
    head_dim = width // heads
    w_q, w_k, _ = attention.in_proj_weight.float().chunk(3)  # (C, C) each
    b_q, b_k, _ = (attention.in_proj_bias.float().chunk(3) if attention.in_proj_bias is not None
                   else (None, None, None))
    q = nn.functional.linear(head.probe.float().reshape(1, width), w_q, b_q)  # (1, C)
    q = q.view(1, heads, 1, head_dim)  # (1, h, 1, d)
    k = nn.functional.linear(hidden.float(), w_k, b_k)  # (n, L, C)
    k = k.view(n, length, heads, head_dim).transpose(1, 2)  # (n, h, L, d)
    weights = torch.softmax((q @ k.transpose(-1, -2)) * head_dim ** -0.5, dim=-1)  # (n, h, 1, L)
    return weights.mean(dim=1)[:, 0]  # (n, L)
