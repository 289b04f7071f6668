"""Benchmark runners: generate answers in batches, write them to JSONL as they come, resume an
interrupted run, score. ``base.Runner`` is the shared loop; each benchmark is one subclass.

    from meteor.evaluation import RUNNERS, EvalConfig
    scores = RUNNERS["world"](EvalConfig(batch_size=32)).run(model, processor, "world/test.jsonl",
                                                             "world/images", "runs/eval")
"""

from .base import PREDICTIONS_FILE, SCORES_FILE, EvalConfig, Runner, group_accuracy, read_jsonl
from .world import WorldRunner, normalize_answer, world_exact_match

RUNNERS: dict[str, type[Runner]] = {"world": WorldRunner}
"""Benchmark name → runner class (the twelve official benchmarks join here)."""


def evaluate(benchmark: str, model_dir: str, data: str, image_folder: str | None, out_dir: str,
             config: EvalConfig = EvalConfig(), progress=None) -> dict:
    """Load a saved LLaVA-Meteor folder and run one benchmark's runner on it."""
    from ..modeling import LlavaMeteor

    if benchmark not in RUNNERS:
        raise ValueError(f"unknown benchmark {benchmark!r}; available: {sorted(RUNNERS)}")
    model, processor = LlavaMeteor.from_pretrained(model_dir)
    return RUNNERS[benchmark](config).run(model, processor, data, image_folder, out_dir, progress)


__all__ = ["PREDICTIONS_FILE", "RUNNERS", "SCORES_FILE", "EvalConfig", "Runner", "WorldRunner", "evaluate",
           "group_accuracy", "normalize_answer", "read_jsonl", "world_exact_match"]
