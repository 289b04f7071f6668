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
    report_dir = out / "report"
    report_dir.mkdir(exist_ok=True)
    shown = next((k for k in config.budgets if k is not None), config.budgets[0])
    budgets, figures = run_budgets(pipe, world, clip, language_model, patches, total, shown)
    log(f"[{total - 1}/{total}] figures ...")
    figures_started = pipe._clock()
    results = {"budgets": budgets, "patches_per_view": patches, "config": config.to_dict()}
    baselines = world.baselines
    report.accuracy_plot(results, baselines, patches, report_dir / "accuracy_vs_tokens.png")
    report.loss_plot({budget_name(k): out / "runs" / budget_name(k) for k in config.budgets},
                     report_dir / "training_loss.png")
    pipe._timed("plots", figures_started)
    log(f"[{total}/{total}] report ...")
    results["baselines"] = baselines
    results["timings"] = pipe.timings
    results["cpu_timings"] = pipe.cpu_timings
    results["reused"] = pipe.reused
    results["seconds"] = round(time.perf_counter() - started, 1)
    notes = report.findings(results, baselines, patches)
    timings = {**pipe.timings, "total (this run)": results["seconds"]}
    report.write_markdown(report_dir / "report.md", results, baselines, patches, figures, timings, notes,
                          pipe.cpu_timings)
    results["findings"] = notes
    results["figures"] = figures
    (report_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    for note in notes:
        log("    " + note)
    log(f"wrote {report_dir / 'report.md'} in {results['seconds']} s"
        f"{' (reused: ' + ', '.join(pipe.reused) + ')' if pipe.reused else ''}")
    return results


def run_budgets(pipe: Pipeline, world, clip: Path, language_model: Path, patches: int, total: int,
                shown: int | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Stage 1, stage 2 and evaluation of every budget, and the selection figures of budget
    ``shown`` (once its stage 2 is done), as one graph of tasks (``Pipeline.run_variants``); the
    budgets' results in budget order, and the figures' file names."""
    from meteor.demo import report
    from meteor.demo.pipeline import _figures_task, worker_count
    from meteor.demo.schedule import Task

    config = pipe.config
    parallel = worker_count(config) > 1 and len(config.budgets) > 1
    for index, k in enumerate(config.budgets):
        pipe.log(f"[{4 + index}/{total}] budget {report.budget_label(k, patches)}: stage 1, stage 2, "
                 f"evaluation{' (in parallel)' if parallel else ''} ...")
    variants = [(budget_name(k), pipe.budget_config(world, k)) for k in config.budgets]
    figures = Task("figures", _figures_task, (pipe.job(), world, budget_name(shown)),
                   after=(f"{budget_name(shown)}/stage2",), cost=10.0)
    finished = pipe.run_variants(world, clip, language_model, variants, extra=[figures])
    return ([{"k": k, "name": budget_name(k), "model": str(model_dir), "scores": scores}
             for k, (model_dir, scores) in zip(config.budgets, finished)], pipe.extra_results["figures"])


__all__ = ["DemoConfig", "StageRun", "full_config", "quick_config", "run_demo"]
