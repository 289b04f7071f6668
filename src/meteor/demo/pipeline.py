"""The demo's steps, each cached in its own folder and keyed on the configuration that made it.

A step's folder holds ``key.json`` (written last) with the exact configuration of the step and of
everything it depends on; a re-run reuses the folder when the key matches and rebuilds it (after
deleting it) when it does not, or when ``force`` is set.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from meteor.model.configuration import CompressorConfig, MeteorConfig
from meteor.train.data import split_turns
from meteor.model.feature_cache import FeatureCache
from meteor.demo.clip import pretrain_clip
from meteor.demo.config import DemoConfig, StageRun
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


def budget_name(k: int | None) -> str:
    return "all" if k is None else f"k{k}"


def clip_threads(config: DemoConfig) -> int:
    """torch threads for the CLIP step, which runs alone: the threads all budgets use together
    (``workers`` × ``threads``), but no more than this machine's cores."""
    return max(1, min(config.workers * config.threads, os.cpu_count() or 1))


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
        self.reused: list[str] = []
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the pipeline (or its parent's) started."""
        return time.perf_counter() - self.started

    def _timed(self, name: str, started: float) -> None:
        self.timings[name] = round(time.perf_counter() - started, 1)

    # --- 1. world -----------------------------------------------------------------------------------
    def world(self) -> WorldManifest:
        started = time.perf_counter()
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
        started = time.perf_counter()
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
        started = time.perf_counter()
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
                     variants: Sequence[tuple[str, MeteorConfig] | tuple[str, MeteorConfig, int]]
                     ) -> list[tuple[Path, dict[str, Any]]]:
        """``train_variant`` then ``evaluate`` for each (name, config) or (name, config, training
        seed), ``config.workers`` at a time, each in a spawned process of its own logging on this
        pipeline's clock (their stages are independent and the frozen-feature cache on disk is
        shared); (model folder, scores) in the order given. Timings and reuse are merged into this
        pipeline's."""
        jobs = [(self.out, self.config, self.force, self.rebuild, time.time() - self.elapsed(),
                 world, clip, language_model, *variant) for variant in variants]
        if self.config.workers == 1 or len(jobs) <= 1:
            finished = [self._variant(*job[5:]) for job in jobs]
        else:
            context = multiprocessing.get_context("spawn")     # never fork a process that has run torch
            with ProcessPoolExecutor(max_workers=min(self.config.workers, len(jobs)), mp_context=context) as pool:
                finished = list(pool.map(_variant_in_worker, jobs))
        results = []
        for model_dir, scores, timings, reused in finished:
            self.timings.update(timings)
            self.reused.extend(reused)
            results.append((model_dir, scores))
        return results

    def _variant(self, world: WorldManifest, clip: Path, language_model: Path, name: str,
                 meteor_config: MeteorConfig, seed: int | None = None, stages: dict[int, StageRun] | None = None
                 ) -> tuple[Path, dict[str, Any], dict[str, float], list[str]]:
        timings, reused = len(self.timings), len(self.reused)
        model_dir = self.train_variant(world, clip, language_model, name, meteor_config, seed, stages)
        scores = self.evaluate(world, model_dir, name)
        self.log(f"    {name}: accuracy " + ", ".join(f"{t} {v['accuracy']:.2f}" for t, v in scores["accuracy"].items()))
        return model_dir, scores, dict(list(self.timings.items())[timings:]), self.reused[reused:]

    def train_variant(self, world: WorldManifest, clip: Path, language_model: Path, name: str,
                      meteor_config: MeteorConfig, seed: int | None = None,
                      stages: dict[int, StageRun] | None = None) -> Path:
        """Stage 1 then stage 2 of one model configuration in ``out/runs/<name>/``; its model folder.

        Both stages use the demo's recipe (``config.stage1`` / ``config.stage2``) and its seed, or
        the training ``seed`` given (the world, the CLIP and the LLaMA stay the demo's), so
        variants differ only by ``meteor_config`` and the seed (or by the ``stages`` recipe given);
        each stage is reused when its key matches."""
        seed = self.config.seed if seed is None else seed
        from meteor.model.projectors import is_tokenwise
        from meteor.train import TrainConfig, train
        from meteor.demo.aids import TrainingAids

        stage_runs = stages or {1: self.config.stage1, 2: self.config.stage2}
        projector = meteor_config.compressor.projector
        if not is_tokenwise(projector) and any(run.glyph_alignment for run in stage_runs.values()):
            self.log(f"    {name}: no glyph alignment (the {projector!r} projector has no token-wise MLP)")
            stage_runs = {stage: dataclasses.replace(run, glyph_alignment=0.0) for stage, run in stage_runs.items()}
        base_key = {"world": world.config.to_dict(), "clip": _read_key(clip),
                    "language_model": _read_key(language_model), "meteor": meteor_config.to_dict(),
                    "seed": seed}
        root = self.out / "runs" / name
        stage1 = CachedFolder(root / "stage1", {**base_key, "stage1": asdict(stage_runs[1])}, self.force)
        stage2 = CachedFolder(root / "stage2", {**stage1.key, "stage2": asdict(stage_runs[2])},
                      self.force or not stage1.done)
        for stage, step, run in ((1, stage1, stage_runs[1]), (2, stage2, stage_runs[2])):
            step_name = f"{name}/stage{stage}"
            if step.done:
                self.reused.append(step_name)
                continue
            started = time.perf_counter()
            step.start()
            config_file = step.folder / "meteor_config.json"
            config_file.write_text(meteor_config.to_json() + "\n")
            data = world.stage1_path if stage == 1 else world.stage2_path
            if run.single_turn:
                data = step.folder / "single_turn.json"
                data.write_text(json.dumps(split_turns(json.loads((world.stage1_path if stage == 1 else
                                                                   world.stage2_path).read_text()))))
            self.log(f"    {name}, stage {stage}: training ...")
            result = train(TrainConfig(
                stage=stage, data=str(data),
                image_folder=str(world.image_folder), vision=str(clip), language_model=str(language_model),
                meteor_config=str(config_file), compressor_from=str(stage1.folder) if stage == 2 else None,
                output_dir=str(step.folder), epochs=run.epochs, global_batch_size=run.global_batch_size,
                per_device_batch_size=run.per_device_batch_size, learning_rate=run.learning_rate,
                save_every=10 ** 6, keep_checkpoints=1, progress="lines" if self.config.workers > 1 else "bar",
                seed=seed, feature_cache=str(self.out / "features")),
                auxiliary=TrainingAids(run.scene_distillation, run.glyph_alignment).factories())
            if result.interrupted:
                raise RuntimeError(f"{step_name} was interrupted; re-run meteor demo to start it again")
            self.log(f"    {name}, stage {stage}: {result.steps_done} steps, "
                     f"final loss {result.final_loss:.3f} ({time.perf_counter() - started:.0f} s)")
            step.finish()
            self._timed(step_name, started)
        return stage2.folder / "model"

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
        started = time.perf_counter()
        if _read_key(step.folder) != step.key or self.force:
            step.start()          # predictions of another model: start over; same model: resume
        model, processor = load_pretrained(model_dir, compressor_overrides=compressor_overrides)
        runner = WorldRunner(EvalConfig(batch_size=self.config.eval_batch_size, tokens_per_slice=tokens_per_slice))
        runner.feature_cache = FeatureCache(self.out / "features")
        (step.folder / KEY_FILE).write_text(json.dumps(step.key, indent=2, sort_keys=True) + "\n")
        scores = runner.run(model, processor, world.test_path, world.image_folder, step.folder)
        self._timed(f"eval/{name}", started)
        return scores


def _variant_in_worker(job: tuple) -> tuple[Path, dict[str, Any], dict[str, float], list[str]]:
    """``Pipeline._variant`` in a worker process (see ``Pipeline.run_variants``)."""
    out, config, force, rebuild, started_at, world, clip, language_model, *variant = job
    pipe = open_pipeline(out, config, force, rebuild, started_at=started_at)
    return pipe._variant(world, clip, language_model, *variant)
