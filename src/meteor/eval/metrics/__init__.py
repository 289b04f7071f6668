"""Benchmark metrics with the official semantics, normalisation included: pure functions.

One module per family, each naming the official evaluator it follows:

* ``vqa``     — ``vqa_accuracy`` (VQAv2, VizWiz), ``textvqa_accuracy`` (TextVQA as LLaVA scores
  it), ``vqa_normalize`` and ``evalai_normalize`` (the two answer normalisations);
* ``anls``    — ``anls`` (DocVQA, InfographicVQA);
* ``chartqa`` — ``relaxed_accuracy`` (ChartQA);
* ``gqa``     — ``exact_match`` (GQA, as LLaVA's pipeline compares answers);
* ``pope``    — ``pope_answer`` and ``pope_scores`` (POPE);
* ``choice``  — ``extract_choice`` (MMBench and MMMU letter rules), ``mmbench_can_infer``
  (MMBench's rule stage with its "Z" verdict, also used to read its judge's reply).

Every per-question score is a float in [0, 1]; a benchmark's score is their mean over questions
(``statistics.fmean``), except POPE, whose ``pope_scores`` takes the whole split.
"""

from meteor.eval.metrics.anls import anls
from meteor.eval.metrics.chartqa import relaxed_accuracy
from meteor.eval.metrics.choice import BENCHMARKS, extract_choice, mmbench_can_infer
from meteor.eval.metrics.gqa import exact_match
from meteor.eval.metrics.pope import pope_answer, pope_scores
from meteor.eval.metrics.vqa import evalai_normalize, textvqa_accuracy, vqa_accuracy, vqa_normalize

__all__ = ["BENCHMARKS", "anls", "evalai_normalize", "exact_match", "extract_choice", "mmbench_can_infer",
           "pope_answer", "pope_scores", "relaxed_accuracy", "textvqa_accuracy", "vqa_accuracy", "vqa_normalize"]
