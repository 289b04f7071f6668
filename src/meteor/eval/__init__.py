"""Benchmark runners: generate answers in batches, write them to JSONL as they come, resume an
interrupted run, score. ``base.Runner`` is the shared loop; each benchmark is one subclass: the
synthetic world's test split (``world``) and the paper's twelve (``official``).

    from meteor.eval import EvalConfig, build_runner
    runner = build_runner("gqa", EvalConfig(batch_size=32), annotations="gqa/testdev_balanced_questions.json")
    scores = runner.run(model, processor, "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/images", "runs/gqa")
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from meteor.eval.base import PREDICTIONS_FILE, SCORES_FILE, EvalConfig, Runner, group_accuracy, read_jsonl
from meteor.eval.official import (GRADED, JUDGE_MAX_TOKENS, ChartQARunner, DocVQARunner, GQARunner, Grader, InfoVQARunner,
                       MMBenchRunner, MMMURunner, MMVetRunner, OpenAIGrader, POPERunner, SEEDRunner, TextVQARunner,
                       VizWizRunner, VQAv2Runner)
from meteor.eval.world import WorldRunner, normalize_answer, world_exact_match

BENCHMARKS: dict[str, type[Runner]] = {
    "world": WorldRunner,
    "textvqa": TextVQARunner, "docvqa": DocVQARunner, "chartqa": ChartQARunner, "infovqa": InfoVQARunner,
    "gqa": GQARunner, "vqav2": VQAv2Runner, "vizwiz": VizWizRunner, "mmbench": MMBenchRunner,
    "mmvet": MMVetRunner, "mmmu": MMMURunner, "pope": POPERunner, "seed": SEEDRunner,
}
"""Every benchmark ``meteor eval`` runs, by name → its runner class: the synthetic world's test split,
then the paper's twelve in the column order of its Table 1."""

PAPER_BENCHMARKS: tuple[str, ...] = tuple(name for name in BENCHMARKS if name != "world")
"""The paper's twelve benchmarks, in the column order of its Table 1."""


def build_runner(benchmark: str, config: EvalConfig = EvalConfig(), annotations: str | Path | None = None,
                 grader: Grader | None = None) -> Runner:
    """The runner of ``benchmark`` with its annotation file and, for MM-Vet and MMBench, the
    language model their official evaluators consult (MM-Vet's grader, MMBench's GPT judge)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; available: {', '.join(BENCHMARKS)}")
    if grader is not None and benchmark not in GRADED:
        raise ValueError(f"a grader is only used by {' and '.join(GRADED)}, not by {benchmark}")
    if benchmark == "world":
        if annotations is not None:
            raise ValueError("the world benchmark reads its answers from test.jsonl: give no annotations")
        return WorldRunner(config)
    if benchmark == "mmvet":
        return MMVetRunner(config, annotations, grader)
    if benchmark == "mmbench":
        if isinstance(grader, OpenAIGrader):   # MM-Vet's 3-token budget would cut a judge's reply short
            grader = replace(grader, max_tokens=JUDGE_MAX_TOKENS)
        return MMBenchRunner(config, annotations, judge=grader)
    return BENCHMARKS[benchmark](config, annotations)


def evaluate(benchmark: str, model_dir: str, data: str, image_folder: str | None, out_dir: str,
             config: EvalConfig = EvalConfig(), progress=None, annotations: str | Path | None = None,
             grader: Grader | None = None) -> dict:
    """Load a saved LLaVA-Meteor folder and run one benchmark on it; its scores."""
    from meteor.pretrained import load_pretrained

    runner = build_runner(benchmark, config, annotations, grader)
    model, processor = load_pretrained(model_dir)
    return runner.run(model, processor, data, image_folder, out_dir, progress)


__all__ = ["BENCHMARKS", "PAPER_BENCHMARKS", "PREDICTIONS_FILE", "SCORES_FILE", "EvalConfig", "OpenAIGrader",
           "Runner", "WorldRunner", "build_runner", "evaluate", "group_accuracy", "normalize_answer", "read_jsonl",
           "world_exact_match"]
