"""torch.distributed glue: torchrun's environment, DDP or FSDP, and the few collectives the loop needs.

Single-process runs go through the same object with every collective a no-op, so the loop has one
code path. The engines are PyTorch's own: `DistributedDataParallel` and FSDP2 (`fully_shard`, see
`fsdp.py`); CPU runs use the gloo backend, CUDA runs NCCL.

Every rank must issue the same collectives in the same order: the loop runs the same number of
micro-batches on every rank (a zero-weight filler when a rank has no record left), DDP is built
with `find_unused_parameters=True` and FSDP reduce-scatters zeros for unused parameters (a
text-only micro-batch leaves the compressor without gradients), and a stop signal is agreed on
with `any_flag` so that all ranks checkpoint and leave at the same step.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from meteor.train.args import TrainConfig, TrainConfigError


@dataclass
class DistributedRun:
    """How this process takes part in the run: its rank, the world size, its device, the engine."""

    mode: str             # "none", "ddp" or "fsdp"
    rank: int
    world_size: int
    device: torch.device
    _calls: Any = field(default=None, repr=False, compare=False)   # fsdp.CallTracker under FSDP

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, config: TrainConfig) -> "DistributedRun":
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
    def wrap(self, model: nn.Module, groups: list[dict]) -> tuple[nn.Module, list[dict]]:
        """The module to call for forward/backward, and the optimizer's parameter groups pointing
        at the parameters that will train: FSDP replaces every parameter by a sharded one (same
        name), so the optimizer must be built from the returned groups, after wrapping."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # Text-only micro-batches leave the compressor unused, so unused parameters are expected.
            return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                           else None, find_unused_parameters=True), groups
        if self.mode == "fsdp":
            from meteor.train.fsdp import CallTracker, shard_model

            # Hold names, not the unsharded parameters, while sharding: each unit's full tensors
            # are then freed as soon as it is sharded (the groups are refilled in place).
            names = {id(p): name for name, p in model.named_parameters()}
            group_names = [[names[id(p)] for p in group["params"]] for group in groups]
            for group in groups:
                group["params"].clear()
            shard_model(model, self.device)
            self._calls = CallTracker(model)
            sharded = dict(model.named_parameters())
            for group, wanted in zip(groups, group_names):
                group["params"].extend(sharded[name] for name in wanted)
            return model, groups
        return model, groups

    def maybe_no_sync(self, wrapped: nn.Module, sync: bool):
        if self.mode == "ddp" and not sync:
            return wrapped.no_sync()
        if self.mode == "fsdp":   # FSDP2's no_sync: accumulate unsharded grads, reduce on the last
            wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def autocast(self, precision: str):
        use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        if not use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def drop_unused_grads(self) -> None:
        """After the step's last backward, before clipping and the optimizer: under FSDP the
        gradients of a part no rank ran (the compressor in an all-text step) are zeros, not None;
        make them None so AdamW skips them as it does without FSDP. Collective under FSDP."""
        if self.mode == "fsdp" and self._calls is not None:
            self._calls.drop_unused_grads()

    def clip_grad_norm(self, wrapped: nn.Module, params, max_norm: float) -> None:
        """Clip by the norm of the whole gradient. Under FSDP the grads are DTensors sharded over
        the ranks; `clip_grad_norm_` reduces their norms over the mesh (PyTorch's DTensor path),
        so the norm is the full gradient's, as in a single process."""
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

    def all_reduce_sum_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the ranks, in one collective (every rank passes the same keys)."""
        return dict(zip(values, self.all_reduce_sum_many(list(values.values()))))

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
        """Full (unsharded) trainable tensors on the CPU: on every rank, except under FSDP where
        only the main process gets them ({} elsewhere). Collective under FSDP."""
        if self.mode == "fsdp":
            from meteor.train.fsdp import full_trainable_state

            return full_trainable_state(model)
        return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}

    def load_trainable(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Load full (unsharded) tensors, read by every rank from a checkpoint, into the model."""
        if self.mode == "fsdp":
            from meteor.train.fsdp import load_full_state

            load_full_state(model, weights)
            return
        model.load_state_dict(weights, strict=False)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        if self.mode == "fsdp":
            from meteor.train.fsdp import full_optimizer_state

            return full_optimizer_state(model, optimizer)
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if self.mode == "fsdp":
            from meteor.train.fsdp import load_full_optimizer_state

            load_full_optimizer_state(model, optimizer, state)
            return
        optimizer.load_state_dict(state)

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Every parameter and buffer, unsharded, on the main process (None elsewhere); for the
        final save of an FSDP run into a plain, unsharded copy of the model."""
        if self.mode != "fsdp":
            return model.state_dict() if self.is_main else None
        from meteor.train.fsdp import full_model_state

        state = full_model_state(model)
        return state if self.is_main else None
