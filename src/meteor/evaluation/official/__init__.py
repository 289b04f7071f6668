"""Runners for the paper's twelve benchmarks, reading the files users have (LLaVA-1.5's evaluation
layout and the benchmarks' own annotation files) and scoring with ``meteor.metrics`` as the
official tools score. One module per family:

* ``vqa``       — TextVQA, GQA, VQAv2, VizWiz (LLaVA's JSONL question files);
* ``documents`` — DocVQA, InfographicVQA (ANLS), ChartQA (relaxed accuracy);
* ``mmbench``   — MMBench's TSV, with circular evaluation (``mmbench_judge``: its GPT-judge stage);
* ``mmmu``      — MMMU's records (``mmmu_open``: its open-answer parser);
* ``pope``, ``seed``, ``mmvet`` — POPE, SEED-Bench, MM-Vet (pluggable grader).

    from meteor.evaluation.official import OFFICIAL_RUNNERS, build_runner
    runner = build_runner("gqa", EvalConfig(), annotations="gqa/testdev_balanced_questions.json")
    scores = runner.run(model, processor, "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/images", "runs/gqa")

Every score dict holds ``headline`` (the Table-1 number, in percent, or None when the benchmark
needs a server or a grader) beside the benchmark's detailed metrics; ``summary.write_table1``
collects them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..base import EvalConfig, Runner
from .common import BenchmarkFileError, OfficialRunner
from .documents import ChartQARunner, DocVQARunner, InfoVQARunner
from .mmbench import MMBenchRunner
from .mmbench_judge import JUDGE_MAX_TOKENS
from .mmmu import MMMURunner
from .mmvet import Grader, MMVetRunner, OpenAIGrader
from .pope import POPERunner
from .seed import SEEDRunner
from .vqa import GQARunner, TextVQARunner, VizWizRunner, VQAv2Runner

OFFICIAL_RUNNERS: dict[str, type[Runner]] = {
    "textvqa": TextVQARunner, "docvqa": DocVQARunner, "chartqa": ChartQARunner, "infovqa": InfoVQARunner,
    "gqa": GQARunner, "vqav2": VQAv2Runner, "vizwiz": VizWizRunner, "mmbench": MMBenchRunner,
    "mmvet": MMVetRunner, "mmmu": MMMURunner, "pope": POPERunner, "seed": SEEDRunner,
}
"""Benchmark name → runner class, in the column order of the paper's Table 1."""


GRADED = ("mmbench", "mmvet")
"""Benchmarks whose official evaluator asks a language model: MM-Vet grades every answer, MMBench
asks its judge for the answers its rules cannot read."""


def build_runner(benchmark: str, config: EvalConfig = EvalConfig(), annotations: str | Path | None = None,
                 grader: Grader | None = None) -> OfficialRunner:
    """The runner of ``benchmark`` with its annotation file and, for MM-Vet and MMBench, the
    language model their official evaluators consult (MM-Vet's grader, MMBench's GPT judge)."""
    if benchmark not in OFFICIAL_RUNNERS:
        raise ValueError(f"unknown benchmark {benchmark!r}; the official ones are {list(OFFICIAL_RUNNERS)}")
    if grader is not None and benchmark not in GRADED:
        raise ValueError(f"a grader is only used by {' and '.join(GRADED)}, not by {benchmark}")
    if benchmark == "mmvet":
        return MMVetRunner(config, annotations, grader)
    if benchmark == "mmbench":
        if isinstance(grader, OpenAIGrader):   # MM-Vet's 3-token budget would cut a judge's reply short
            grader = replace(grader, max_tokens=JUDGE_MAX_TOKENS)
        return MMBenchRunner(config, annotations, judge=grader)
    return OFFICIAL_RUNNERS[benchmark](config, annotations)


__all__ = ["GRADED", "OFFICIAL_RUNNERS", "BenchmarkFileError", "ChartQARunner", "DocVQARunner", "GQARunner", "Grader",
           "InfoVQARunner", "MMBenchRunner", "MMMURunner", "MMVetRunner", "OfficialRunner", "OpenAIGrader",
           "POPERunner", "SEEDRunner", "TextVQARunner", "VQAv2Runner", "VizWizRunner", "build_runner"]
