"""torch.distributed glue: torchrun's environment, DDP or FSDP, and the few collectives the loop needs.

Single-process runs go through the same object with every collective a no-op, so the loop has one
code path. The engines are PyTorch's own: `DistributedDataParallel` and FSDP (`fully_shard`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from .args import TrainConfig, TrainConfigError


@dataclass
class Distributed:
    mode: str             # "none", "ddp" or "fsdp"
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, config: TrainConfig) -> "Distributed":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        mode = config.distributed
        if mode == "auto":
            mode = "ddp" if world_size > 1 else "none"
        if mode != "none" and world_size == 1 and "RANK" not in os.environ:
            raise TrainConfigError(f"--distributed {mode} needs a launcher: run with "
                                   f"`torchrun --nproc-per-node N -m meteor train …`")
        if mode == "none" and world_size > 1:
            raise TrainConfigError("launched by torchrun with several processes but --distributed none")
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if mode == "none":
            return cls("none", 0, 1, device)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(mode, torch_dist.get_rank(), torch_dist.get_world_size(), device)

    # --- wrapping -------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # Text-only micro-batches leave the compressor unused, so unused parameters are expected.
            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                           else None, find_unused_parameters=True)
        if self.mode == "fsdp":
            from .fsdp import shard_model

            return shard_model(model, self.device)
        return model

    def maybe_no_sync(self, wrapped: nn.Module, sync: bool):
        if self.mode == "ddp" and not sync:
            return wrapped.no_sync()
        if self.mode == "fsdp" and hasattr(wrapped, "set_requires_gradient_sync"):
            wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def autocast(self, precision: str):
        use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        if not use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def clip_grad_norm(self, wrapped: nn.Module, params, max_norm: float) -> None:
        params = [p for p in params if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, max_norm)

    # --- collectives ----------------------------------------------------------------------------
    def all_reduce_sum(self, value: float) -> float:
        return self.all_reduce_sum_many([value])[0]

    def all_reduce_sum_many(self, values: list[float]) -> list[float]:
        if self.mode == "none":
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def any_flag(self, flag: bool) -> bool:
        return self.all_reduce_sum(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        if self.mode != "none":
            torch_dist.barrier()

    def shutdown(self) -> None:
        if self.mode != "none" and torch_dist.is_initialized():
            torch_dist.destroy_process_group()

    # --- state ----------------------------------------------------------------------------------
    def gather_trainable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable tensors, on every rank's CPU."""
        if self.mode == "fsdp":
            from .fsdp import full_trainable_state

            return full_trainable_state(model)
        return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        if self.mode == "fsdp":
            from .fsdp import full_optimizer_state

            return full_optimizer_state(model, optimizer)
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if self.mode == "fsdp":
            from .fsdp import load_full_optimizer_state

            load_full_optimizer_state(model, optimizer, state)
            return
        optimizer.load_state_dict(state)

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Every parameter and buffer, unsharded, on the main process (None elsewhere); for the
        final save of an FSDP run into a plain, unsharded copy of the model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None
