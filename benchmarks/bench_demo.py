"""Where `meteor demo`'s CPU time goes: a training step of each stage and the evaluation, per budget.

    python benchmarks/bench_demo.py --out /tmp/demo-profile                 # every budget, both stages, eval
    python benchmarks/bench_demo.py --budgets 16 --stages 1 --steps 6 --eval-batches 2
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 METEOR_SCAN_ISA=avx2 \\
        python benchmarks/bench_demo.py ...                                 # approximate an AVX2-only CPU

``--out`` is a demo folder: the world, the tiny LLaMA and the CLIP are built there as ``meteor demo``
builds them (or reused), and so is the feature cache (``out/features``). Each (budget, stage) runs the
real trainer (``meteor.train.train`` with the demo's exact configuration, ``Pipeline.stage_train_config``)
for ``--warmup`` + ``--steps`` steps in this process, with one torch thread as the demo's workers
use; the last ``--steps`` are measured. What each part costs is CPU time (``time.process_time``) taken
around the real functions, patched in this process only:

- data: ``LlavaDataset.encode`` (image decoding and slicing, tokenising) and ``collate``;
- tower: the feature cache (``FeatureCache.encode_views``: hashing, lookup) and, on a miss, the tower;
- compressor / LLM / rest of the forward (embeddings, LM head, token loss): forward hooks;
- scene distillation (the frozen teacher's forward, and the loss) and glyph loss: their ``loss``;
- backward: until the gradient reaches the LLM's input embeddings (LM head, LLM, both aids' terms)
  and after it (the compressor);
- optimizer: ``AdamW.step``; Python: the rest of the step (the trainer's own bookkeeping).

Evaluation runs ``WorldRunner`` on the first ``--eval-batches`` batches of the test split with a model of
the budget (``out/runs/<budget>/stage2/model`` when it exists, else stage 2 initialised: answers then run
to the longest length, so time per question is an upper bound), split into image preparation, tower,
compressor, LLM (prefill and decoding) and the rest of ``generate``.

``--torch-profile`` adds torch.profiler's table of one budget's stage-1 steps (the ops by self CPU time
and the op count per step: with these tiny widths the count times the dispatch cost is the floor).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

PARTS = ("data: encode (image, slicing, tokens)", "data: collate", "tower: feature cache", "tower: compute (misses)",
         "compressor fwd", "LLM fwd", "forward rest (embed, LM head, loss)", "distill: teacher fwd",
         "distill: loss", "glyph: loss", "backward: LM head, LLM, aids", "backward: compressor", "optimizer",
         "Python (trainer)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def isa() -> str:
    return (f"torch {torch.backends.cpu.get_cpu_capability()}, "
            f"selective scan {os.environ.get('METEOR_SCAN_ISA', 'auto')}")


class Meter:
    """CPU seconds per part; nested parts are subtracted from their parent (``exclusive``)."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []
        self.on = False

    @contextlib.contextmanager
    def part(self, name: str):
        if not self.on:
            yield
            return
        frame = [name, time.process_time(), 0.0]
        self.stack.append(frame)
        try:
            yield
        finally:
            self.stack.pop()
            spent = time.process_time() - frame[1]
            self.totals[name] += spent - frame[2]
            if self.stack:
                self.stack[-1][2] += spent

    def wrap(self, owner, attribute: str, name: str):
        original = getattr(owner, attribute)
        meter = self

        def wrapped(*args, **kwargs):
            with meter.part(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapped)
        return original


def hook_module(meter: Meter, module: torch.nn.Module, name: str) -> None:
    frames: list = []

    def before(mod, args):
        if meter.on:
            frame = [name, time.process_time(), 0.0]
            meter.stack.append(frame)
            frames.append(frame)

    def after(mod, args, output):
        if frames:
            frame = frames.pop()
            meter.stack.remove(frame)
            spent = time.process_time() - frame[1]
            meter.totals[name] += spent - frame[2]
            if meter.stack:
                meter.stack[-1][2] += spent

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


