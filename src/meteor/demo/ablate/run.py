"""Running an ablation: every (variant, training seed) trained and evaluated through the demo's
pipeline (cached, so a re-run or an interrupted run continues where it stopped), the elastic-budget
evaluations, the per-seed summaries and paired comparisons, and the files ``out/ablation/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from meteor.model.configuration import MeteorConfig
from meteor.model.projectors import count_parameters
from meteor.demo.config import DemoConfig, full_config, quick_config
from meteor.demo.ablate.tables import markdown
from meteor.demo.ablate.variants import (PAPER_BUDGETS, PAPER_WIDTHS, VARIANTS, Variant, compressed_budgets,
                       paper_width_config, select, variant_config, variant_stages)

def visual_tokens(sizes: Sequence[tuple[int, int]], k: int | None, world_config: Any) -> dict[str, float]:
    """Mean visual tokens per view and per image over images of ``sizes`` (width, height), as the
    processor lays them out: K per view, or every patch of each view when K is None."""
    from meteor.processing.slicing import plan_slices, view_token_counts

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


TRAINING_FREE = (("mlp", 0), ("mlp", 1), ("mlp", 2))
"""(a model trained with every token, the index of the budget K it is compressed to without any
training: CLS Top-K with its own MLP, as FasterVLM); each beside the Meteor trained at K."""


def training_free_rows(pipe, world, config: DemoConfig, by_variant: dict[str, list[tuple[Path, dict[str, Any]]]],
                       per_question: dict[str, list[dict[Any, int]]], types: dict[Any, str]) -> dict[str, Any]:
    """Each ``TRAINING_FREE`` model (every seed) loaded as CLS Top-K at K, summarised over seeds and
    compared with Top-Down Compression trained at K."""
    budgets, rows = compressed_budgets(config), {}
    for name, index in TRAINING_FREE:
        if name not in by_variant:
            continue
        k = budgets[index]
        overrides = {"projector": "cls_topk", "tokens_per_slice": k}
        runs = [(run_name(name, i), model_dir) for i, (model_dir, _) in enumerate(by_variant[name])]
        scores = [pipe.evaluate(world, model_dir, f"{run}+cls_topk@k{k}", compressor_overrides=overrides)
                  for run, model_dir in runs]
        correct = [correctness(pipe.out / "eval" / f"{run}+cls_topk@k{k}" / "predictions.jsonl") for run, _ in runs]
        reference = TRAINED_AT[index]
        row = f"{name}+cls_topk@k{k}"
        rows[row] = {"name": row, "trained": name, "k": k, "seeds": [config.seed + i for i in range(len(runs))],
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
    from meteor.eval import read_jsonl, world_exact_match

    return {row["question_id"]: int(world_exact_match(row["prediction"], row["answer"]))
            for row in read_jsonl(predictions)}


def summarise_seeds(per_seed: Sequence[dict[str, Any]], per_question: Sequence[dict[Any, int]],
                    reference: Sequence[dict[Any, int]] | None, types: dict[Any, str]) -> dict[str, Any]:
    """Per question type (and "all"): the mean accuracy over seeds ± its standard deviation, each
    seed's value, and, given the reference variant's per-question results, the paired difference
    to it with its 95 % interval (``meteor.eval.compare``)."""
    import numpy as np

    from meteor.eval.compare import paired_difference, seed_summary

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
    from meteor.demo.pipeline import open_pipeline

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
    elastic, training_free = {}, {}
    if any(t.name == "elastic" for t in chosen):
        log(f"[{total}/{total}] elastic budgets: the trained models at smaller K′ ...")
        elastic = elastic_rows(pipe, world, config, by_variant, per_question, types)
    if any(t.name == "training_free" for t in chosen):
        log(f"[{total}/{total}] training-free compression of the all-tokens models ...")
        training_free = training_free_rows(pipe, world, config, by_variant, per_question, types)
    log(f"[{total}/{total}] tables ...")
    folder = out / "ablation"
    folder.mkdir(exist_ok=True)
    results = {"tables": {t.name: {"title": t.title, "variants": [n for n in t.variants if n in rows],
                                   "paper": {n: asdict(row) for n, row in t.paper.items() if n in rows}}
                          for t in chosen},
               "variants": rows, "elastic": elastic, "training_free": training_free, "baselines": world.baselines,
               "paper_widths": PAPER_WIDTHS,
               "paper_budgets": PAPER_BUDGETS, "config": config.to_dict(), "timings": pipe.timings,
               "reused": pipe.reused, "seconds": round(time.perf_counter() - started, 1)}
    (folder / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (folder / "tables.md").write_text(markdown(results, chosen) + "\n")
    log(f"wrote {folder / 'tables.md'} and results.json in {results['seconds']} s"
        f"{' (reused: ' + ', '.join(pipe.reused) + ')' if pipe.reused else ''}")
    return results
