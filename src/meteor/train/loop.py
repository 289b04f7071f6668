"""The training loop: both stages, gradient accumulation, exact resume, preemption-safe.

Loss normalisation: every optimizer step sees exactly `global_batch_size` records (the last step of
an epoch may see fewer), split over ranks and micro-batches. Each micro-batch contributes the *sum*
of its token losses divided by the number of supervised tokens in the whole global batch, so the
gradient is that of the mean token loss over the global batch whatever the number of devices or
the accumulation: 2 processes and 1 process give the same updates up to floating-point order.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from meteor.processing.conversation import IGNORE_INDEX, resolve_template
from meteor.train.data import Example, LlavaDataset, RecordError, SkipReport, collate
from meteor.pretrained import COMPRESSOR_FILE, build, load_compressor, load_pretrained, save_compressor, save_pretrained
from meteor.train.args import TrainConfig, TrainConfigError
from meteor.train.auxiliary import AuxiliaryFactory, AuxiliaryLoss, log_entries
from meteor.train.checkpoint import latest_loadable, rng_state, save_checkpoint, set_rng_state
from meteor.train.distributed import DistributedRun
from meteor.train.logger import RunLogger
from meteor.train.schedule import warmup_cosine


@dataclass
class TrainResult:
    steps_done: int
    total_steps: int
    interrupted: bool
    signal_name: str | None
    final_loss: float | None
    model_dir: Path | None
    skipped: SkipReport
    truncated: int


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes the current step, checkpoints, and exits."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def load_model(config: TrainConfig, dist: DistributedRun) -> tuple[Any, Any]:
    """The model to train and its processor: a saved folder (``--model``), or built from a vision
    tower and a language model (``--vision`` and ``--language-model``)."""
    from meteor.model.configuration import MeteorConfig

    if config.model is not None:
        model, processor = load_pretrained(config.model)
    else:
        meteor_config = (MeteorConfig.from_json(Path(config.meteor_config).read_text())
                         if config.meteor_config else MeteorConfig())
        model, processor = build(config.vision, config.language_model, config.language_model, meteor_config,
                                 base_size=config.base_size)
    if config.compressor_from is not None:
        source = Path(config.compressor_from)
        weights = load_compressor(source / COMPRESSOR_FILE if source.is_dir() else source)
        try:
            model.compressor.load_state_dict(weights)
        except RuntimeError as err:
            raise TrainConfigError(f"--compressor-from {source} does not fit this model's compressor "
                                   f"(different widths or options?): {err}") from err
    if dist.mode == "fsdp":   # fully_shard moves each unit to the device as it shards it
        return model, processor
    return model.to(dist.device), processor


def set_trainable(model, config: TrainConfig) -> list[dict[str, Any]]:
    """Freeze per stage; returns the optimizer's parameter groups."""
    model.requires_grad_(False)
    model.compressor.requires_grad_(True)
    if config.freeze_projector_mlp:
        if getattr(model.compressor, "mlp", None) is None:
            raise TrainConfigError(f"--freeze-projector-mlp: the {model.meteor_config.compressor.projector!r} projector "
                                   f"has no token-wise MLP to keep")
        model.compressor.mlp.requires_grad_(False)
    trainable = [p for p in model.compressor.parameters() if p.requires_grad]
    if not trainable and config.stage == 1:
        raise TrainConfigError("stage 1 would train nothing: the projector's only parameters are its MLP, "
                               "which --freeze-projector-mlp keeps as it is")
    groups = [{"params": trainable, "lr": config.learning_rate}]
    if config.stage == 2:
        if config.lora:
            from meteor.train.lora import add_lora
            lora_params = add_lora(model, config.lora_rank, config.lora_alpha)
            groups.append({"params": lora_params, "lr": config.lora_learning_rate})
        else:
            model.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
            seen: set[int] = set()            # a head tied to the embeddings is one parameter
            params = [p for p in [*model.language_model.parameters(), *model.lm_head.parameters()]
                      if id(p) not in seen and not seen.add(id(p))]
            groups.append({"params": params, "lr": config.learning_rate})
    return groups


class DataOrder:
    """Which records each step reads: a seeded permutation per epoch, cut into global batches,
    each dealt round-robin to the ranks. A pure function of (seed, step), so resuming is exact."""

    def __init__(self, size: int, global_batch: int, seed: int):
        if size == 0:
            raise TrainConfigError("the data file holds no record")
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.steps_per_epoch = math.ceil(size / global_batch)

    def step_records(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.size, generator=generator)
        return order[within * self.global_batch:(within + 1) * self.global_batch].tolist()


