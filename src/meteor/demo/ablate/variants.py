"""The ablation's registry: the paper's comparisons as named variants of the demo's model, grouped in
tables, with the paper's figures beside each row it reports and the claims each table tests.

A variant is a few overrides of the demo's compressor configuration (and, for some, of its stage-2
recipe); everything else (the world, the tiny CLIP, the tiny LLaMA, the two-stage recipe, the
seeds) is the demo's, so the rows of a table differ only by what the variant names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from meteor.model.configuration import CompressorConfig, MeteorConfig
from meteor.demo.config import DemoConfig, full_config

PAPER_WIDTHS = {"vision_width": 1024, "text_width": 5120}
"""C and D of the paper's model: CLIP ViT-L/14 and Vicuna-13B."""

PAPER_BUDGETS = (144, 64, 32)
"""The paper's K per slice of 576 patches. The demo's compressed budgets (16, 7, 3 of 64 patches)
are the same fractions, so budget i of a variant is the paper's PAPER_BUDGETS[i]."""


# --- the registry -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PaperRow:
    """What the paper reports for the row a variant reproduces (None where it reports nothing)."""

    label: str
    tokens: str | None = None
    """Visual tokens as the paper's table gives them (Table 1: per image; Table 4: per slice)."""
    average: float | None = None
    """The paper's average over its 12 benchmarks ("Avg")."""
    parameters_m: float | None = None
    """Projector parameters in millions (Table 4)."""
    train_hours: float | None = None
    tokens_per_s: float | None = None


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    """CompressorConfig fields that differ from the demo's default (not K: see ``budget_index``)."""
    budget_index: int | None = 0
    """Index of K in the demo's compressed budgets (and in PAPER_BUDGETS); None keeps every token."""
    stage2: dict[str, Any] = field(default_factory=dict)
    """StageRun fields of stage 2 that differ from the demo's recipe (e.g. single-question records)."""
    compare_to: str = "meteor"
    """The variant each of its accuracies is compared with (the paired difference and interval)."""

    def compressor_options(self, budgets: Sequence[int]) -> dict[str, Any]:
        if self.budget_index is not None and self.budget_index >= len(budgets):
            raise ValueError(f"variant {self.name!r} uses compressed budget #{self.budget_index}, but the "
                             f"configuration has only {list(budgets)}: add budgets to DemoConfig.budgets")
        k = None if self.budget_index is None else budgets[self.budget_index]
        return {**self.overrides, "tokens_per_slice": k}


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    variants: tuple[str, ...]
    paper: dict[str, PaperRow] = field(default_factory=dict)
    """The paper's row beside each variant it reports."""
    efficiency: bool = False
    """Table 4's layout: cost columns first, accuracy reduced to the average."""
    per_type_differences: bool = False
    """Also list each row's difference to the row it is compared with, per question type."""


SINGLE_TURN = {"single_turn": True}
"""Stage 2 on one record per question (``meteor.train.data.split_turns``), over as many steps as the demo's
multi-turn recipe (``variant_stages`` divides its epochs by the world's questions per image)."""

VARIANTS = {v.name: v for v in (
    Variant("meteor", "Top-Down Compression, the paper's defaults (L2S scan, window 3, both experts, λ 0.8)"),
    Variant("mlp", "LLaVA-1.5: the MLP on every token", {"projector": "mlp"}, budget_index=None),
    Variant("resampler", "LLaVA-UHD's compression layer: K learned queries", {"projector": "resampler"}),
    Variant("avgpool", "average pooling of the patch grid to K tokens", {"projector": "avgpool"}),
    Variant("cls_topk", "training-free Top-K by CLS attention (FasterVLM)", {"projector": "cls_topk"}),
    Variant("random_topk", "K random tokens: the floor", {"projector": "random_topk"}),
    Variant("meteor_11pct", "Top-Down Compression keeping 11% of the patches (the paper's K=64)", budget_index=1),
    Variant("meteor_5pct", "Top-Down Compression keeping ~5% of the patches (the paper's K=32)", budget_index=2),
    Variant("scan_single", "single scan: no local tokens TL", {"scan_mode": "single"}),
    Variant("scan_both", "single and L2S sequences through one block, averaged", {"scan_mode": "both"}),
    Variant("window5", "L2S with a 5×5 local window", {"window_size": 5}),
    Variant("window7", "L2S with a 7×7 local window", {"window_size": 7}),
    Variant("expert_visual", "visual expert only (CLS attention)", {"expert_mode": "visual"}),
    Variant("expert_native", "native expert only (instruction token)", {"expert_mode": "native"}),
    Variant("lam0.2", "both experts, λ = 0.2", {"lam": 0.2}),
    Variant("lam0.5", "both experts, λ = 0.5", {"lam": 0.5}),
    Variant("lam0.9", "both experts, λ = 0.9", {"lam": 0.9}),
    Variant("single_turn", "the paper's instruction token, trained on one record per question",
            stage2=SINGLE_TURN),
    Variant("instruction_question", "a question-conditioned instruction token (not in the paper), one record "
            "per question", {"instruction": "question"}, stage2=SINGLE_TURN, compare_to="single_turn"),
    Variant("single_turn_11pct", "the paper's instruction token at 11% of the patches, one record per question",
            budget_index=1, stage2=SINGLE_TURN, compare_to="meteor_11pct"),
    Variant("question_11pct", "the question-conditioned instruction token at 11% of the patches",
            {"instruction": "question"}, budget_index=1, stage2=SINGLE_TURN, compare_to="single_turn_11pct"),
    Variant("single_turn_5pct", "the paper's instruction token at ~5% of the patches, one record per question",
            budget_index=2, stage2=SINGLE_TURN, compare_to="meteor_5pct"),
    Variant("question_5pct", "the question-conditioned instruction token at ~5% of the patches",
            {"instruction": "question"}, budget_index=2, stage2=SINGLE_TURN, compare_to="single_turn_5pct"),
)}
DEFAULT_VARIANT = "meteor"

