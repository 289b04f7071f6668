"""Training options: one typed dataclass, the two paper stages as presets, the CLI generated from it."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from meteor.processing.conversation import TEMPLATES, Template
from meteor.options import add_dataclass_arguments, dataclass_from_namespace

Stage = Literal[1, 2]
DistributedMode = Literal["auto", "none", "ddp", "fsdp"]
Precision = Literal["auto", "fp32", "bf16"]
ProgressStyle = Literal["bar", "lines", "none"]


class TrainConfigError(ValueError):
    """An impossible training option; the message names it and what to do."""


@dataclass
class TrainConfig:
    stage: Stage = 1
    """1: pre-training (only Top-Down Compression trains, template plain); 2: instruction tuning
    (compressor and LLM train, template vicuna_v1). Sets the defaults marked 'stage preset'."""

    data: str = ""
    """LLaVA-format JSON list or JSONL file of records."""

    image_folder: str | None = None
    """Folder the records' 'image' paths are relative to."""

    output_dir: str = ""
    """Where checkpoints, logs and the final model go."""

    model: str | None = None
    """A LLaVA-Meteor folder (save_pretrained) to start from; or give --vision and --language-model."""

    vision: str | None = None
    """Local CLIP folder (CLIPVisionModel or CLIPModel), when not starting from --model."""

    language_model: str | None = None
    """Local causal-LM folder (e.g. Vicuna), when not starting from --model; also the tokenizer."""

    base_size: int | None = None
    """Side in pixels UHD slicing sizes every view to, for a new model (--vision and
    --language-model); default: the tower's native side (336 for CLIP ViT-L/14-336, 518 for DINOv2).
    A multiple of the patch size; a model from --model keeps its own."""

    compressor_from: str | None = None
    """Stage-1 output (its folder or compressor.safetensors) whose compressor weights start stage 2,
    as LLaVA starts from its projector file."""

    meteor_config: str | None = None
    """JSON file of MeteorConfig options for a new model (K per view, λ, scan mode, …)."""

    template: Template | None = None
    """Conversation template (README, Conversation templates); stage preset: plain (1), vicuna_v1 (2).
    plain: the image, then the caption; vicuna_v1: FastChat's Vicuna format; chat_template: the
    tokenizer's own (LLaMA-3, Qwen2, Mistral, …); auto: chat_template when the tokenizer has one,
    else vicuna_v1."""

    learning_rate: float | None = None
    """Peak learning rate; stage preset: 1e-3 (1), 2e-5 (2); with LoRA: lora_learning_rate."""

    global_batch_size: int | None = None
    """Samples per optimizer step over all devices; stage preset: 256 (1), 128 (2)."""

    per_device_batch_size: int = 4
    """Samples per forward pass on one device; gradient accumulation makes up the rest."""

    epochs: float = 1.0
    """Passes over the data (the paper: 1 per stage)."""

    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs for the schedule length too)."""

    warmup_ratio: float = 0.03
    """Fraction of the steps with linear learning-rate warm-up before cosine decay."""

    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping (LLaVA: 1.0); 0 disables it."""

    max_length: int = 2048
    """Longest tokenised sample; longer ones are truncated (counted) or dropped if the cut would
    split an image or leave no answer token."""

    seed: int = 42
    lora: bool = False
    """Stage 2 only: train LoRA adapters on the LLM instead of all its weights (needs peft)."""

    lora_rank: int = 128
    lora_alpha: int = 256
    lora_learning_rate: float = 2e-4
    """LoRA adapters' learning rate (LLaVA's LoRA recipe); the compressor keeps learning_rate."""

    freeze_projector_mlp: bool = False
    """Keep the projector's MLP as it starts (e.g. LLaVA-1.5's, from a model converted with
    ``meteor convert --from-llava``) and train the rest of the compressor: in stage 1, Flash Global
    Fusion and the instruction token only."""

    gradient_checkpointing: bool = False
    feature_cache: str | None = None
    """Keep the frozen vision tower's outputs: a folder (shared by runs with the same tower, e.g.
    stage 1 and stage 2 and every budget), or "memory" (this run only, up to 1 GiB). Exact: the
    cached outputs are the tower's own. Default: encode every view at every step."""

    example_cache_mb: int = 0
    """Keep encoded records (token ids and the image's normalised views) in memory, up to this many
    MiB, so the epochs after the first skip image decoding, slicing and tokenising: the same
    tensors, so the same training. 0: encode every record at every step."""

    precision: Precision = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16."""

    distributed: DistributedMode = "auto"
    """auto: DDP when launched by torchrun with more than one process; ddp; fsdp (sharded, for a
    13B LLM); none."""

    save_every: int = 100
    """Optimizer steps between checkpoints (one is also written at the end and on SIGTERM/SIGINT)."""

    keep_checkpoints: int = 2
    log_every: int = 1
    progress: ProgressStyle = "bar"
    """Progress on the terminal: a bar; one line per tenth of the run ("lines": for runs that share
    a terminal, and for logs); or none."""
    resume: bool = False
    """Continue from the newest complete checkpoint in output_dir."""

    strict: bool = False
    """Stop at the first bad record instead of skipping and counting it."""

    def __post_init__(self) -> None:
        presets = STAGE_PRESETS.get(self.stage)
        if presets is None:
            raise TrainConfigError(f"stage must be 1 (pre-training) or 2 (instruction tuning), got {self.stage}")
        for name, value in presets.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.lora and self.stage != 2:
            raise TrainConfigError("--lora applies to stage 2 (the LLM is frozen in stage 1)")
        if self.example_cache_mb < 0:
            raise TrainConfigError(f"example_cache_mb must be ≥ 0 (0: off), got {self.example_cache_mb}")
        for name in ("global_batch_size", "per_device_batch_size", "save_every", "log_every",
                     "keep_checkpoints", "lora_rank", "lora_alpha"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise TrainConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainConfigError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.epochs <= 0:
            raise TrainConfigError(f"epochs must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainConfigError(f"max_steps must be ≥ 1, got {self.max_steps}")
        if self.progress not in get_args(ProgressStyle):
            raise TrainConfigError(f"progress must be one of {get_args(ProgressStyle)}, got {self.progress!r}")
        if self.precision not in get_args(Precision):
            raise TrainConfigError(f"precision must be one of {get_args(Precision)}, got {self.precision!r}")
        if self.distributed not in get_args(DistributedMode):
            raise TrainConfigError(f"distributed must be one of {get_args(DistributedMode)}, got {self.distributed!r}")
        if self.template not in TEMPLATES:
            raise TrainConfigError(f"template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")

    def validate_sources(self) -> None:
        """Checks that need the file system; called when a run starts."""
        if not self.data:
            raise TrainConfigError("--data is required: a LLaVA-format JSON or JSONL file")
        if not Path(self.data).is_file():
            raise TrainConfigError(f"--data {self.data} does not exist")
        if not self.output_dir:
            raise TrainConfigError("--output-dir is required")
        if self.model is not None and self.base_size is not None:
            raise TrainConfigError("--base-size sets the view side of a new model (--vision and --language-model); "
                                   "a model from --model keeps the one it was built with")
        if self.model is None and (self.vision is None or self.language_model is None):
            raise TrainConfigError("give --model (a LLaVA-Meteor folder) or both --vision and "
                                   "--language-model (local Hugging Face folders)")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


STAGE_PRESETS: dict[int, dict[str, Any]] = {
    1: {"template": "plain", "learning_rate": 1e-3, "global_batch_size": 256},
    2: {"template": "vicuna_v1", "learning_rate": 2e-5, "global_batch_size": 128},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field, with the field's docstring as help."""
    add_dataclass_arguments(parser, TrainConfig)


def from_namespace(args: argparse.Namespace) -> TrainConfig:
    return dataclass_from_namespace(TrainConfig, args)