def profile_training(pipe, world, clip, language_model, k, stage: int, steps: int, warmup: int,
                     torch_profile: bool) -> dict:
    """The real trainer for warmup + steps steps of (budget k, stage), instrumented (module doc)."""
    import dataclasses

    import meteor.train.loop as loop
    from meteor.demo.pipeline import budget_name
    from meteor.model.feature_cache import FeatureCache
    from meteor.model.vision import VisionTower
    from meteor.train.data import LlavaDataset
    from meteor.train.logger import RunLogger

    name = budget_name(k)
    meteor_config = pipe.budget_config(world, k)
    runs = pipe.stage_runs(name, meteor_config)
    folders = pipe.stage_folders(world, clip, language_model, f"bench-{name}", meteor_config)
    for number in (1, 2):
        if number < stage and (folders[number].folder / "compressor.safetensors").is_file():
            continue
        if number <= stage:
            pipe.prepare_stage_folder(world, meteor_config, number, runs[number], folders[number])
    if stage == 2 and not any(folders[1].folder.glob("*.safetensors")):
        # stage 2 starts from stage 1's compressor: a one-step stage 1 writes one of the right shape
        config, aux = pipe.stage_train_config(world, clip, language_model, 1, runs[1], folders)
        loop.train(dataclasses.replace(config, max_steps=1, progress="none"), auxiliary=aux)
    config, auxiliary = pipe.stage_train_config(world, clip, language_model, stage, runs[stage], folders)
    config = dataclasses.replace(config, max_steps=warmup + steps, progress="none")

    meter = Meter()
    restore = []
    restore.append((LlavaDataset, "encode", meter.wrap(LlavaDataset, "encode", PARTS[0])))
    restore.append((loop, "collate", meter.wrap(loop, "collate", PARTS[1])))
    restore.append((FeatureCache, "encode_views", meter.wrap(FeatureCache, "encode_views", PARTS[2])))
    restore.append((VisionTower, "__call__", meter.wrap(VisionTower, "__call__", PARTS[3])))
    restore.append((torch.optim.AdamW, "step", meter.wrap(torch.optim.AdamW, "step", PARTS[12])))
    marks: dict[str, float] = {}
    original_backward = torch.Tensor.backward

    def backward(tensor, *args, **kwargs):
        if not meter.on:
            return original_backward(tensor, *args, **kwargs)
        start = time.process_time()
        marks.pop("embeds", None)
        original_backward(tensor, *args, **kwargs)
        end = time.process_time()
        split = marks.get("embeds", end)
        meter.totals[PARTS[10]] += split - start
        meter.totals[PARTS[11]] += end - split
        if meter.stack:
            meter.stack[-1][2] += end - start

    torch.Tensor.backward = backward
    step_times: list[float] = []
    last, count = [0.0], [0]

    def on_step(self, *args, **kwargs):     # called once at the end of each step
        now = time.process_time()
        count[0] += 1
        if meter.on:
            step_times.append(now - last[0])
        elif count[0] == warmup:
            meter.on = True
        last[0] = now
        return original_step(self, *args, **kwargs)

    original_step = RunLogger.step
    RunLogger.step = on_step

    def factory_with_hooks(factory):
        def build(model, dataset, template):
            term = factory(model, dataset, template)
            if not getattr(model, "_bench_hooked", False):
                model._bench_hooked = True
                hook_module(meter, model, PARTS[6])
                hook_module(meter, model.compressor, PARTS[4])
                hook_module(meter, model.language_model, PARTS[5])

                def mark(module, args, kwargs):
                    embeds = kwargs.get("inputs_embeds")
                    if meter.on and embeds is not None and embeds.requires_grad:
                        embeds.register_hook(lambda grad: marks.__setitem__("embeds", time.process_time()))
                model.language_model.register_forward_pre_hook(mark, with_kwargs=True)
            if term.name == "distill":
                hook_module(meter, term.teacher, PARTS[7])
                loss, label = term.loss, PARTS[8]
            else:
                loss, label = term.loss, PARTS[9]

            def timed(*args, **kwargs):
                with meter.part(label):
                    return loss(*args, **kwargs)
            term.loss = timed
            return term
        return build

    profiler = None
    try:
        if torch_profile:
            from torch.profiler import ProfilerActivity, profile
            profiler = profile(activities=[ProfilerActivity.CPU])
            profiler.__enter__()
        started = time.process_time()
        loop.train(config, auxiliary=[factory_with_hooks(f) for f in auxiliary])
        total = time.process_time() - started
    finally:
        if profiler is not None:
            profiler.__exit__(None, None, None)
        torch.Tensor.backward = original_backward
        RunLogger.step = original_step
        for owner, attribute, original in restore:
            setattr(owner, attribute, original)
    measured = len(step_times)
    per_step = {part: meter.totals.get(part, 0.0) / max(measured, 1) for part in PARTS[:-1]}
    step = sum(step_times) / max(measured, 1)
    per_step[PARTS[-1]] = step - sum(per_step.values())
    result = {"budget": name, "stage": stage, "steps_measured": measured, "cpu_s_per_step": step,
              "parts": per_step, "train_call_cpu_s": total,
              "steps_in_stage": None}
    from meteor.train.loop import DataOrder
    dataset_size = len(json.loads(Path(config.data).read_text()))
    order = DataOrder(dataset_size, config.global_batch_size, config.seed)
    result["steps_in_stage"] = int(order.steps_per_epoch * runs[stage].epochs + 0.999999)
    if profiler is not None:
        events = profiler.key_averages()
        ops = sum(e.count for e in events if not e.key.startswith(("ProfilerStep", "autograd::engine")))
        result["torch_ops_per_step"] = ops / (warmup + steps)
        result["torch_table"] = events.table(sort_by="self_cpu_time_total", row_limit=25)
    return result