CLAIMS = {
    ("table1", "resampler"): "Table 1: Top-Down Compression beats LLaVA-UHD's resampler at the same tokens",
    ("table1", "avgpool"): "Table 1: Top-Down Compression beats pooling to the same tokens",
    ("table1", "cls_topk"): "Table 1: Top-Down Compression beats training-free CLS Top-K at the same tokens",
    ("table1", "random_topk"): "Table 1: Top-Down Compression beats random Top-K at the same tokens",
    ("table2", "scan_single"): "Table 2: the local-to-single scan beats the single scan",
    ("table3", "expert_visual"): "Table 3: both experts beat the visual expert alone",
    ("table3", "expert_native"): "Table 3: both experts beat the native expert alone",
    ("table3", "instruction_question"): "the question-conditioned instruction token beats the paper's (both on "
                                        "one record per question, K=16)",
    ("question", "question_11pct"): "the question-conditioned instruction token beats the paper's at 11 % of the patches",
    ("question", "question_5pct"): "the question-conditioned instruction token beats the paper's at 5 % of the patches",
}
"""The comparative claims: (table, variant) → the claim about the variant against the one it is
compared with (for the paper's, that its default beats the variant)."""

IMPROVEMENTS = {("question", "question_11pct"): True, ("question", "question_5pct"): True,
                ("table3", "instruction_question"): True}
"""Claims that a variant beats the row it is compared with (not that it loses to it)."""

_UHD = PaperRow("LLaVA-UHD", "144", 60.4, 137.84, 17.2, 28.4)
_METEOR = (PaperRow("LLaVA-Meteor 144", "144", 62.4, 37.08, 13.7, 29.1),
           PaperRow("LLaVA-Meteor 64", "64", 61.0, 37.08, 12.9, 31.3),
           PaperRow("LLaVA-Meteor 32", "32", 59.3, 37.08, 12.1, 32.9))

