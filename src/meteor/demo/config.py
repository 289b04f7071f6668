"""What `meteor demo` builds, in one place: the full demo and `--quick`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from meteor.demo.clip import ClipPretrainConfig
from meteor.model.configuration import ConfigError
from meteor.demo.world import WorldConfig
from meteor.demo.language import LanguagePretraining


@dataclass(frozen=True)
class StageRun:
    """One training stage as the demo runs it through ``meteor.train.train``."""

    epochs: float
    global_batch_size: int
    learning_rate: float
    per_device_batch_size: int = 16
    scene_distillation: float = 0.0
    """Weight of the scene-distillation loss (``meteor.demo.distill``; 0: off)."""
    glyph_alignment: float = 0.0
    """Weight of the glyph-alignment loss (``meteor.demo.glyphs``; 0: off)."""
    single_turn: bool = False
    """Train on one record per question (``meteor.train.data.split_turns``: each image with each of its
    questions) instead of the world's multi-turn records, for models whose selection depends on the
    question. With ``epochs`` divided by the questions per image, it takes the same steps."""


@dataclass(frozen=True)
class DemoConfig:
    world: WorldConfig
    """The synthetic world (seeded): 112-px views, an 8×8 patch grid per view, up to 6 slices."""
    clip: ClipPretrainConfig
    """The tiny CLIP trained contrastively on the world's captions."""
    clip_images: int = 4000
    """The CLIP's own corpus: this many further train-split scenes of the world, drawn unsliced at
    the tower's view size (0: the world's train images, each squeezed to one view). In a squeezed
    sliced image the shapes are a few pixels wide (docs/demo-findings.md)."""
    clip_foils: bool = True
    """Train the CLIP with hard-negative captions (one shape, colour, size, count or text swapped;
    ``meteor.demo.world.captions.foil_caption``), so it cannot match captions by colour alone."""
    clip_regions: bool = True
    """Train the CLIP with the region–phrase loss too (``pretrain_clip``'s ``regions``): each shape's
    and text's patch tokens, averaged over its box, must pick its own phrase ("a small red star",
    'the word "CAT"') among the batch's phrases and their foils: the caption loss alone trains the
    pooled output, not the patch tokens the compressor reads."""
    vocab_size: int = 1024
    """Byte-level BPE vocabulary trained on the world's texts."""
    llama: dict[str, int] = field(default_factory=lambda: dict(
        hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2))
    """Tiny LlamaForCausalLM widths."""
    language_pretraining: LanguagePretraining | None = LanguagePretraining()
    """Pretrain the tiny LLaMA on the world's scenes written as text (the shipped asset when it
    fits); None: random initialisation (``--quick``, whose LLaMA learns nothing in a minute)."""
    budgets: tuple[int | None, ...] = (None, 16, 7, 3)
    """Visual tokens kept per view, K, of the 64 patches: all, 25 %, 11 %, 4.7 % (the paper's
    576 → 144 / 64 / 32 ratios). Each budget is its own training, stage 1 and stage 2, as in
    the paper, which trains one model per K."""
    stage1: StageRun = StageRun(epochs=3, global_batch_size=16, learning_rate=1e-3, scene_distillation=2.0,
                                glyph_alignment=1.0)
    """The paper's stage-1 recipe (lr 1e-3) with a smaller global batch for enough steps, three
    epochs instead of one, plus the two training aids that are not in the paper
    (``meteor.demo.aids``: scene distillation and glyph alignment). docs/demo-findings.md says what
    each choice changed."""
    stage2: StageRun = StageRun(epochs=4, global_batch_size=16, learning_rate=2e-3, scene_distillation=2.0,
                                glyph_alignment=1.0)
    """Stage 2 fine-tunes a tiny LLM pretrained on text only, so it needs a much higher learning rate
    than the paper's 2e-5 for Vicuna-13B; four epochs (252 steps). Scene distillation gives the LLM
    a dense signal to carry its text skills over to visual tokens; glyph alignment teaches the
    projector the world's texts (``meteor.demo.aids``; docs/demo-findings.md)."""
    compressor: dict[str, Any] = field(default_factory=lambda: dict(d_state=8, expand=2))
    """Compressor options besides K (Mamba state and expansion kept small)."""
    eval_batch_size: int = 32
    figure_images: int = 3
    """Test images drawn with the tokens each expert kept (the paper's Figure 4)."""
    example_cache_mb: int = 1024
    """Encoded training records kept in memory by each training (``TrainConfig.example_cache_mb``):
    the full demo's 1000 images take about 650 MB, so the epochs after the first skip decoding,
    slicing and tokenising. The same tensors, so the same training; 0 turns it off."""
    threads: int = 1
    """torch threads. On a shared 2-core machine one thread was 5-50× faster than two for these
    tiny matrices (thread contention dominates); raise it on a quiet machine."""
    workers: int | None = None
    """Worker processes that run the demo's tasks (each budget's stage 1, stage 2 and evaluation,
    and the figures; ``meteor.demo.schedule``), one task each at a time with ``threads`` threads,
    the longest remaining chain first; None: this machine's cores, at most four. 1 runs them one
    after another in this process. Each task computes the same numbers wherever and whenever it
    runs (one thread each), so the results do not depend on the count."""
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.workers is not None and self.workers < 1) or self.threads < 1:
            raise ConfigError(f"DemoConfig.workers and threads must be ≥ 1, got {self.workers} and {self.threads}")
        if self.clip_images < 0 or self.clip_images == 1:
            raise ConfigError(f"DemoConfig.clip_images must be 0 (the world's own train images) or ≥ 2 "
                              f"(contrastive batches need two captions), got {self.clip_images}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["world"] = self.world.to_dict()
        return data


def full_config(seed: int = 0) -> DemoConfig:
    return DemoConfig(
        # Small text a 4-layer CLIP at 8×8 patches can read: single digits and words 1-1.5 patches
        # tall in a bold weight, and 20 CLIP epochs (docs/demo-findings.md).
        # 600 test images, 2400 questions: 400 per type, so a type's accuracy is known to ±0.05 (95 %)
        # instead of the ±0.071 of 300 images, which was wider than the gaps the report judges.
        world=WorldConfig(seed=seed, n_train_images=1000, n_test_images=600, base_size=112,
                          number_digits=1, text_height_patches=(1.0, 1.5), text_stroke=0.05),
        clip=ClipPretrainConfig(image_size=112, epochs=20, learning_rate=2e-3, region_weight=2.0, seed=seed),
        seed=seed)


def quick_config(seed: int = 0) -> DemoConfig:
    """About a minute: the same pipeline on a world of 96 images, a few steps per stage."""
    return DemoConfig(
        world=WorldConfig(seed=seed, n_train_images=96, n_test_images=12, base_size=112),
        clip=ClipPretrainConfig(image_size=112, epochs=2, seed=seed, vision_width=32, text_width=32,
                                projection_dim=32),
        vocab_size=512,
        llama=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1),
        stage1=StageRun(epochs=1, global_batch_size=48, learning_rate=1e-3, scene_distillation=2.0,
                        glyph_alignment=1.0),
        stage2=StageRun(epochs=1, global_batch_size=48, learning_rate=1e-3, scene_distillation=2.0,
                        glyph_alignment=1.0),
        clip_images=96, language_pretraining=None, figure_images=2, seed=seed)