class EncodedRecords:
    """``dataset.encode`` with the encoded records kept in memory up to ``max_bytes`` (the first
    ones read; a record that cannot be encoded is not kept and fails again when read again)."""

    def __init__(self, dataset: LlavaDataset, max_bytes: int):
        self.dataset, self.max_bytes = dataset, max_bytes
        self.kept: dict[int, Example] = {}
        self.bytes = 0

    def encode(self, index: int) -> Example:
        example = self.kept.get(index)
        if example is None:
            example = self.dataset.encode(index)
            size = _example_bytes(example)
            if self.bytes + size <= self.max_bytes:
                self.kept[index] = example
                self.bytes += size
        return example


def _example_bytes(example: Example) -> int:
    size = 16 * (len(example.input_ids) + len(example.labels)) + 256
    if example.image is not None:
        size += sum(t.numel() * t.element_size() for t in (example.image.slices, example.image.global_view))
    return size


def _supervised(example: Example) -> int:
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


def _refuse_if_every_record_is_skipped(dataset: LlavaDataset, config: TrainConfig) -> None:
    """Encode records until one is usable; if none is, stop before any step with the count and the
    first reasons (otherwise every step would train on nothing, and stage 1 would fail with an
    autograd error about tensors that do not require grad)."""
    reasons = SkipReport()
    first: list[str] = []
    for index in range(len(dataset)):
        try:
            dataset.encode(index)
            return
        except RecordError as err:
            if config.strict:
                raise
            reasons.add(err)
            if len(first) < 3:
                first.append(str(err))
    raise TrainConfigError(f"every record of {config.data} would be skipped ({reasons.total} of "
                           f"{len(dataset)}), so no step could train; the first: {'; '.join(first)}. "
                           f"{reasons.summary()}")


