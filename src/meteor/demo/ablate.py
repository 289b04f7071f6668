"""`meteor ablate`: the paper's Tables 1-4 as named variants, trained and evaluated in the demo's world.

A variant is a few overrides of the demo's compressor configuration; everything else (the world,
the tiny CLIP, the tiny LLaMA, the two-stage recipe, the seeds) is the demo's, so the rows of a
table differ only by what the variant names. The demo's pipeline caches each run in
``out/runs/<name>/`` by name and configuration, so a variant listed in several tables (the
default ``meteor``) is trained once, and a re-run reuses everything that did not change.

    from meteor.demo.ablate import run_ablation
    results = run_ablation("meteor-ablate", tables=["table2"], quick=True)

Writes ``out/ablation/results.json`` and ``out/ablation/tables.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..projectors import count_parameters
from ..config import CompressorConfig, MeteorConfig
from .config import DemoConfig, full_config, quick_config

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
"""Stage 2 on one record per question (``meteor.data.split_turns``), over as many steps as the demo's
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


# --- measurements -----------------------------------------------------------------------------------

def visual_tokens(sizes: Sequence[tuple[int, int]], k: int | None, world_config: Any) -> dict[str, float]:
    """Mean visual tokens per view and per image over images of ``sizes`` (width, height), as the
    processor lays them out: K per view, or every patch of each view when K is None."""
    from ..slicing import plan_slices, view_token_counts

    views = tokens = 0
    for width, height in sizes:
        plan = plan_slices(width, height, world_config.max_slices, world_config.patch_size, world_config.base_size)
        counts = view_token_counts(plan, k if k is not None else (lambda grid: grid[0] * grid[1]))
        views, tokens = views + len(counts), tokens + sum(counts)
    return {"per_view": tokens / max(views, 1), "per_image": tokens / max(len(sizes), 1)}


def _test_image_sizes(world: Any) -> list[tuple[int, int]]:
    from PIL import Image

    images = {}
    for line in world.test_path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            images.setdefault(record["image_id"], record["image"])
    sizes = []
    for image in images.values():
        with Image.open(world.image_folder / image) as opened:
            sizes.append(opened.size)
    return sizes


def run_log(stage_dir: Path) -> dict[str, float | None]:
    """Training-loop seconds (the last ``elapsed_s``) and mean ``tokens_per_s`` of a stage's log.jsonl."""
    path = stage_dir / "log.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    speeds = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    return {"seconds": rows[-1].get("elapsed_s") if rows else None,
            "tokens_per_s": sum(speeds) / len(speeds) if speeds else None}


def measure(variant: Variant, model_dir: Path, scores: dict[str, Any], sizes: Sequence[tuple[int, int]],
            world_config: Any) -> dict[str, Any]:
    """Tokens, parameters (demo and paper widths), training and evaluation cost of one trained variant."""
    built = MeteorConfig.load(model_dir).compressor           # holds the built model's C and D
    paper = paper_width_config(variant)
    stages = {f"stage{n}": run_log(model_dir.parent.parent / f"stage{n}") for n in (1, 2)}
    seconds = [s["seconds"] for s in stages.values()]
    return {
        "k": built.tokens_per_slice,
        "visual_tokens": visual_tokens(sizes, built.tokens_per_slice, world_config),
        "parameters": {"demo": count_parameters(built)["total"],
                       "demo_widths": {"C": built.vision_width, "D": built.text_width},
                       "paper_widths": count_parameters(paper)["total"],
                       "paper_k": paper.tokens_per_slice},
        "train_seconds": {**{n: s["seconds"] for n, s in stages.items()},
                          "total": round(sum(seconds), 3) if None not in seconds else None},
        "tokens_per_s": stages["stage2"]["tokens_per_s"],
        "eval_seconds": scores.get("seconds"),
    }


# --- the run ----------------------------------------------------------------------------------------

ELASTIC = (("meteor", 1), ("meteor", 2), ("meteor_11pct", 2))
"""(a variant trained at its K, the index among the demo's budgets of the smaller K′ it is also
evaluated at); each is compared with the variant trained at K′ (``TRAINED_AT``)."""
TRAINED_AT = {0: "meteor", 1: "meteor_11pct", 2: "meteor_5pct"}