TABLES = {t.name: t for t in (
    Table("table1", "Projectors at the same token budget (paper Table 1: Meteor vs LLaVA-UHD and LLaVA-1.5)",
          ("meteor", "mlp", "resampler", "avgpool", "cls_topk", "random_topk"),
          {"meteor": PaperRow("LLaVA-Meteor", "~256", 62.4, 37.08), "mlp": PaperRow("LLaVA-1.5 (7B)", "576"),
           "resampler": PaperRow("LLaVA-UHD", "~256", 60.4, 137.84)}),
    Table("table2", "Scanning strategies of Flash Global Fusion (paper Table 2; windows 5 and 7 from §4.4)",
          ("scan_single", "meteor", "scan_both", "window5", "window7"),
          {"scan_single": PaperRow("Single", average=61.1), "meteor": PaperRow("Local-to-Single", average=62.4)}),
    Table("table3", "Expert selection strategies and λ (paper Table 3; the paper reports only λ = 0.8; "
          "λ = 1 and 0 are close to the visual-only and native-only rows)",
          ("expert_visual", "expert_native", "meteor", "lam0.2", "lam0.5", "lam0.9", "single_turn",
           "instruction_question"),
          {"expert_visual": PaperRow("Visual", average=59.0), "expert_native": PaperRow("Native", average=58.3),
           "meteor": PaperRow("Visual-Native", average=62.4)}),
    Table("table4", "Efficiency (paper Table 4): the Table 1 projectors and Meteor at the smaller budgets",
          ("meteor", "meteor_11pct", "meteor_5pct", "mlp", "resampler", "avgpool", "cls_topk", "random_topk"),
          {"resampler": _UHD, "meteor": _METEOR[0], "meteor_11pct": _METEOR[1], "meteor_5pct": _METEOR[2]},
          efficiency=True),
    Table("elastic", "Elastic budgets (not in the paper, which trains one model per K): a model trained at K "
          "evaluated at a smaller K′ (selection has no parameters), beside the model trained at K′",
          ("meteor", "meteor_11pct", "meteor_5pct")),
    Table("training_free", "Training-free compression (FasterVLM's setting): the LLaVA-1.5 model trained with "
          "every token, loaded as CLS Top-K at K with its own MLP, beside Top-Down Compression trained at K",
          ("mlp", "meteor", "meteor_11pct", "meteor_5pct")),
    Table("question", "A question-conditioned instruction token (not in the paper; its §1: 'the instruction "
          "token is not conditioned on explicit prompts') against the paper's, both trained on one record per "
          "question, at 11 % and 5 % of the patches",
          ("single_turn_11pct", "question_11pct", "single_turn_5pct", "question_5pct"), per_type_differences=True),
)}


def select(tables: Sequence[str] | None = None, variants: Sequence[str] | None = None
           ) -> tuple[list[Table], list[Variant]]:
    """The chosen tables and the variants to run, each once, in table order. Unknown names raise
    a ValueError listing the valid ones."""
    tables = list(tables or TABLES)
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}; valid tables: {', '.join(TABLES)}")
    chosen = [TABLES[t] for t in dict.fromkeys(tables)]
    names = list(dict.fromkeys(v for table in chosen for v in table.variants))
    if variants:
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; valid variants: {', '.join(VARIANTS)}")
        outside = [v for v in variants if v not in names]
        if outside:
            raise ValueError(f"variant(s) {outside} are in none of the tables {[t.name for t in chosen]}; "
                             f"those tables have: {', '.join(names)}")
        names = [n for n in names if n in variants]
    return chosen, [VARIANTS[n] for n in names]


def compressed_budgets(config: DemoConfig) -> tuple[int, ...]:
    return tuple(k for k in config.budgets if k is not None)


def variant_config(variant: Variant, config: DemoConfig) -> MeteorConfig:
    """The demo's model configuration with the variant's overrides (as ``Pipeline.budget_config``)."""
    options = {**config.compressor, **variant.compressor_options(compressed_budgets(config))}
    return MeteorConfig(compressor=CompressorConfig(**options), max_slices=config.world.max_slices)


def variant_stages(variant: Variant, config: DemoConfig) -> dict[int, Any] | None:
    """The variant's two-stage recipe when it differs from the demo's (None: the demo's)."""
    if not variant.stage2:
        return None
    options = dict(variant.stage2)
    if options.get("single_turn") and "epochs" not in options:
        options["epochs"] = config.stage2.epochs / config.world.questions_per_image
    return {1: config.stage1, 2: dataclasses.replace(config.stage2, **options)}


def paper_width_config(variant: Variant) -> CompressorConfig:
    """The variant at the paper's widths and K, with the library defaults elsewhere (e.g. Mamba's
    d_state 16, where the demo uses 8)."""
    return CompressorConfig(**variant.compressor_options(PAPER_BUDGETS), **PAPER_WIDTHS)


def describe_variants(tables: Sequence[str] | None = None, variants: Sequence[str] | None = None,
                      config: DemoConfig | None = None) -> str:
    """The `--list` text: per table, each variant with K and its overrides."""
    config = config or full_config()
    chosen, selected = select(tables, variants)
    budgets, names = compressed_budgets(config), {v.name for v in selected}
    lines = [f"demo compressor: {config.compressor}; K per view: {budgets} (paper: {PAPER_BUDGETS})"]
    for table in chosen:
        lines.append(f"\n{table.name}: {table.title}")
        for variant in (VARIANTS[n] for n in table.variants if n in names):
            k = "all tokens" if variant.budget_index is None else (f"K={budgets[variant.budget_index]} "
                                                             f"(paper {PAPER_BUDGETS[variant.budget_index]})")
            overrides = ", ".join(f"{key}={value}" for key, value in variant.overrides.items()) or "(default)"
            lines.append(f"  {variant.name:<14} {k:<20} {overrides:<26} {variant.description}")
    return "\n".join(lines)
