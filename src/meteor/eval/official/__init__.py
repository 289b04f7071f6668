"""Runners for the paper's twelve benchmarks, reading the files users have (LLaVA-1.5's evaluation
layout and the benchmarks' own annotation files) and scoring with ``meteor.eval.metrics`` as the
official tools score. One module per family:

* ``vqa``       — TextVQA, GQA, VQAv2, VizWiz (LLaVA's JSONL question files);
* ``documents`` — DocVQA, InfographicVQA (ANLS), ChartQA (relaxed accuracy);
* ``mmbench``   — MMBench's TSV, with circular evaluation (``mmbench_judge``: its GPT-judge stage);
* ``mmmu``      — MMMU's records (``mmmu_open``: its open-answer parser);
* ``pope``, ``seed``, ``mmvet`` — POPE, SEED-Bench, MM-Vet (pluggable grader).

    from meteor.eval import build_runner
    runner = build_runner("gqa", EvalConfig(), annotations="gqa/testdev_balanced_questions.json")
    scores = runner.run(model, processor, "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/images", "runs/gqa")

Every score dict holds ``headline`` (the Table-1 number, in percent, or None when the benchmark
needs a server or a grader) beside the benchmark's detailed metrics; ``summary.write_table1``
collects them.
"""

from __future__ import annotations

from meteor.eval.official.common import BenchmarkFileError, OfficialRunner
from meteor.eval.official.documents import ChartQARunner, DocVQARunner, InfoVQARunner
from meteor.eval.official.mmbench import MMBenchRunner
from meteor.eval.official.mmbench_judge import JUDGE_MAX_TOKENS
from meteor.eval.official.mmmu import MMMURunner
from meteor.eval.official.mmvet import Grader, MMVetRunner, OpenAIGrader
from meteor.eval.official.pope import POPERunner
from meteor.eval.official.seed import SEEDRunner
from meteor.eval.official.vqa import GQARunner, TextVQARunner, VizWizRunner, VQAv2Runner

GRADED = ("mmbench", "mmvet")
"""Benchmarks whose official evaluator asks a language model: MM-Vet grades every answer, MMBench
asks its judge for the answers its rules cannot read."""


__all__ = ["GRADED", "BenchmarkFileError", "ChartQARunner", "DocVQARunner", "GQARunner", "Grader",
           "InfoVQARunner", "JUDGE_MAX_TOKENS", "MMBenchRunner", "MMMURunner", "MMVetRunner", "OfficialRunner",
           "OpenAIGrader", "POPERunner", "SEEDRunner", "TextVQARunner", "VQAv2Runner", "VizWizRunner"]