def train(config: TrainConfig, auxiliary: Sequence[AuxiliaryFactory] = ()) -> TrainResult:
    """Run one training stage as ``config`` says; ``auxiliary`` adds loss terms to the LM loss
    (``meteor.train.auxiliary``), each built once the model and the data exist."""
    config.validate_sources()
    output_dir = Path(config.output_dir)
    dist = DistributedRun.setup(config)
    torch.manual_seed(config.seed)
    model, processor = load_model(config, dist)
    groups = set_trainable(model, config)
    if config.gradient_checkpointing:   # transformers ≥ 5.2x calls it activation checkpointing
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    cache = None
    if config.feature_cache is not None:   # the frozen tower's outputs, kept by the trainer, not the model
        from meteor.model.feature_cache import FeatureCache

        cache = FeatureCache(None if config.feature_cache == "memory" else config.feature_cache)
    dataset = LlavaDataset(config.data, config.image_folder, processor, config.template, config.max_length)
    _refuse_if_every_record_is_skipped(dataset, config)
    records_in_memory = EncodedRecords(dataset, config.example_cache_mb << 20)
    terms: list[AuxiliaryLoss] = [build(model, dataset, config.template) for build in auxiliary]  # before wrapping
    needs_hidden = any(term.needs_hidden_states for term in terms)
    forward_options = {"output_hidden_states": needs_hidden}
    if any(term.needs_views for term in terms):
        forward_options["return_views"] = True
    order = DataOrder(len(dataset), config.global_batch_size, config.seed)
    total_steps = config.max_steps or math.ceil(order.steps_per_epoch * config.epochs)
    per_rank = math.ceil(config.global_batch_size / dist.world_size)
    micro_steps = math.ceil(per_rank / config.per_device_batch_size)
    wrapped, groups = dist.wrap(model, groups)   # before the optimizer: FSDP replaces the parameters
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, math.ceil(total_steps * config.warmup_ratio)))
    skipped = SkipReport()
    counters = {"truncated": 0}
    filler = dataset.processor.encode([{"from": "human", "value": "."}, {"from": "gpt", "value": "."}],
                                      template=config.template)
    start_step = 0
    if config.resume:
        start_step = _resume(output_dir, model, optimizer, scheduler, skipped, counters, dist)
    logger = RunLogger(output_dir, dist.is_main, resume_step=start_step if config.resume else None)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(
            {**dataclasses.asdict(config), "auxiliary": {term.name: term.weight for term in terms}}, indent=2) + "\n")
        logger.message(f"stage {config.stage}: {len(dataset)} records, {total_steps} steps of "
                       f"{config.global_batch_size} samples ({dist.world_size} process(es) × "
                       f"{micro_steps} micro-batches of ≤ {config.per_device_batch_size}); "
                       f"trainable parameters: {sum(p.numel() for g in groups for p in g['params']):,}")
    stop = StopFlag()
    stop.install()
    model.train()
    loss_value = None
    step = start_step
    progress = logger.progress(total_steps, start_step, config.progress,
                               label="/".join(output_dir.resolve().parts[-2:]))
    try:
        while step < total_steps:
            training_progress = step / total_steps
            started = time.perf_counter()
            records = order.step_records(step)[dist.rank::dist.world_size]
            examples: list[Example] = []
            positions: list[int] = []
            for index in records:
                try:
                    example = records_in_memory.encode(index)
                    for term in terms:
                        term.prepare(index, example)
                    examples.append(example)
                    positions.append(index)
                except RecordError as err:
                    if config.strict:
                        raise
                    skipped.add(err)
                    logger.message(f"skipping {err}")
            counters["truncated"] += sum(e.truncated for e in examples)
            local_tokens = sum(_supervised(e) for e in examples)
            local_units = [sum(term.units(p, e) for p, e in zip(positions, examples)) for term in terms]
            global_tokens, *global_units = dist.all_reduce_sum_many([float(local_tokens), *map(float, local_units)])
            loss_sum_local, tokens_local, visual_tokens, samples = 0.0, 0, 0, 0
            term_sums = {term.name: {"loss": 0.0, "count": 0.0, **dict.fromkeys(term.logged, 0.0)} for term in terms}
            for micro in range(micro_steps):
                span = slice(micro * config.per_device_batch_size, (micro + 1) * config.per_device_batch_size)
                chunk = examples[span]
                if chunk:
                    batch, weight = collate(processor, chunk), 1.0
                else:   # keep every rank in step with the others: a zero-weight filler batch
                    batch, weight = processor.collate([filler], []), 0.0
                sync = micro == micro_steps - 1
                inputs = batch.to_model_kwargs()
                if cache is not None and batch.images:
                    inputs["tower_outputs"] = cache.encode_views(model.model, inputs["pixel_values"],
                                                                 inputs["view_grids"])
                # The model's loss is the sum over supervised tokens divided by this: the mean over the
                # global batch, whatever the number of devices and micro-batches (module docstring).
                share = max(global_tokens, 1.0) / dist.world_size
                with dist.maybe_no_sync(wrapped, sync), dist.autocast(config.precision):
                    out = wrapped(**inputs, **forward_options, training_progress=training_progress,
                                  num_items_in_batch=share)
                    total = out.loss if weight else out.loss * 0.0
                    count = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
                    if chunk:
                        for term, units in zip(terms, global_units):
                            part = term.loss(positions[span], batch, out)
                            total = total + part.loss * (term.weight * dist.world_size / max(units, 1.0))
                            sums = term_sums[term.name]
                            sums["loss"] += float(part.loss.detach())
                            sums["count"] += part.count
                            for key in term.logged:
                                sums[key] += part.sums[key]
                if not total.requires_grad:
                    # Nothing trainable took part (a text-only micro-batch of stage 1, whose LLM is
                    # frozen, or a filler): a zero that touches every trainable parameter, so the
                    # backward runs, and DDP, which waits for every rank's gradients, gets them.
                    total = total + sum(p.sum() for g in groups for p in g["params"]) * 0.0
                total.backward()
                if weight:
                    loss_sum_local += float(out.loss.detach()) * share
                    tokens_local += count
                    visual_tokens += int((batch.input_ids == processor.image_token_id).sum())
                    samples += batch.input_ids.shape[0]
            dist.drop_unused_grads()
            if config.max_grad_norm > 0:
                dist.clip_grad_norm(wrapped, [p for g in groups for p in g["params"]], config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            figures = {"loss": loss_sum_local, "samples": float(samples), "visual_tokens": float(visual_tokens),
                       "tokens": float(tokens_local), "input_tokens": float(sum(len(e.input_ids) for e in examples))}
            figures.update({f"{name}/{key}": value for name, sums in term_sums.items() for key, value in sums.items()})
            totals = dist.all_reduce_sum_dict(figures)
            step += 1
            loss_value = totals["loss"] / max(global_tokens, 1.0)
            elapsed = time.perf_counter() - started
            entries = {
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "samples": int(totals["samples"]),
                "visual_tokens_per_sample": totals["visual_tokens"] / max(totals["samples"], 1.0),
                "supervised_tokens": int(global_tokens),
                "tokens_per_s": totals["input_tokens"] / elapsed,
                "native_weight_progress": training_progress,
                "skipped": skipped.total,
                "truncated": counters["truncated"],
            }
            for name, sums in term_sums.items():
                extra = {key: totals[f"{name}/{key}"] for key in sums if key not in ("loss", "count")}
                entries.update(log_entries(name, totals[f"{name}/loss"], totals[f"{name}/count"], extra))
            logger.step(step, entries, every=config.log_every)
            progress.update(1, loss_value)
            stopping = dist.any_flag(stop.signal_name is not None)
            if stopping or step % config.save_every == 0 or step == total_steps:
                _checkpoint(output_dir, step, model, optimizer, scheduler, skipped, counters, config, dist)
            if stopping:
                logger.message(f"received {stop.signal_name or 'a stop signal'}: checkpoint-{step} "
                               f"saved; continue with --resume")
                break
    finally:
        stop.restore()
        progress.close()
    interrupted = step < total_steps
    model_dir = None
    if not interrupted:
        model_dir = _save_final(output_dir, model, processor, config, dist)
    if dist.is_main:
        logger.message(skipped.summary())
        if counters["truncated"]:
            logger.message(f"{counters['truncated']} sample(s) were truncated to max_length={config.max_length}")
    logger.close()
    result = TrainResult(step, total_steps, interrupted, stop.signal_name, loss_value, model_dir,
                         skipped, counters["truncated"])
    # Free the DDP wrapper (its reducer's buckets), the model and the optimizer while the process
    # group lives: otherwise gloo's worker thread may free their tensors (which needs the GIL) while
    # destroy_process_group joins that thread holding the GIL, a deadlock seen under load.
    del wrapped, model, optimizer, scheduler, groups, progress, terms
    gc.collect()
    dist.barrier()
    dist.shutdown()
    return result


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _checkpoint(output_dir, step, model, optimizer, scheduler, skipped, counters, config, dist) -> None:
    weights = dist.gather_trainable(model)
    optimizer_state = dist.optimizer_state(model, optimizer)
    if not dist.is_main:
        dist.barrier()
        return
    state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_state(),
             "skipped": dict(skipped.counts), "skipped_examples": skipped.examples,
             "truncated": counters["truncated"]}
    save_checkpoint(output_dir, step, weights, state,
                    {"stage": config.stage, "world_size": dist.world_size}, keep=config.keep_checkpoints)
    dist.barrier()


