"""`meteor demo`: LLaVA-Meteor trained and evaluated end to end in the synthetic world, on a CPU.

Steps (each cached in ``out/`` and reused by a re-run with the same configuration unless
``force``): the world (``meteor.demo.world``), a BPE tokenizer and a tiny LLaMA, a tiny CLIP trained
contrastively on the captions (``meteor.demo.clip``; both shipped), stage 1 and stage 2 with
``meteor.train.train`` once per token budget, evaluation of each on the test split
(``meteor.eval``), and the report folder ``out/report/``.

    from meteor.demo import run_demo
    results = run_demo("meteor-demo", quick=True)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from meteor.demo.config import DemoConfig, StageRun, full_config, quick_config
from meteor.demo.pipeline import Pipeline, budget_name, open_pipeline


def run_demo(out: str | Path = "meteor-demo", seed: int = 0, quick: bool = False, force: bool = False,
             config: DemoConfig | None = None, rebuild: Sequence[str] = ()) -> dict[str, Any]:
    """The whole demo in ``out``; ``rebuild`` names shipped assets to train here instead
    ("language_model", "clip")."""
    from meteor.pretrained import load_pretrained
    from meteor.demo import report

    config = config or (quick_config(seed) if quick else full_config(seed))
    pipe = open_pipeline(out, config, force, rebuild)
    out, log, started = pipe.out, pipe.log, pipe.started
    total = 5 + len(config.budgets)
    log(f"[1/{total}] world: {config.world.n_train_images} train + {config.world.n_test_images} test images ...")
    world = pipe.world()
    log(f"    {world.counts['stage2_questions']} train questions, {world.counts['test_questions']} test "
        f"questions, slices per image {world.slice_histogram['train']}{' (reused)' if world.reused else ''}")
    log(f"[2/{total}] tokenizer (BPE, {config.vocab_size}) and tiny LLaMA {config.llama} ...")
    language_model = pipe.base_language_model(world)
    images = config.clip_images or world.counts["stage1_records"]
    log(f"[3/{total}] tiny CLIP, contrastive on the captions of {images} "
        f"{'further unsliced train-split' if config.clip_images else 'train'} images ...")
    clip = pipe.clip(world, language_model)
    patches = (config.world.base_size // config.world.patch_size) ** 2
    budgets = run_budgets(pipe, world, clip, language_model, patches, total)
    log(f"[{total - 1}/{total}] figures ...")
    report_dir = out / "report"
    report_dir.mkdir(exist_ok=True)
    results = {"budgets": budgets, "patches_per_view": patches, "config": config.to_dict()}
    baselines = world.baselines
    report.accuracy_plot(results, baselines, patches, report_dir / "accuracy_vs_tokens.png")
    report.loss_plot({budget_name(k): out / "runs" / budget_name(k) for k in config.budgets},
                     report_dir / "training_loss.png")
    shown = next((b for b in budgets if b["k"] is not None), budgets[0])
    model, processor = load_pretrained(shown["model"])
    tests = [json.loads(line) for line in world.test_path.read_text().splitlines() if line.strip()]
    seen, figures = set(), []
    for record in tests:
        if record["image_id"] in seen or len(figures) >= config.figure_images:
            continue
        if record["meta"]["num_slices"] < 2 and len(figures) < config.figure_images - 1:
            continue   # show sliced images first: they have several views
        seen.add(record["image_id"])
        name = f"selection_{record['image_id']}.png"
        report.selection_figure(model, processor, world.image_folder / record["image"], record["question"],
                                report_dir / name)
        figures.append(name)
    log(f"[{total}/{total}] report ...")
    results["baselines"] = baselines
    results["timings"] = pipe.timings
    results["reused"] = pipe.reused
    results["seconds"] = round(time.perf_counter() - started, 1)
    notes = report.findings(results, baselines, patches)
    timings = {**pipe.timings, "total (this run)": results["seconds"]}
    report.write_markdown(report_dir / "report.md", results, baselines, patches, figures, timings, notes)
    results["findings"] = notes
    results["figures"] = figures
    (report_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    for note in notes:
        log("    " + note)
    log(f"wrote {report_dir / 'report.md'} in {results['seconds']} s"
        f"{' (reused: ' + ', '.join(pipe.reused) + ')' if pipe.reused else ''}")
    return results


def run_budgets(pipe: Pipeline, world, clip: Path, language_model: Path, patches: int, total: int
                ) -> list[dict[str, Any]]:
    """Stage 1, stage 2 and evaluation of every budget (``config.workers`` at a time); results in
    budget order."""
    from meteor.demo import report

    config = pipe.config
    parallel = config.workers > 1 and len(config.budgets) > 1
    for index, k in enumerate(config.budgets):
        pipe.log(f"[{4 + index}/{total}] budget {report.budget_label(k, patches)}: stage 1, stage 2, "
                 f"evaluation{' (in parallel)' if parallel else ''} ...")
    variants = [(budget_name(k), pipe.budget_config(world, k)) for k in config.budgets]
    finished = pipe.run_variants(world, clip, language_model, variants)
    return [{"k": k, "name": budget_name(k), "model": str(model_dir), "scores": scores}
            for k, (model_dir, scores) in zip(config.budgets, finished)]


__all__ = ["DemoConfig", "StageRun", "full_config", "quick_config", "run_demo"]
