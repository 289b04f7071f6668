"""The vision-to-language projectors, by the name ``CompressorConfig.projector`` gives them.

* ``top_down/``: Top-Down Compression, the paper's method (``"meteor"``);
* ``mlp``: what they all share: ``CompressionOutput`` and LLaVA-1.5's ``Mlp2xGelu``;
* ``baselines``: the comparisons of the paper's Tables 1 and 4 (LLaVA-1.5's all-tokens MLP,
  LLaVA-UHD's resampler, pooling, CLS and random Top-K).

    from meteor.model.projectors import build_projector
    projector = build_projector(CompressorConfig(projector="cls_topk", tokens_per_slice=64))
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from meteor.model.configuration import CompressorConfig, ProjectorName
from meteor.model.projectors.baselines import AllTokensMLP, AvgPool, ClsTopK, RandomTopK, Resampler
from meteor.model.projectors.mlp import CompressionOutput, Mlp2xGelu
from meteor.model.projectors.top_down import TopDownCompression

PROJECTORS: dict[str, type[nn.Module]] = {
    "meteor": TopDownCompression, "mlp": AllTokensMLP, "resampler": Resampler, "avgpool": AvgPool,
    "cls_topk": ClsTopK, "random_topk": RandomTopK,
}
"""``CompressorConfig.projector`` → its class. Each class says with ``tokenwise`` whether it maps
every patch token on its own through an ``Mlp2xGelu`` named ``mlp``."""

assert set(PROJECTORS) == set(get_args(ProjectorName)), "config.ProjectorName and PROJECTORS disagree"


def build_projector(config: CompressorConfig) -> nn.Module:
    """The projector named by ``config.projector``, freshly initialised."""
    return PROJECTORS[config.projector](config)


def is_tokenwise(projector: str) -> bool:
    """Whether the projector named ``projector`` maps each patch token on its own (its module has
    an ``mlp`` and fills ``CompressionOutput.mlp_inputs``): all but LLaVA-UHD's resampler."""
    return PROJECTORS[projector].tokenwise


TOKENWISE = tuple(name for name in PROJECTORS if is_tokenwise(name))
"""The projectors with a token-wise MLP, in registry order."""


def count_parameters(config: CompressorConfig) -> dict[str, int]:
    """Parameter counts of the projector's parts and their ``total``, built on the meta device."""
    with torch.device("meta"):
        module = build_projector(config)
    if isinstance(module, TopDownCompression):
        parts = module.parameter_counts()
    else:
        parts = {name: sum(p.numel() for p in child.parameters()) for name, child in module.named_children()}
        parts.update({name: p.numel() for name, p in module.named_parameters(recurse=False)})
    parts["total"] = sum(parts.values())
    return parts


PAPER_PARAMETERS = {"LLaVA-Meteor (Top-Down Compression)": 37.08e6, "LLaVA-UHD projector": 137.84e6}
"""The paper's Table 4 projector sizes."""


def parameter_report(vision_width: int = 1024, text_width: int = 5120, **compressor_options) -> str:
    """A markdown table of Top-Down Compression's parameters at the given widths, beside the paper's."""
    config = CompressorConfig(vision_width=vision_width, text_width=text_width, **compressor_options)
    counts = count_parameters(config)
    lines = [f"Top-Down Compression at C={vision_width}, D={text_width} "
             f"(scan={config.scan_mode}, fgf_layers={config.fgf_layers}, d_state={config.d_state}, "
             f"expand={config.expand}, direction_merge={config.direction_merge}); counted on the meta device",
             "", "| part | parameters |", "|---|---:|"]
    lines += [f"| {name} | {count:,} ({count / 1e6:.2f}M) |" for name, count in counts.items()]
    lines += ["", "| paper (Table 4) | parameters |", "|---|---:|"]
    lines += [f"| {name} | {count / 1e6:.2f}M |" for name, count in PAPER_PARAMETERS.items()]
    return "\n".join(lines)


__all__ = ["PROJECTORS", "TOKENWISE", "AllTokensMLP", "AvgPool", "ClsTopK", "CompressionOutput", "Mlp2xGelu",
           "RandomTopK", "Resampler", "TopDownCompression", "build_projector", "count_parameters",
           "is_tokenwise", "parameter_report"]
