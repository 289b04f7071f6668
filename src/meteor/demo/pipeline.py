"""The demo's steps, each cached in its own folder and keyed on the configuration that made it.

A step's folder holds ``key.json`` (written last) with the exact configuration of the step and of
everything it depends on; a re-run reuses the folder when the key matches and rebuilds it (after
deleting it) when it does not, or when ``force`` is set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from meteor.model.configuration import CompressorConfig, MeteorConfig
from meteor.train.data import split_turns
from meteor.model.feature_cache import FeatureCache
from meteor.demo.clip import pretrain_clip
from meteor.demo.config import DemoConfig, StageRun
from meteor.demo.schedule import Task, run_tasks
from meteor.demo.world import WorldConfig, WorldManifest, generate_world, world_texts

KEY_FILE = "key.json"
ASSETS = {"language_model": Path(__file__).parent / "assets" / "language_model",
          "clip": Path(__file__).parent / "assets" / "clip"}
"""The trained parts the package ships, each with the key of the configuration that made it: the
text-pretrained tiny LLaMA (about 3 hours to rebuild here) and the tiny CLIP (about 5 minutes)."""


class CachedFolder:
    """A cached folder: ``done`` when its key matches; ``start`` clears it for a rebuild."""

    def __init__(self, folder: Path, key: dict[str, Any], force: bool):
        self.folder, self.key = folder, key
        self.done = not force and _read_key(folder) == key

    def start(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)

    def finish(self) -> None:
        (self.folder / KEY_FILE).write_text(json.dumps(self.key, indent=2, sort_keys=True) + "\n")


def _read_key(folder: Path) -> Any:
    try:
        return json.loads((folder / KEY_FILE).read_text())
    except (OSError, ValueError):
        return None


def _text_processor(tokenizer):
    """A processor for text-only conversations (it adds the <image> and pad tokens the model's
    processor adds, so vocabulary sizes agree)."""
    from meteor.processing.processor import build_processor

    return build_processor(tokenizer, MeteorConfig(), patch_size=14, base_size=112)


STEP_COSTS = {1: (0.50, 0.0029), 2: (0.68, 0.0043)}
"""CPU seconds of a training step of the full demo (16 samples), fixed and per visual token of a
sample, by stage: fitted to ``benchmarks/bench_demo.py``'s figures on a 2-core AMD EPYC; only the
order of the tasks depends on them."""
EVAL_COST = (0.012, 0.00009)
"""CPU seconds per test question of the evaluation, fixed and per visual token (as above)."""


def worker_count(config: DemoConfig) -> int:
    """Worker processes: ``config.workers``, or this machine's cores, at most four."""
    return config.workers or max(1, min(os.cpu_count() or 1, 4))


def budget_name(k: int | None) -> str:
    return "all" if k is None else f"k{k}"


def clip_threads(config: DemoConfig) -> int:
    """torch threads for the CLIP step, which runs alone: the threads all budgets use together
    (``workers`` × ``threads``), but no more than this machine's cores."""
    return max(1, min(worker_count(config) * config.threads, os.cpu_count() or 1))