def _resume(output_dir, model, optimizer, scheduler, skipped, counters, dist) -> int:
    found = latest_loadable(output_dir)
    if found is None:
        raise TrainConfigError(f"--resume: no complete checkpoint in {output_dir}; start without --resume")
    checkpoint, (weights, state, meta) = found
    missing = set(_trainable_state(model)) - set(weights)
    if missing:
        raise TrainConfigError(f"{checkpoint.path} lacks {len(missing)} trainable tensor(s) of this run "
                               f"(e.g. {sorted(missing)[0]}): was it written by another stage or model?")
    dist.load_trainable(model, weights)
    dist.load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    skipped.counts.update(state["skipped"])
    skipped.examples.update(state["skipped_examples"])
    counters["truncated"] = state["truncated"]
    if dist.is_main:
        print(f"resuming from {checkpoint.path} (step {checkpoint.step})", flush=True)
    return checkpoint.step


def _save_final(output_dir, model, processor, config, dist) -> Path | None:
    if dist.mode == "fsdp":
        # Sharded parameters cannot be saved as they are: load the full state into a plain copy.
        state = dist.full_state(model)
        if dist.is_main:
            # a plain copy for saving only: on the CPU, where the gathered state already is
            model, processor = load_model(config, dataclasses.replace(dist, mode="none",
                                                                      device=torch.device("cpu")))
            set_trainable(model, config)
            model.load_state_dict(state)
    if config.lora and dist.is_main:   # only the main process saves (under FSDP, only it has a plain model)
        from meteor.train.lora import merge_lora
        merge_lora(model)
    folder = output_dir / "model"
    if dist.is_main:
        if config.stage == 2:   # the model answers in the template it was instruction-tuned with
            processor.set_config(dataclasses.replace(processor.config, template=resolve_template(config.template,
                                                                                                  processor.tokenizer)))
        save_pretrained(folder, model, processor, overwrite=True)
        if config.stage == 1:   # LLaVA's "projector file": what stage 2 starts from
            save_compressor(model, output_dir / COMPRESSOR_FILE)
        (output_dir / "DONE.json").write_text(json.dumps({"model": str(folder)}) + "\n")
    dist.barrier()
    return folder
