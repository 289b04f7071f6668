"""A bidirectional Mamba-1 block: the global context operator of Flash Global Fusion.

Mamba-1 (Gu & Dao, 2023) per direction: input projection to (x, z), causal depthwise convolution
and SiLU on x, input-dependent Δ, B, C from x, the selective scan, gating by SiLU(z), output
projection. The bidirectional form (paper Eq. 1) runs a second scan over the reversed sequence.
Both directions share the input and output projections and own their convolution, Δ/B/C
projections, A and D, so each direction can learn its own dynamics at a small cost
(≈ 0.4M parameters at C = 1024).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from meteor.model.configuration import CompressorConfig
from meteor.model.ops import selective_scan


class ScanDirection(nn.Module):
    """The per-direction half of a Mamba-1 mixer: conv → (Δ, B, C) → selective scan."""

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int,
                 dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        self.d_state = d_state
        self.dt_rank = dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        # A = −exp(A_log) with A_log = log(1..N) per channel: the S4D-real initialisation Mamba uses.
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))                  # (d_inner, N)
        self.D = nn.Parameter(torch.ones(d_inner))               # (d_inner,)
        self._init_dt(dt_min, dt_max)

    @torch.no_grad()
    def _init_dt(self, dt_min: float, dt_max: float) -> None:
        # Δ starts log-uniform in [dt_min, dt_max] after softplus, as Mamba-1 prescribes; the
        # projection's weights are small so Δ is dominated by this bias at first.
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        if self.dt_proj.weight.device.type == "meta":
            return
        dt = torch.exp(torch.rand(self.dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z: (B, L, d_inner), channels last → y: (B, d_inner, L), read left to right.

        Channels last all the way: the input projection produces that layout, the Δ/B/C
        projections consume it, and the scan kernel reads channel-contiguous operands in place,
        so no (B, d_inner, L) copy is made before the scan."""
        x = F.silu(causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.bias), inplace=True)  # (B, L, d_inner)
        x_dbl = self.x_proj(x)                                  # (B, L, dt_rank + 2N)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.t()                       # (B, L, d_inner), bias in the scan
        b = b.transpose(1, 2).contiguous()                      # (B, N, L)
        c = c.transpose(1, 2).contiguous()                      # (B, N, L)
        a = -torch.exp(self.A_log.float())                      # (d_inner, N)
        return selective_scan(x.transpose(1, 2), dt.transpose(1, 2), a, b, c, D=self.D.float(),
                              z=z.transpose(1, 2), delta_bias=self.dt_proj.bias.float(),
                              delta_softplus=True)


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise 1-D convolution in channels-last layout, equal to
    ``nn.Conv1d(D, D, K, groups=D, padding=K-1)(x.transpose(1, 2))[..., :L].transpose(1, 2)``.

    x: (B, L, D) (any strides); weight: (D, 1, K); bias: (D,) → (B, L, D) contiguous. Output step t
    sums weight[:, K-1-j] · x[t-j] for j < K: K shifted multiply-adds over the sequence, which
    on CPU beats the library convolution plus the two layout copies it needs."""
    length, kernel = x.shape[1], weight.shape[-1]
    taps = weight[:, 0, :].to(x.dtype)                          # (D, K)
    if bias is None:
        out = x * taps[:, kernel - 1]                           # (B, L, D), the j = 0 tap
    else:
        out = torch.addcmul(bias.to(x.dtype), x, taps[:, kernel - 1])
    for j in range(1, min(kernel, length)):
        out[:, j:].addcmul_(x[:, :length - j], taps[:, kernel - 1 - j])
    return out


class BiMamba(nn.Module):
    """Bidirectional Mamba-1 mixer: (B, L, C) → (B, L, C), linear in L."""

    def __init__(self, width: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: int | None = None, direction_merge: str = "mean"):
        super().__init__()
        d_inner = expand * width
        dt_rank = dt_rank or math.ceil(width / 16)
        self.direction_merge = direction_merge
        self.in_proj = nn.Linear(width, 2 * d_inner, bias=False)
        self.forward_scan = ScanDirection(d_inner, d_state, d_conv, dt_rank)
        self.backward_scan = ScanDirection(d_inner, d_state, d_conv, dt_rank)
        merged = 2 * d_inner if direction_merge == "concat" else d_inner
        self.out_proj = nn.Linear(merged, width, bias=False)

    def forward(self, hidden: torch.Tensor, keep: Sequence[slice] | None = None) -> torch.Tensor:
        """(B, L, C) → (B, L, C); with `keep`, only the outputs at those positions (concatenated
        in order), so positions whose outputs are discarded skip the output projection."""
        xz = self.in_proj(hidden)                               # (B, L, 2·d_inner)
        x, z = xz.chunk(2, dim=-1)                              # (B, L, d_inner) each, views
        y_fwd = self.forward_scan(x, z)                         # (B, d_inner, L)
        # Eq. 1, backward scan: read the reversed sequence, then put outputs back in place.
        reversed_xz = xz.flip(1)                                # (B, L, 2·d_inner), one copy
        x_rev, z_rev = reversed_xz.chunk(2, dim=-1)
        y_bwd = self.backward_scan(x_rev, z_rev).flip(-1)       # (B, d_inner, L)
        if self.direction_merge == "concat":
            y = torch.cat([y_fwd, y_bwd], dim=1)                # (B, 2·d_inner, L)
        else:
            y = y_fwd.add_(y_bwd).mul_(0.5)                     # (B, d_inner, L), in place
        if keep is not None:
            y = torch.cat([y[..., part] for part in keep], dim=-1)  # (B, d_inner, L_kept)
        return self.out_proj(y.transpose(1, 2))                 # (B, L or L_kept, C)


class FusionLayer(nn.Module):
    """Pre-norm residual block around BiMamba, so an untrained layer starts near the identity
    and the CLIP features the projector sees are preserved."""

    def __init__(self, config: CompressorConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.vision_width)
        self.mixer = BiMamba(config.vision_width, config.d_state, config.expand, config.d_conv,
                             config.resolved_dt_rank, config.direction_merge)

    def forward(self, hidden: torch.Tensor, keep: Sequence[slice] | None = None) -> torch.Tensor:
        residual = hidden if keep is None else torch.cat([hidden[:, part] for part in keep], dim=1)
        return residual + self.mixer(self.norm(hidden), keep)