def elastic_rows(pipe, world, config: DemoConfig, by_variant: dict[str, list[tuple[Path, dict[str, Any]]]],
                 per_question: dict[str, list[dict[Any, int]]], types: dict[Any, str]) -> dict[str, Any]:
    """Each ``ELASTIC`` model (every seed) evaluated at its smaller K′, summarised over seeds and
    compared with the model trained at K′."""
    budgets, rows = compressed_budgets(config), {}
    for name, index in ELASTIC:
        if name not in by_variant:
            continue
        k = budgets[index]
        runs = [(run_name(name, i), model_dir) for i, (model_dir, _) in enumerate(by_variant[name])]
        scores = [pipe.evaluate(world, model_dir, f"{run}@k{k}", tokens_per_slice=k) for run, model_dir in runs]
        correct = [correctness(pipe.out / "eval" / f"{run}@k{k}" / "predictions.jsonl") for run, _ in runs]
        reference = TRAINED_AT[index]
        row = f"{name}@k{k}"
        rows[row] = {"name": row, "trained": name, "trained_k": budgets[VARIANTS[name].budget_index],
                     "k": k, "seeds": [config.seed + i for i in range(len(runs))],
                     "compared_to": reference if reference in per_question else None,
                     **summarise_seeds(scores, correct, per_question.get(reference), types)}
    return rows


def run_name(variant: str, seed_index: int) -> str:
    """The folder name of a variant's run with its ``seed_index``-th training seed (the first keeps
    the variant's own name, so a one-seed ablation's runs are reused by a seeded one)."""
    return variant if seed_index == 0 else f"{variant}-seed{seed_index}"


def seed_counts(selected: Sequence[Variant], seeds: int | dict[str, int]) -> dict[str, int]:
    """Training seeds per variant: ``seeds`` for all, or a default under ``"*"`` and counts by name."""
    counts = dict(seeds) if isinstance(seeds, dict) else {"*": seeds}
    unknown = sorted(set(counts) - {"*"} - {v.name for v in selected})
    if unknown:
        raise ValueError(f"--seeds names variant(s) {unknown} that this ablation does not run; it runs "
                         f"{', '.join(v.name for v in selected)}")
    chosen = {v.name: counts.get(v.name, counts.get("*", 1)) for v in selected}
    bad = {name: n for name, n in chosen.items() if not isinstance(n, int) or n < 1}
    if bad:
        raise ValueError(f"seeds must be whole numbers ≥ 1, got {bad}")
    return chosen


def correctness(predictions: Path) -> dict[Any, int]:
    """question_id → 1 when the prediction is right (the world's exact match), from predictions.jsonl."""
    from ..evaluation import read_jsonl, world_exact_match

    return {row["question_id"]: int(world_exact_match(row["prediction"], row["answer"]))
            for row in read_jsonl(predictions)}


def summarise_seeds(per_seed: Sequence[dict[str, Any]], per_question: Sequence[dict[Any, int]],
                    reference: Sequence[dict[Any, int]] | None, types: dict[Any, str]) -> dict[str, Any]:
    """Per question type (and "all"): the mean accuracy over seeds ± its standard deviation, each
    seed's value, and, given the reference variant's per-question results, the paired difference
    to it with its 95 % interval (``meteor.evaluation.compare``)."""
    import numpy as np

    from ..evaluation.compare import paired_difference, seed_summary

    questions = sorted(per_question[0], key=str)
    accuracy, comparison = {}, {}
    groups = {t: [q for q in questions if types.get(q) == t] for t in dict.fromkeys(types[q] for q in questions)}
    groups["all"] = questions
    for group, ids in groups.items():
        values = [scores["accuracy"][group]["accuracy"] for scores in per_seed if group in scores["accuracy"]]
        summary = seed_summary(values)
        accuracy[group] = {"accuracy": round(summary.mean, 4), "sd": None if summary.sd is None else round(summary.sd, 4),
                           "per_seed": list(summary.per_seed), "questions": len(ids)}
        if reference is not None:
            mine = np.array([[run[q] for q in ids] for run in per_question])
            theirs = np.array([[run[q] for q in ids] for run in reference])
            comparison[group] = paired_difference(mine, theirs).__dict__
    return {"accuracy": accuracy, "comparison": comparison}