def profile_tower(pipe, world, clip, language_model, views: int) -> dict:
    """The tower's cost per view on a cache miss, in batches of one size as the cache computes them."""
    from meteor.pretrained import build
    from meteor.processing.processor import build_processor  # noqa: F401 (the processor comes with build)

    model, processor = build(str(clip), str(language_model), str(language_model), pipe.budget_config(world, 16))
    records = json.loads(world.stage1_path.read_text())
    images = [processor.prepare_image(world.image_folder / r["image"]) for r in records[:views]]
    inputs = processor.image_inputs(images)
    model.eval()
    started = time.process_time()
    with torch.no_grad():
        outputs = model.model.encode_views(inputs["pixel_values"], inputs["view_grids"])
    spent = time.process_time() - started
    count = sum(len(positions) for positions, _ in outputs)
    return {"views": count, "cpu_s_per_view": spent / count}


def profile_eval(pipe, world, clip, language_model, k, batches: int) -> dict:
    from meteor.demo.pipeline import budget_name
    from meteor.eval import EvalConfig, WorldRunner, read_jsonl
    from meteor.model.feature_cache import FeatureCache
    from meteor.pretrained import load_pretrained

    name = budget_name(k)
    model_dir = pipe.out / "runs" / name / "stage2" / "model"
    trained = model_dir.is_dir()
    if not trained:
        model_dir = pipe.out / "runs" / f"bench-{name}" / "stage2" / "model"
    if not model_dir.is_dir():
        return {"budget": name, "skipped": "no stage-2 model (run the stage-2 profile first)"}
    model, processor = load_pretrained(model_dir)
    runner = WorldRunner(EvalConfig(batch_size=pipe.config.eval_batch_size))
    runner.feature_cache = FeatureCache(pipe.out / "features")
    questions = read_jsonl(world.test_path)[:batches * pipe.config.eval_batch_size]
    meter = Meter()
    originals = [(type(processor), "prepare_image", meter.wrap(type(processor), "prepare_image", "image preparation")),
                 (FeatureCache, "encode_views", meter.wrap(FeatureCache, "encode_views", "tower: feature cache"))]
    hook_module(meter, model.compressor, "compressor")
    prefill = {"calls": 0}

    def llm_before(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        label = "LLM prefill" if embeds is not None and embeds.shape[1] > 1 else "LLM decode"
        frame = [label, time.process_time(), 0.0]
        meter.stack.append(frame)
        prefill["frame"] = frame

    def llm_after(module, args, output):
        frame = prefill.pop("frame")
        meter.stack.remove(frame)
        spent = time.process_time() - frame[1]
        meter.totals[frame[0]] += spent - frame[2]
        if meter.stack:
            meter.stack[-1][2] += spent

    model.language_model.register_forward_pre_hook(llm_before, with_kwargs=True)
    model.language_model.register_forward_hook(llm_after)
    out = pipe.out / "bench-eval" / name
    if out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    meter.on = True
    started = time.process_time()
    try:
        with meter.part("generate rest (search, mask, streamer)"):
            runner.run(model, processor, out / "test.jsonl", world.image_folder, out)
    finally:
        for owner, attribute, original in originals:
            setattr(owner, attribute, original)
    total = time.process_time() - started
    n = len(questions)
    return {"budget": name, "trained_model": trained, "questions": n, "cpu_s_per_question": total / n,
            "cpu_s_full_test": total / n * len(read_jsonl(world.test_path)),
            "parts_per_question": {part: value / n for part, value in meter.totals.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/bench-demo", help="a demo folder (built or reused)")
    parser.add_argument("--budgets", nargs="+", default=["all", "16", "7", "3"])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="steps before the measured ones (≥ 1)")
    parser.add_argument("--eval-batches", type=int, default=2, help="batches of the test split per budget (0: none)")
    parser.add_argument("--tower-views", type=int, default=64, help="images whose views time the tower")
    parser.add_argument("--torch-profile", action="store_true")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    from meteor.demo import full_config
    from meteor.demo.pipeline import open_pipeline

    config = full_config()
    pipe = open_pipeline(args.out, config, force=False)
    world = pipe.world()
    language_model = pipe.base_language_model(world)
    clip = pipe.clip(world, language_model)
    torch.set_num_threads(config.threads)
    budgets = [None if b == "all" else int(b) for b in args.budgets]
    report = {"machine": {"cpu": cpu_name(), "isa": isa(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "load_average": os.getloadavg()},
              "training": [], "eval": []}
    report["tower"] = profile_tower(pipe, world, clip, language_model, args.tower_views)
    print(json.dumps(report["machine"]), json.dumps(report["tower"]), flush=True)
    for k in budgets:
        for stage in args.stages:
            result = profile_training(pipe, world, clip, language_model, k, stage, args.steps, args.warmup,
                                      args.torch_profile and stage == args.stages[0] and k == budgets[0])
            table = result.pop("torch_table", None)
            report["training"].append(result)
            print(f"\n{result['budget']} stage {stage}: {result['cpu_s_per_step']:.3f} CPU s/step "
                  f"× {result['steps_in_stage']} steps = {result['cpu_s_per_step'] * result['steps_in_stage']:.0f} s")
            for part, value in result["parts"].items():
                print(f"  {part:40s} {value * 1000:8.1f} ms  {value / result['cpu_s_per_step']:6.1%}")
            if table:
                print(f"  torch ops per step: {result['torch_ops_per_step']:.0f}\n{table}")
        if args.eval_batches:
            result = profile_eval(pipe, world, clip, language_model, k, args.eval_batches)
            report["eval"].append(result)
            print(f"\neval {result['budget']}: " + json.dumps(result, indent=1))
    report["machine"]["load_average_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
