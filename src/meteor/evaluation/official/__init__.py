"""Runners for the paper's twelve benchmarks, reading the files users have (LLaVA-1.5's evaluation
layout and the benchmarks' own annotation files) and scoring with ``meteor.metrics`` as the
official tools score. One module per family:

* ``vqa``       — TextVQA, GQA, VQAv2, VizWiz (LLaVA's JSONL question files);
* ``documents`` — DocVQA, InfographicVQA (ANLS), ChartQA (relaxed accuracy);
* ``mmbench``   — MMBench's TSV, with circular evaluation;
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

from pathlib import Path

from ..base import EvalConfig, Runner
from .common import BenchmarkFileError, OfficialRunner
from .documents import ChartQARunner, DocVQARunner, InfoVQARunner
from .mmbench import MMBenchRunner
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


def build_runner(benchmark: str, config: EvalConfig = EvalConfig(), annotations: str | Path | None = None,
                 grader: Grader | None = None) -> OfficialRunner:
    """The runner of ``benchmark`` with its annotation file (and, for MM-Vet, a grader)."""
    if benchmark not in OFFICIAL_RUNNERS:
        raise ValueError(f"unknown benchmark {benchmark!r}; the official ones are {list(OFFICIAL_RUNNERS)}")
    if grader is not None and benchmark != "mmvet":
        raise ValueError(f"a grader is only used by mmvet, not by {benchmark}")
    if benchmark == "mmvet":
        return MMVetRunner(config, annotations, grader)
    return OFFICIAL_RUNNERS[benchmark](config, annotations)


__all__ = ["OFFICIAL_RUNNERS", "BenchmarkFileError", "ChartQARunner", "DocVQARunner", "GQARunner", "Grader",
           "InfoVQARunner", "MMBenchRunner", "MMMURunner", "MMVetRunner", "OfficialRunner", "OpenAIGrader",
           "POPERunner", "SEEDRunner", "TextVQARunner", "VQAv2Runner", "VizWizRunner", "build_runner"]