def run_ablation(out: str | Path = "meteor-ablate", tables: Sequence[str] | None = None,
                 variants: Sequence[str] | None = None, quick: bool = False, seed: int = 0,
                 force: bool = False, config: DemoConfig | None = None,
                 seeds: int | dict[str, int] = 1) -> dict[str, Any]:
    """Train and evaluate the variants of ``tables`` (all four by default; only ``variants`` if
    given) on the demo's world with the demo's recipe, each with ``seeds`` training seeds (the
    world, the CLIP and the LLaMA stay those of ``seed``); write ``out/ablation/``. Finished
    (variant, seed) runs are reused, so an interrupted ablation continues where it stopped."""
    from .pipeline import open_pipeline

    chosen, selected = select(tables, variants)
    config = config or (quick_config(seed) if quick else full_config(seed))
    configs = {v.name: variant_config(v, config) for v in selected}       # fail before any training
    counts = seed_counts(selected, seeds)
    pipe = open_pipeline(out, config, force)
    out, log, started = pipe.out, pipe.log, pipe.started
    runs = [(v, index) for v in selected for index in range(counts[v.name])]
    total = 4 + len(runs)
    log(f"[1/{total}] world: {config.world.n_train_images} train + {config.world.n_test_images} test images ...")
    world = pipe.world()
    log(f"[2/{total}] tokenizer (BPE, {config.vocab_size}) and tiny LLaMA {config.llama} ...")
    language_model = pipe.base_language_model(world)
    log(f"[3/{total}] tiny CLIP ...")
    clip = pipe.clip(world, language_model)
    sizes = _test_image_sizes(world)
    for index, (variant, seed_index) in enumerate(runs):
        in_tables = [t.name for t in chosen if variant.name in t.variants]
        log(f"[{4 + index}/{total}] {variant.name}, training seed {config.seed + seed_index} "
            f"({', '.join(in_tables)}): {variant.description} ...")
    finished = pipe.run_variants(world, clip, language_model,
                                 [(run_name(v.name, i), configs[v.name], config.seed + i, variant_stages(v, config))
                                  for v, i in runs])
    by_variant: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for (variant, _), result in zip(runs, finished):
        by_variant.setdefault(variant.name, []).append(result)
    types = {row["question_id"]: row["question_type"] for row in
             (json.loads(line) for line in world.test_path.read_text().splitlines() if line.strip())}
    per_question = {name: [correctness(out / "eval" / run_name(name, i) / "predictions.jsonl")
                           for i in range(len(results))] for name, results in by_variant.items()}
    rows = {}
    for variant in selected:
        results = by_variant[variant.name]
        model_dir, scores = results[0]
        in_tables = [t.name for t in chosen if variant.name in t.variants]
        reference = None if variant.compare_to == variant.name else per_question.get(variant.compare_to)
        seeded = summarise_seeds([s for _, s in results], per_question[variant.name], reference, types)
        rows[variant.name] = {
            "name": variant.name, "description": variant.description, "overrides": variant.overrides,
            "tables": in_tables, "model": str(model_dir), "models": [str(m) for m, _ in results],
            "compared_to": variant.compare_to if reference is not None else None, "stage2": variant.stage2,
            "seeds": [config.seed + i for i in range(len(results))], **seeded,
            "questions": scores.get("questions"), **measure(variant, model_dir, scores, sizes, world.config),
            "wall_seconds": {key: pipe.timings[key] for key in (f"{variant.name}/stage1", f"{variant.name}/stage2",
                                                                f"eval/{variant.name}") if key in pipe.timings}}
    elastic = {}
    if any(t.name == "elastic" for t in chosen):
        log(f"[{total}/{total}] elastic budgets: the trained models at smaller K′ ...")
        elastic = elastic_rows(pipe, world, config, by_variant, per_question, types)
    log(f"[{total}/{total}] tables ...")
    folder = out / "ablation"
    folder.mkdir(exist_ok=True)
    results = {"tables": {t.name: {"title": t.title, "variants": [n for n in t.variants if n in rows],
                                   "paper": {n: asdict(row) for n, row in t.paper.items() if n in rows}}
                          for t in chosen},
               "variants": rows, "elastic": elastic, "baselines": world.baselines, "paper_widths": PAPER_WIDTHS,
               "paper_budgets": PAPER_BUDGETS, "config": config.to_dict(), "timings": pipe.timings,
               "reused": pipe.reused, "seconds": round(time.perf_counter() - started, 1)}
    (folder / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (folder / "tables.md").write_text(markdown(results, chosen) + "\n")
    log(f"wrote {folder / 'tables.md'} and results.json in {results['seconds']} s"
        f"{' (reused: ' + ', '.join(pipe.reused) + ')' if pipe.reused else ''}")
    return results


# --- the tables -------------------------------------------------------------------------------------

def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _cell(entry: dict[str, Any] | None) -> str:
    """An accuracy cell: the mean over seeds ± their standard deviation (the mean alone for one seed)."""
    if not entry:
        return "–"
    sd = entry.get("sd")
    return _number(entry["accuracy"]) + ("" if sd is None else f" ± {sd:.3f}")


def _difference(row: dict[str, Any], group: str = "all") -> str:
    found = row.get("comparison", {}).get(group)
    if not found:
        return "–"
    return f"{found['difference']:+.3f} [{found['low']:+.3f}, {found['high']:+.3f}]"


def _millions(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value / 1e3:.1f}K"


def _types(results: dict[str, Any]) -> list[str]:
    types = [t for t in results["baselines"] if t != "all"]
    for row in results["variants"].values():
        types += [t for t in row["accuracy"] if t != "all" and t not in types]
    return types


def _mean(accuracy: dict[str, Any], types: Sequence[str], key: str = "accuracy") -> float | None:
    values = [accuracy[t][key] for t in types if t in accuracy and key in accuracy[t]]
    return sum(values) / len(values) if values else None


def markdown(results: dict[str, Any], tables: Sequence[Table]) -> str:
    """One markdown table per paper table from ``results`` (as written to results.json)."""
    types, baselines = _types(results), results["baselines"]
    config = results["config"]
    lines = ["# Ablations on the demo world", "",
             f"World: {config['world']['n_train_images']} train / {config['world']['n_test_images']} test "
             f"images, seed {config['seed']}; every variant has the same tiny CLIP, tiny LLaMA, recipe "
             f"and seed. Accuracy: exact match per question type; `all` pools the questions, `mean` "
             f"averages the types (like the paper's Avg over benchmarks). Tokens: visual tokens per view "
             f"and per image, mean over the test images' views. Parameters: the projector at the demo's "
             f"widths, and at the paper's (C={PAPER_WIDTHS['vision_width']}, D={PAPER_WIDTHS['text_width']}, "
             f"K={PAPER_BUDGETS[0]}/{PAPER_BUDGETS[1]}/{PAPER_BUDGETS[2]}, library defaults elsewhere) "
             f"beside the paper's figure. Train s: training-loop seconds, stage 1 + stage 2 (log.jsonl); "
             f"tokens/s: mean over stage-2 steps. Paper numbers are on its 12 benchmarks with Vicuna-13B: "
             f"compare directions, not values."]
    for table in tables:
        names = results["tables"][table.name]["variants"]
        rows = [results["variants"][n] for n in names]
        lines += ["", f"## {table.name}: {table.title}", ""]
        if table.name == "elastic":
            lines += _elastic(results.get("elastic", {}), rows, types)
            continue
        lines += _efficiency(rows, table, types) if table.efficiency else _accuracy(rows, table, types, baselines)
        if table.per_type_differences:
            lines += _per_type_differences(rows, types)
        lines += _claims(results, table)
    return "\n".join(lines)


def _elastic(elastic: dict[str, Any], trained: list[dict[str, Any]], types: list[str]) -> list[str]:
    head = ["model", "trained at K", "run at K", "seeds", *types, "all", "Δ all [95 %]", "vs"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for row in trained:
        k = row["k"]
        lines.append("| " + " | ".join([f"`{row['name']}`", str(k), str(k), str(len(row.get("seeds", [0]))),
                                        *[_cell(row["accuracy"].get(t)) for t in [*types, "all"]], "", ""]) + " |")
    for row in elastic.values():
        lines.append("| " + " | ".join([f"`{row['trained']}`", str(row["trained_k"]), str(row["k"]),
                                        str(len(row["seeds"])), *[_cell(row["accuracy"].get(t)) for t in [*types, "all"]],
                                        _difference(row), f"`{row['compared_to']}`" if row.get("compared_to") else ""])
                     + " |")
    return lines


def _per_type_differences(rows: list[dict[str, Any]], types: list[str]) -> list[str]:
    compared = [row for row in rows if row.get("compared_to")]
    if not compared:
        return []
    lines = ["", "Per question type, each row minus the row it is compared with (95 % interval, two-level "
                 "bootstrap over questions and seeds):", "",
             "| variant | vs | " + " | ".join(types) + " | all |", "|---|---|" + "---:|" * (len(types) + 1)]
    for row in compared:
        lines.append(f"| `{row['name']}` | `{row['compared_to']}` | "
                     + " | ".join(_difference(row, t) for t in [*types, "all"]) + " |")
    return lines


def claim_verdicts(results: dict[str, Any], table: Table) -> list[tuple[str, str, str]]:
    """(variant, the paper's claim about it, verdict) for every row of ``table`` the paper ranks
    below its default: confirmed when the default's accuracy is above the row's with 95 %
    confidence, contradicted when below, otherwise not resolved."""
    verdicts = []
    for name in results["tables"][table.name]["variants"]:
        claim = CLAIMS.get((table.name, name))
        found = results["variants"][name].get("comparison", {}).get("all")
        if claim is None or found is None:
            continue
        # the comparison is the variant minus its reference: the claim is that it is below 0, or, for
        # an improvement the claim is about (the question-conditioned token), above it
        better = IMPROVEMENTS.get((table.name, name), False)
        low, high = (found["low"], found["high"]) if better else (-found["high"], -found["low"])
        verdict = "confirmed" if low > 0 else "contradicted" if high < 0 else "not resolved at 95 %"
        verdicts.append((name, claim, verdict))
    return verdicts


def _claims(results: dict[str, Any], table: Table) -> list[str]:
    verdicts = claim_verdicts(results, table)
    if not verdicts:
        return []
    lines = ["", "The claims, each row against the row it is compared with (difference of overall accuracy, "
                 "two-level bootstrap over questions and seeds):", ""]
    for name, claim, verdict in verdicts:
        row = results["variants"][name]
        reference = results["variants"].get(row["compared_to"], {})
        lines.append(f"- {claim}: **{verdict}** ({_difference(row)} for `{name}` − `{row['compared_to']}`, "
                     f"{len(row.get('seeds', [0]))} seed(s) against {len(reference.get('seeds', [0]))}).")
    return lines


def _accuracy(rows: list[dict[str, Any]], table: Table, types: list[str],
              baselines: dict[str, Any]) -> list[str]:
    head = ["variant", "seeds", "tokens/view", "tokens/image", *types, "all", "Δ all [95 %]", "vs",
            "mean", "params (demo)", "params (paper widths)", "params (paper)", "train s", "tokens/s", "paper row",
            "paper avg"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 3) + "---|---:|"]
    for row in rows:
        paper = table.paper.get(row["name"])
        accuracy = row["accuracy"]
        cells = [f"`{row['name']}`", str(len(row.get("seeds", [0]))), _number(row["visual_tokens"]["per_view"], 1),
                 _number(row["visual_tokens"]["per_image"], 1),
                 *[_cell(accuracy.get(t)) for t in [*types, "all"]], _difference(row),
                 f"`{row['compared_to']}`" if row.get("compared_to") else "",
                 _number(_mean(accuracy, types)), _millions(row["parameters"]["demo"]),
                 _millions(row["parameters"]["paper_widths"]),
                 _millions(paper.parameters_m * 1e6) if paper and paper.parameters_m else "–",
                 _number(row["train_seconds"]["total"], 1), _number(row["tokens_per_s"], 0),
                 paper.label if paper else "", _number(paper.average, 1) if paper else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    for label, key in (("chance", "chance_accuracy"), ("majority", "majority_accuracy"),
                       ("blind prior", "form_majority_accuracy")):
        cells = [f"*{label}*", "", "", "", *[_number(baselines[t].get(key)) if t in baselines else "–"
                                             for t in [*types, "all"]], "", "",
                 _number(_mean(baselines, types, key)), *[""] * 7]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _efficiency(rows: list[dict[str, Any]], table: Table, types: list[str]) -> list[str]:
    head = ["variant", "tokens/view", "tokens/image", "params (demo)", "params (paper widths)", "params (paper)",
            "train s", "tokens/s", "eval s", "all", "mean", "paper row", "paper tokens", "paper train h",
            "paper TPS", "paper avg"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 10 + "---|" + "---:|" * 4]
    for row in rows:
        paper = table.paper.get(row["name"])
        cells = [f"`{row['name']}`", _number(row["visual_tokens"]["per_view"], 1),
                 _number(row["visual_tokens"]["per_image"], 1), _millions(row["parameters"]["demo"]),
                 _millions(row["parameters"]["paper_widths"]),
                 _millions(paper.parameters_m * 1e6) if paper and paper.parameters_m else "–",
                 _number(row["train_seconds"]["total"], 1), _number(row["tokens_per_s"], 0),
                 _number(row["eval_seconds"], 1), _number(row["accuracy"].get("all", {}).get("accuracy")),
                 _number(_mean(row["accuracy"], types))]
        if paper:
            cells += [paper.label, paper.tokens or "–", _number(paper.train_hours, 1),
                      _number(paper.tokens_per_s, 1), _number(paper.average, 1)]
        else:
            cells += ["", "–", "–", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
