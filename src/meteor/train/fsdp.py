"""Sharded training with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Shard units: every decoder layer of the LLM is one unit; the root unit holds the rest (the frozen
CLIP tower, the trainable compressor, the LLM's embeddings, final norm and head).

Why the vision tower and the compressor are not units of their own: FSDP issues its all-gathers
per *call* of a unit, and LLaVA-Meteor calls the tower and the compressor once per distinct view
size in the micro-batch — a data-dependent number of times, zero for a text-only micro-batch. Two
ranks would then issue different numbers of collectives and deadlock (FSDP's implicit backward
prefetch would add another data-dependent all-gather of the tower). The root unit is gathered
exactly once per forward on every rank, whatever the data, and the decoder layers run exactly once
each. For a 13B LLaMA the root is ~0.6B parameters (CLIP ViT-L 0.3B, embeddings and head 2 × 0.16B,
compressor); the 40 decoder layers (12.7B) are sharded.

A rank whose micro-batches hold no image leaves the compressor without gradients; with
`set_reduce_scatter_unused_params(True)` it reduce-scatters zeros for them, so the collectives of
all ranks still match (FSDP2's counterpart of DDP's `find_unused_parameters`). When *no* rank ran
the compressor in a step, those zeros would still reach AdamW, which would then move the weights
with its momentum and count a step — a single process (and DDP) leaves such gradients `None`, and
AdamW skips them. `CallTracker` records which top-level parts ran and `drop_unused_grads` sets
the gradients of the parts no rank ran back to `None`, so FSDP's updates equal the others'.

The decoder layers' gradient reductions must also come in the same order on every rank. FSDP
reduces a layer's gradients when autograd reaches the layer's inputs, or in the end-of-backward
callback if they do not require grad. With a frozen embedding table (LoRA) the LLM's input
embeddings require grad only when a micro-batch has images (through the compressor), so a
text-only rank would reduce the first layer after the root while the others reduce it before:
mismatched collectives. In that configuration the embeddings' output is made to require grad
(transformers' `enable_input_require_grads`), which gives every rank the same order.

Full (unsharded) state dicts for checkpoints and the final model go through
`torch.distributed.checkpoint.state_dict`, gathered to rank 0's CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def decoder_layers(language_model: nn.Module) -> list[nn.Module]:
    """The LLM's repeated blocks: the classes named in `_no_split_modules` (LLaMA: LlamaDecoderLayer),
    else the children of its longest `nn.ModuleList`."""
    names = set(getattr(language_model, "_no_split_modules", None) or [])
    base = getattr(language_model, "get_base_model", None)     # a peft wrapper (LoRA)
    if not names and base is not None:
        names = set(getattr(base(), "_no_split_modules", None) or [])
    layers = [m for m in language_model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in language_model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
    layers = decoder_layers(model.language_model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    embeddings = model.language_model.get_input_embeddings()
    if any(p.requires_grad for layer in layers for p in layer.parameters()) \
            and not any(p.requires_grad for p in embeddings.parameters()):
        embeddings.register_forward_hook(_require_grad)
    fully_shard(model, mesh=mesh)
    if hasattr(model, "set_reduce_scatter_unused_params"):
        model.set_reduce_scatter_unused_params(True)
    else:   # pragma: no cover - PyTorch < 2.9 lacks it; every rank must then use the compressor
        import warnings

        warnings.warn("this PyTorch's FSDP2 cannot reduce unused parameters: a rank whose "
                      "micro-batches hold no image would deadlock the run", stacklevel=2)
    return model


class CallTracker:
    """Which parts of the model (vision tower, compressor, LLM, head) ran during this step."""

    def __init__(self, model: nn.Module):
        parts = list(model.model.named_children()) + [("lm_head", model.lm_head)]
        self.children = [(name, child) for name, child in parts if any(p.requires_grad for p in child.parameters())]
        self.called = [False] * len(self.children)
        for index, (_, child) in enumerate(self.children):
            child.register_forward_pre_hook(self._hook(index))

    def _hook(self, index: int):
        def mark(module, args):
            self.called[index] = True
        return mark

    def drop_unused_grads(self) -> None:
        """Collective: the gradients of parts that ran on no rank become None (as without FSDP)."""
        if not self.children:
            return
        called = torch.tensor([float(c) for c in self.called])
        torch_dist.all_reduce(called)
        for (_, child), count in zip(self.children, called.tolist()):
            if count == 0:
                for p in child.parameters():
                    p.grad = None
        self.called = [False] * len(self.children)


def _require_grad(module: nn.Module, args, output: torch.Tensor) -> None:
    if torch.is_grad_enabled():
        output.requires_grad_(True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, unsharded, on rank 0's CPU ({} on the other ranks). Collective."""
    return get_model_state_dict(model, options=_FULL)


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=_FULL)
    return {name: tensor for name, tensor in state.items() if name in trainable}


def load_full_state(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Full tensors (the same on every rank) → this rank's shards; keys not given stay as they are."""
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
