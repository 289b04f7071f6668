"""Sharded training with PyTorch's FSDP (`fully_shard`): each decoder layer of the LLM is one
shard unit, the rest of the model (compressor, embeddings, head, frozen vision tower) the root.
Full state dicts for checkpoints and the final model go through `torch.distributed.checkpoint`."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _decoder_layers(language_model: nn.Module) -> list[nn.Module]:
    names = set(getattr(language_model, "_no_split_modules", None) or [])
    return [m for m in language_model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
    for layer in _decoder_layers(model.language_model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=_FULL)
    return {name: tensor for name, tensor in state.items() if name in trainable}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