def open_pipeline(out: str | Path, config: DemoConfig, force: bool,
                  rebuild: Sequence[str] = (), started_at: float | None = None) -> "Pipeline":
    """A Pipeline in ``out`` (created) whose log prints lines stamped with the seconds since now
    (or since the wall-clock time ``started_at``, for a worker process logging on its parent's
    clock); Hugging Face's own progress bars and warnings are silenced and torch uses
    ``config.threads``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(config.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter() - (0.0 if started_at is None else time.time() - started_at)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    pipe = Pipeline(out, config, force, log, rebuild)
    pipe.started = started
    return pipe


class Pipeline:
    """Runs the steps of ``meteor demo`` in ``out``; ``log`` receives progress lines."""

    def __init__(self, out: Path, config: DemoConfig, force: bool, log: Callable[[str], None],
                 rebuild: Sequence[str] = ()):
        self.out, self.config, self.force, self.log = out, config, force, log
        unknown = set(rebuild) - set(ASSETS)
        if unknown:
            raise ValueError(f"cannot rebuild {sorted(unknown)}: the shipped assets are {', '.join(ASSETS)}")
        self.rebuild = tuple(rebuild)
        """The shipped assets (``ASSETS``) to train here even when their key fits."""
        self.timings: dict[str, float] = {}
        """Wall seconds per step."""
        self.cpu_timings: dict[str, float] = {}
        """CPU seconds per step (the process's, all its threads: ``time.process_time``)."""
        self.reused: list[str] = []
        self.extra_results: dict[str, Any] = {}
        """The results of ``run_variants``'s extra tasks, by name."""
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the pipeline (or its parent's) started."""
        return time.perf_counter() - self.started

    @staticmethod
    def _clock() -> tuple[float, float]:
        """(wall, CPU) seconds now, for ``_timed``."""
        return time.perf_counter(), time.process_time()

    def _timed(self, name: str, started: tuple[float, float]) -> None:
        self.timings[name] = round(time.perf_counter() - started[0], 1)
        self.cpu_timings[name] = round(time.process_time() - started[1], 1)

    # --- 1. world -----------------------------------------------------------------------------------
    def world(self) -> WorldManifest:
        started = self._clock()
        folder = self.out / "world"
        if self.force and folder.exists():
            shutil.rmtree(folder)
        world = generate_world(folder, self.config.world, overwrite=True)
        if world.reused:
            self.reused.append("world")
        self._timed("world", started)
        return world

    # --- 2. tokenizer and the tiny LLaMA --------------------------------------------------------------
    def base_language_model(self, world: WorldManifest) -> Path:
        """The tokenizer and the tiny LLaMA. With ``config.language_pretraining`` (the full demo), the
        LLaMA is pretrained on text (``meteor.demo.language``): the shipped asset when its key
        matches, else pretrained here; without it (``--quick``), it starts from random weights."""
        from transformers import LlamaForCausalLM

        from meteor.testing import tiny_llama_config, tiny_tokenizer
        from meteor.demo.language import focus_conversations, pretrain_language_model, text_conversations

        recipe = self.config.language_pretraining
        if recipe is None:
            key = {"world": world.config.to_dict(), "vocab": self.config.vocab_size, "llama": self.config.llama,
                   "seed": self.config.seed}
        else:   # independent of the demo's world: the text world and its tokenizer are fixed
            key = {"text_world": recipe.world().to_dict(), "vocab": self.config.vocab_size,
                   "llama": self.config.llama, "pretraining": asdict(recipe)}
        step = CachedFolder(self.out / "language_model", key, self.force)
        if step.done:
            self.reused.append("language_model")
            return step.folder
        started = self._clock()
        step.start()
        if recipe is not None and self._use_asset("language_model", key, step.folder):
            self.log("    the shipped text-pretrained tiny LLaMA (meteor/demo/assets/language_model) fits "
                     "this configuration: using it (--pretrain-language-model rebuilds it)")
        else:
            texts = world_texts(world if recipe is None else recipe.world())
            tokenizer = tiny_tokenizer(texts, self.config.vocab_size)
            processor = _text_processor(tokenizer)
            torch.manual_seed(self.config.seed if recipe is None else recipe.seed)
            model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **self.config.llama))
            if recipe is not None:
                self.log(f"    pretraining the tiny LLaMA on {recipe.scenes} scenes written as text, "
                         f"{recipe.steps} steps ...")
                samples = [processor.encode(c, [], "vicuna_v1") for c in text_conversations(recipe.world(), recipe)]
                summary = pretrain_language_model(model, samples, tokenizer.pad_token_id, recipe, self.log)
                self.log(f"    pretrained in {summary['seconds']} s, final loss {summary['final_loss']:.3f}")
                if recipe.focus_steps:
                    self.log(f"    second phase: {recipe.focus_scenes} scenes, one question each, "
                             f"{recipe.focus_steps} steps ...")
                    samples = [processor.encode(c, [], "vicuna_v1")
                               for c in focus_conversations(recipe.world(), recipe)]
                    summary = pretrain_language_model(model, samples, tokenizer.pad_token_id, recipe, self.log,
                                                      phase=2)
                    self.log(f"    second phase in {summary['seconds']} s, final loss {summary['final_loss']:.3f}")
                    if recipe.refine_steps:
                        self.log(f"    third phase: {recipe.refine_steps} more steps on the same corpus ...")
                        summary = pretrain_language_model(model, samples, tokenizer.pad_token_id, recipe,
                                                          self.log, phase=3)
                        self.log(f"    third phase in {summary['seconds']} s, final loss {summary['final_loss']:.3f}")
            model.save_pretrained(step.folder)
            tokenizer.save_pretrained(step.folder)
        step.finish()
        self._timed("language_model", started)
        return step.folder

    # --- 3. tiny CLIP ---------------------------------------------------------------------------------------
    def clip(self, world: WorldManifest, language_model: Path) -> Path:
        """The tiny CLIP, trained contrastively on captions: of ``config.clip_images`` further
        unsliced train-split scenes (in ``clip_corpus/``, never the test split), or of the world's
        train images; with hard-negative captions when ``config.clip_foils`` and the region–phrase
        loss when ``config.clip_regions``."""
        from transformers import AutoTokenizer

        from meteor.demo.world.captions import foil_caption, item_phrases

        corpus_config = self.clip_corpus_config(world.config)
        step = CachedFolder(self.out / "clip", self.clip_key(world.config), self.force)
        if step.done:
            self.reused.append("clip")
            return step.folder
        started = self._clock()
        step.start()
        if self._use_asset("clip", step.key, step.folder):
            self.log("    the shipped tiny CLIP (meteor/demo/assets/clip) fits this configuration: using it "
                     "(--pretrain-clip rebuilds it)")
            step.finish()
            self._timed("clip", started)
            return step.folder
        tokenizer = AutoTokenizer.from_pretrained(language_model)
        corpus = self.clip_corpus(world, corpus_config)
        records = json.loads(corpus.stage1_path.read_text())
        self.log(f"    {len(records)} images, {'with' if self.config.clip_foils else 'without'} hard-negative "
                 f"captions, {'with' if self.config.clip_regions else 'without'} the region–phrase loss")
        # Nothing else runs during this step: it gets the cores the budgets share later (1.3x faster
        # with two threads than with one here), then the thread count is restored.
        threads, before = clip_threads(self.config), torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            summary = pretrain_clip(records, corpus.image_folder, tokenizer, step.folder, self.config.clip,
                                    progress=self.log, foil=foil_caption if self.config.clip_foils else None,
                                    regions=(lambda record: item_phrases(record["meta"]))
                                    if self.config.clip_regions else None)
        finally:
            torch.set_num_threads(before)
        self.log(f"    CLIP trained in {summary['seconds']} s ({threads} threads): in-batch image→caption accuracy "
                 f"{summary['final_batch_retrieval']:.2f} (chance {1 / self.config.clip.batch_size:.2f})")
        step.finish()
        self._timed("clip", started)
        return step.folder

    def _use_asset(self, name: str, key: dict[str, Any], folder: Path) -> bool:
        """Copy the shipped asset ``name`` into ``folder`` when its key is ``key`` and it is not to
        be rebuilt; whether it was."""
        asset = ASSETS[name]
        if name in self.rebuild or _read_key(asset) != key:
            return False
        for item in asset.iterdir():
            if item.name != KEY_FILE:
                shutil.copy2(item, folder / item.name)
        return True

    def clip_key(self, world: WorldConfig) -> dict[str, Any]:
        """Everything the tiny CLIP depends on (the shipped one carries the key it was made with)."""
        return {"world": world.to_dict(), "vocab": self.config.vocab_size, "clip": asdict(self.config.clip),
                "corpus": self.clip_corpus_config(world).to_dict(), "foils": self.config.clip_foils,
                "regions": self.config.clip_regions}

    def clip_corpus_config(self, world: WorldConfig) -> WorldConfig:
        """The CLIP's images: the world itself, or its unsliced companion (same seed and scene
        distribution, one view per image; only its train split is used)."""
        if not self.config.clip_images:
            return world
        return dataclasses.replace(world, n_train_images=self.config.clip_images, n_test_images=1,
                                   slice_mix=(0,))

    def clip_corpus(self, world: WorldManifest, config: WorldConfig) -> WorldManifest:
        """The corpus of ``clip_corpus_config``, generated (or reused) only when the CLIP is trained."""
        if config == world.config:
            return world
        folder = self.out / "clip_corpus"
        if self.force and folder.exists():
            shutil.rmtree(folder)
        return generate_world(folder, config, overwrite=True)

    # --- 4. stage 1 and stage 2 per budget ----------------------------------------------------------------------
    def budget_config(self, world: WorldManifest, k: int | None) -> MeteorConfig:
        return MeteorConfig(compressor=CompressorConfig(tokens_per_slice=k, **self.config.compressor),
                            max_slices=world.config.max_slices)

    def run_variants(self, world: WorldManifest, clip: Path, language_model: Path,
                     variants: Sequence[tuple[str, MeteorConfig] | tuple[str, MeteorConfig, int]
                                        | tuple[str, MeteorConfig, int, dict[int, StageRun]]],
                     extra: Sequence[Task] = ()) -> list[tuple[Path, dict[str, Any]]]:
        """``train_variant`` then ``evaluate`` for each (name, config[, training seed[, stages]]):
        stage 1, stage 2 and the evaluation of every variant as tasks of one graph
        (``meteor.demo.schedule``), ``worker_count(config)`` at a time in spawned worker processes
        logging on this pipeline's clock, the longest chain first (their stages are independent;
        the frozen-feature cache on disk is shared); (model folder, scores) in the order given.
        ``extra`` tasks join the graph (their results land in ``self.extra_results``). Timings
        and reuse are merged into this pipeline's."""
        tasks = [*self.variant_tasks(world, clip, language_model, variants), *extra]
        results = self.run_tasks(tasks)
        self.extra_results = {task.name: results[task.name]["result"] for task in extra}
        return [(self.out / "runs" / variant[0] / "stage2" / "model", results[f"eval/{variant[0]}"]["result"])
                for variant in variants]

    def job(self) -> tuple:
        """What a task needs to open this pipeline in a worker process (on this pipeline's clock)."""
        return (self.out, self.config, self.force, self.rebuild, time.time() - self.elapsed())

    def variant_tasks(self, world: WorldManifest, clip: Path, language_model: Path,
                      variants: Sequence[tuple]) -> list[Task]:
        """Stage 1 → stage 2 → evaluation of each variant, as tasks (see ``run_variants``)."""
        job = self.job()
        tasks = []
        for variant in variants:
            name, meteor_config, seed, stages = (*variant, None, None)[:4]
            runs = self.stage_runs(name, meteor_config, stages, quiet=True)
            for stage in (1, 2):
                tasks.append(Task(f"{name}/stage{stage}", _stage_task,
                                  (job, world, clip, language_model, name, meteor_config, stage, seed, stages),
                                  after=(f"{name}/stage1",) if stage == 2 else (),
                                  cost=self.estimated_cost(world, meteor_config, stage, runs[stage])))
            tasks.append(Task(f"eval/{name}", _eval_task, (job, world, name), after=(f"{name}/stage2",),
                              cost=self.estimated_cost(world, meteor_config, "eval")))
        return tasks

    def run_tasks(self, tasks: Sequence[Task]) -> dict[str, Any]:
        """``meteor.demo.schedule.run_tasks`` with this pipeline's worker count; each task returns
        ``task_report`` (its result, timings and reuse), merged here."""
        def merge(name: str, report: dict[str, Any]) -> None:
            self.timings.update(report["wall"])
            self.cpu_timings.update(report["cpu"])
            self.reused.extend(report["reused"])

        return run_tasks(tasks, worker_count(self.config), on_done=merge)

    def task_report(self, result: Any) -> dict[str, Any]:
        """A task's result with this (worker's) pipeline's timings and reuse, for ``run_tasks``."""
        return {"result": result, "wall": dict(self.timings), "cpu": dict(self.cpu_timings),
                "reused": list(self.reused)}

    def estimated_cost(self, world: WorldManifest, meteor_config: MeteorConfig, step: int | str,
                       run: StageRun | None = None) -> float:
        """Estimated CPU seconds of a stage (1, 2, with its ``run``) or of the evaluation ("eval")
        of a model, for the order of the tasks only: a fixed cost per training step or question
        plus one per visual token of a sample (``STEP_COSTS``, ``EVAL_COST``)."""
        histogram = world.slice_histogram["train"]
        images = sum(histogram.values()) or 1
        views = sum(count * (int(slices) + 1 if int(slices) else 1) for slices, count in histogram.items()) / images
        k = meteor_config.compressor.tokens_per_slice
        visual = views * (64 if k is None else k)
        if step == "eval":
            fixed, per_token = EVAL_COST
            return world.counts["test_questions"] * (fixed + per_token * visual)
        fixed, per_token = STEP_COSTS[step]
        records = world.counts["stage1_records" if step == 1 else "stage2_records"]
        steps = -(-records // run.global_batch_size) * run.epochs
        return steps * (fixed + per_token * visual)

    def train_variant(self, world: WorldManifest, clip: Path, language_model: Path, name: str,
                      meteor_config: MeteorConfig, seed: int | None = None,
                      stages: dict[int, StageRun] | None = None) -> Path:
        """Stage 1 then stage 2 of one model configuration in ``out/runs/<name>/``; its model folder.

        Both stages use the demo's recipe (``config.stage1`` / ``config.stage2``) and its seed, or
        the training ``seed`` given (the world, the CLIP and the LLaMA stay the demo's), so
        variants differ only by ``meteor_config`` and the seed (or by the ``stages`` recipe given);
        each stage is reused when its key matches, stage 2 only when stage 1 was."""
        rebuilt = self.train_stage(world, clip, language_model, name, meteor_config, 1, seed, stages)
        self.train_stage(world, clip, language_model, name, meteor_config, 2, seed, stages, after_rebuild=rebuilt)
        return self.out / "runs" / name / "stage2" / "model"

    def stage_runs(self, name: str, meteor_config: MeteorConfig, stages: dict[int, StageRun] | None = None,
                   quiet: bool = False) -> dict[int, StageRun]:
        """The recipe of each stage: ``stages`` or the demo's, without glyph alignment for a projector
        that is not token-wise."""
        from meteor.model.projectors import is_tokenwise

        stage_runs = stages or {1: self.config.stage1, 2: self.config.stage2}
        projector = meteor_config.compressor.projector
        if not is_tokenwise(projector) and any(run.glyph_alignment for run in stage_runs.values()):
            if not quiet:
                self.log(f"    {name}: no glyph alignment (the {projector!r} projector has no token-wise MLP)")
            stage_runs = {stage: dataclasses.replace(run, glyph_alignment=0.0) for stage, run in stage_runs.items()}
        return stage_runs

    def stage_folders(self, world: WorldManifest, clip: Path, language_model: Path, name: str,
                      meteor_config: MeteorConfig, seed: int | None = None,
                      stages: dict[int, StageRun] | None = None, after_rebuild: bool = False
                      ) -> dict[int, CachedFolder]:
        """The cached folders of both stages (``out/runs/<name>/stage1``, ``stage2``), keyed on
        everything they depend on; stage 2 is rebuilt when ``after_rebuild`` (stage 1 was)."""
        seed = self.config.seed if seed is None else seed
        stage_runs = self.stage_runs(name, meteor_config, stages, quiet=True)
        base_key = {"world": world.config.to_dict(), "clip": _read_key(clip),
                    "language_model": _read_key(language_model), "meteor": meteor_config.to_dict(),
                    "seed": seed}
        root = self.out / "runs" / name
        stage1 = CachedFolder(root / "stage1", {**base_key, "stage1": asdict(stage_runs[1])}, self.force)
        stage2 = CachedFolder(root / "stage2", {**stage1.key, "stage2": asdict(stage_runs[2])},
                              self.force or after_rebuild or not stage1.done)
        return {1: stage1, 2: stage2}

    def stage_train_config(self, world: WorldManifest, clip: Path, language_model: Path, stage: int,
                           run: StageRun, folders: dict[int, CachedFolder], seed: int | None = None):
        """(``TrainConfig``, auxiliary losses) of one stage into ``folders[stage]`` (its
        ``meteor_config.json`` and, for ``run.single_turn``, its data file must be written there)."""
        from meteor.train import TrainConfig
        from meteor.demo.aids import TrainingAids

        folder = folders[stage].folder
        data = world.stage1_path if stage == 1 else world.stage2_path
        if run.single_turn:
            data = folder / "single_turn.json"
        return TrainConfig(
            stage=stage, data=str(data),
            image_folder=str(world.image_folder), vision=str(clip), language_model=str(language_model),
            meteor_config=str(folder / "meteor_config.json"),
            compressor_from=str(folders[1].folder) if stage == 2 else None,
            output_dir=str(folder), epochs=run.epochs, global_batch_size=run.global_batch_size,
            per_device_batch_size=run.per_device_batch_size, learning_rate=run.learning_rate,
            save_every=10 ** 6, keep_checkpoints=1, progress="lines" if worker_count(self.config) > 1 else "bar",
            seed=self.config.seed if seed is None else seed, feature_cache=str(self.out / "features"),
            example_cache_mb=self.config.example_cache_mb), \
            TrainingAids(run.scene_distillation, run.glyph_alignment).factories()

    def prepare_stage_folder(self, world: WorldManifest, meteor_config: MeteorConfig, stage: int, run: StageRun,
                             step: CachedFolder) -> None:
        """Clear ``step`` and write what its training reads there: the model configuration and, for
        ``run.single_turn``, the data with one record per question."""
        step.start()
        (step.folder / "meteor_config.json").write_text(meteor_config.to_json() + "\n")
        if run.single_turn:
            source = world.stage1_path if stage == 1 else world.stage2_path
            (step.folder / "single_turn.json").write_text(json.dumps(split_turns(json.loads(source.read_text()))))

    def train_stage(self, world: WorldManifest, clip: Path, language_model: Path, name: str,
                    meteor_config: MeteorConfig, stage: int, seed: int | None = None,
                    stages: dict[int, StageRun] | None = None, after_rebuild: bool = False) -> bool:
        """Stage ``stage`` of one model configuration (``train_variant``), unless its folder is
        reused; whether it was trained here."""
        from meteor.train import train

        stage_runs = self.stage_runs(name, meteor_config, stages, quiet=stage != 1)
        folders = self.stage_folders(world, clip, language_model, name, meteor_config, seed, stages, after_rebuild)
        step, run, step_name = folders[stage], stage_runs[stage], f"{name}/stage{stage}"
        if step.done:
            self.reused.append(step_name)
            return False
        started = self._clock()
        self.prepare_stage_folder(world, meteor_config, stage, run, step)
        self.log(f"    {name}, stage {stage}: training ...")
        train_config, auxiliary = self.stage_train_config(world, clip, language_model, stage, run, folders, seed)
        result = train(train_config, auxiliary=auxiliary)
        if result.interrupted:
            raise RuntimeError(f"{step_name} was interrupted; re-run meteor demo to start it again")
        self.log(f"    {name}, stage {stage}: {result.steps_done} steps, "
                 f"final loss {result.final_loss:.3f} ({time.perf_counter() - started[0]:.0f} s)")
        step.finish()
        self._timed(step_name, started)
        return True

    # --- 6. figures ---------------------------------------------------------------------------------------
    def selection_figures(self, world: WorldManifest, model_dir: Path, report_dir: Path) -> list[str]:
        """The paper's Figure 4 for ``config.figure_images`` test images (the sliced ones first: they
        have several views) with the model in ``model_dir``: which patches each expert kept; the
        file names written in ``report_dir``."""
        from meteor.demo.report import selection_figure
        from meteor.pretrained import load_pretrained

        report_dir.mkdir(parents=True, exist_ok=True)
        model, processor = load_pretrained(model_dir)
        tests = [json.loads(line) for line in world.test_path.read_text().splitlines() if line.strip()]
        seen, figures = set(), []
        count = self.config.figure_images
        for record in tests:
            if record["image_id"] in seen or len(figures) >= count:
                continue
            if record["meta"]["num_slices"] < 2 and len(figures) < count - 1:
                continue   # show sliced images first: they have several views
            seen.add(record["image_id"])
            name = f"selection_{record['image_id']}.png"
            selection_figure(model, processor, world.image_folder / record["image"], record["question"],
                                    report_dir / name)
            figures.append(name)
        return figures

    # --- 5. evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, world: WorldManifest, model_dir: Path, name: str,
                 tokens_per_slice: int | None = None, compressor_overrides: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
        """Scores of ``model_dir`` on the world's test split, in ``out/eval/<name>/`` (resumable);
        with ``tokens_per_slice``, run at that K′ instead of the K it was trained with; with
        ``compressor_overrides``, loaded with another projector (e.g. training-free CLS Top-K)."""
        from meteor.eval import EvalConfig, WorldRunner
        from meteor.pretrained import load_pretrained

        key = {"model": _read_key(model_dir.parent), "batch": self.config.eval_batch_size}
        if tokens_per_slice is not None:
            key["tokens_per_slice"] = tokens_per_slice
        if compressor_overrides:
            key["compressor_overrides"] = compressor_overrides
        step = CachedFolder(self.out / "eval" / name, key, self.force)
        scores_file = step.folder / "scores.json"
        if step.done and scores_file.is_file():
            self.reused.append(f"eval/{name}")
            return json.loads(scores_file.read_text())
        started = self._clock()
        if _read_key(step.folder) != step.key or self.force:
            step.start()          # predictions of another model: start over; same model: resume
        model, processor = load_pretrained(model_dir, compressor_overrides=compressor_overrides)
        runner = WorldRunner(EvalConfig(batch_size=self.config.eval_batch_size, tokens_per_slice=tokens_per_slice))
        runner.feature_cache = FeatureCache(self.out / "features")
        (step.folder / KEY_FILE).write_text(json.dumps(step.key, indent=2, sort_keys=True) + "\n")
        scores = runner.run(model, processor, world.test_path, world.image_folder, step.folder)
        self._timed(f"eval/{name}", started)
        return scores


def _figures_task(job: tuple, world: WorldManifest, name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """``Pipeline.selection_figures`` of ``name``'s stage-2 model as a task."""
    pipe = _worker_pipeline(job)
    started = pipe._clock()
    figures = pipe.selection_figures(world, pipe.out / "runs" / name / "stage2" / "model", pipe.out / "report")
    pipe._timed("figures", started)
    return pipe.task_report(figures)


def _worker_pipeline(job: tuple) -> Pipeline:
    out, config, force, rebuild, started_at = job
    return open_pipeline(out, config, force, rebuild, started_at=started_at)


def _stage_task(job: tuple, world: WorldManifest, clip: Path, language_model: Path, name: str,
                meteor_config: MeteorConfig, stage: int, seed: int | None, stages: dict[int, StageRun] | None,
                inputs: dict[str, Any]) -> dict[str, Any]:
    """``Pipeline.train_stage`` as a task; stage 2 is rebuilt when its stage 1 was (``inputs``)."""
    pipe = _worker_pipeline(job)
    after_rebuild = stage == 2 and inputs[f"{name}/stage1"]["result"]
    return pipe.task_report(pipe.train_stage(world, clip, language_model, name, meteor_config, stage, seed,
                                             stages, after_rebuild=after_rebuild))


def _eval_task(job: tuple, world: WorldManifest, name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """``Pipeline.evaluate`` of ``name``'s stage-2 model as a task."""
    pipe = _worker_pipeline(job)
    scores = pipe.evaluate(world, pipe.out / "runs" / name / "stage2" / "model", name)
    pipe.log(f"    {name}: accuracy " + ", ".join(f"{t} {v['accuracy']:.2f}" for t, v in scores["accuracy"].items()))
    return pipe.task_report(scores)
