"""Training on tiny configs of the real classes: stages, bad data, checkpoints, kill and resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meteor.testing import tiny_llava_data, tiny_meteor_config, tiny_model
from meteor.train import TrainConfig, TrainConfigError, train
from meteor.train.checkpoint import latest_loadable, list_checkpoints, save_checkpoint
from meteor.pretrained import save_pretrained
from meteor.pretrained import load_pretrained


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model, processor = tiny_model(seed=0)
    save_pretrained(root / "base", model, processor)
    return {"root": root, "base": root / "base",
            "captions": tiny_llava_data(root / "data", 32, seed=1, caption=True),
            "instruct": tiny_llava_data(root / "data", 32, seed=1), "images": root / "data"}


def _config(assets, out, **overrides):
    values = dict(stage=2, data=str(assets["instruct"]), image_folder=str(assets["images"]),
                  model=str(assets["base"]), output_dir=str(out), global_batch_size=8,
                  per_device_batch_size=4, max_steps=4, save_every=100, learning_rate=1e-3)
    values.update(overrides)
    return TrainConfig(**values)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


PARTS = {"model.multi_modal_projector.": "compressor.", "model.vision_tower.": "vision_tower.",
         "model.language_model.": "language_model.", "lm_head.": "language_model.lm_head."}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """A saved model's weights by part: compressor.*, vision_tower.*, language_model.* (with its head)."""
    tensors = {}
    for name, tensor in load_file(folder / "model.safetensors").items():
        prefix = next(p for p in PARTS if name.startswith(p))
        tensors[PARTS[prefix] + name[len(prefix):]] = tensor
    return tensors


def _compressor(folder: Path) -> dict[str, torch.Tensor]:
    """The compressor's weights of a saved model (its own names), or a stage-1 run's compressor file."""
    if (folder / "compressor.safetensors").is_file() and not (folder / "model.safetensors").is_file():
        return load_file(folder / "compressor.safetensors")
    return {k[len("compressor."):]: v for k, v in _tensors(folder).items() if k.startswith("compressor.")}


def test_presets_are_the_papers_and_overridable():
    one, two = TrainConfig(stage=1), TrainConfig(stage=2)
    assert (one.learning_rate, one.global_batch_size, one.template, one.warmup_ratio) == (1e-3, 256, "plain", 0.03)
    assert (two.learning_rate, two.global_batch_size, two.template) == (2e-5, 128, "vicuna_v1")
    assert TrainConfig(stage=2, learning_rate=5e-5).learning_rate == 5e-5
    for bad, words in [({"stage": 3}, "stage must be 1"), ({"stage": 1, "lora": True}, "stage 2"),
                       ({"per_device_batch_size": 0}, "per_device_batch_size"),
                       ({"warmup_ratio": 1.0}, "warmup_ratio"), ({"precision": "fp8"}, "precision")]:
        with pytest.raises(TrainConfigError, match=words):
            TrainConfig(**bad)


def test_stage1_trains_only_the_compressor(assets, tmp_path):
    result = train(_config(assets, tmp_path / "s1", stage=1, data=str(assets["captions"]), max_steps=3,
                           learning_rate=1e-2))
    assert result.steps_done == 3 and not result.interrupted
    before, after = _tensors(assets["base"]), _tensors(result.model_dir)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    compressor = {name for name in before if name.startswith("compressor.")}
    assert changed and changed <= compressor                 # nothing outside the compressor moved
    assert len(changed) >= len(compressor) - 2               # and (nearly) every compressor tensor did
    assert (tmp_path / "s1" / "compressor.safetensors").is_file()


def test_stage2_loss_falls_and_the_model_loads_for_inference(assets, tmp_path):
    stage1 = train(_config(assets, tmp_path / "s1", stage=1, data=str(assets["captions"]), max_steps=2))
    result = train(_config(assets, tmp_path / "s2", compressor_from=str(tmp_path / "s1"), max_steps=30,
                           learning_rate=3e-3, warmup_ratio=0.1))
    losses = _losses(tmp_path / "s2")
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    model, processor = load_pretrained(result.model_dir)
    first = _compressor(tmp_path / "s1")
    assert stage1.model_dir is not None and first.keys() == model.compressor.state_dict().keys()
    saved = _compressor(result.model_dir)
    loaded = model.compressor.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)     # what was saved is what runs
    assert any(not torch.equal(saved[name], first[name]) for name in saved)  # and stage 2 moved it on
    batch = processor.prompts(["What colour is the square?"], [assets["images"] / "images" / "0000.png"])
    model.eval()
    answer = model.generate(**batch.to_model_kwargs(), max_new_tokens=4, do_sample=False)
    assert 1 <= answer.shape[1] - batch.input_ids.shape[1] <= 4
    assert torch.equal(model.generate(**batch.to_model_kwargs(), max_new_tokens=4, do_sample=False), answer)


def test_bad_records_are_skipped_counted_and_named(assets, tmp_path):
    records = json.loads(Path(assets["instruct"]).read_text())[:6]
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    records += [
        {"id": "no-file", "image": "images/missing.png", "conversations": records[0]["conversations"]},
        {"id": "garbage", "image": "broken.png", "conversations": records[0]["conversations"]},
        {"id": "no-answer", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "tag-no-image", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                 {"from": "gpt", "value": "x"}]},
    ]
    for record in records[:6]:
        record["image"] = str(Path(assets["images"]) / record["image"])
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    result = train(_config(assets, tmp_path / "run", data=str(data), image_folder=str(tmp_path),
                           global_batch_size=10, max_steps=1))
    assert result.skipped.total == 4
    assert result.skipped.counts["missing image"] == 1 and result.skipped.counts["unreadable image"] == 1
    assert result.skipped.counts["malformed conversation"] == 2
    assert "no-file" in result.skipped.summary() and "garbage" in result.skipped.summary()
    with pytest.raises(ValueError, match="record 'no-file': missing image"):
        train(_config(assets, tmp_path / "strict", data=str(data), image_folder=str(tmp_path),
                      global_batch_size=10, max_steps=1, strict=True))


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    weights = {"w": torch.arange(4.0)}
    save_checkpoint(tmp_path, 1, weights, {"scheduler": {"n": 1}}, {})

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated mid-write)")

    monkeypatch.setattr("meteor.train.checkpoint.torch.save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(4)}, {"scheduler": {}}, {})
    monkeypatch.undo()
    assert [c.step for c in list_checkpoints(tmp_path)] == [1]
    checkpoint, (loaded, state, meta) = latest_loadable(tmp_path)
    assert checkpoint.step == 1 and torch.equal(loaded["w"], weights["w"]) and state["scheduler"] == {"n": 1}
    # A complete-looking checkpoint whose file was damaged afterwards is skipped, not trusted.
    save_checkpoint(tmp_path, 3, {"w": torch.ones(4)}, {"scheduler": {}}, {}, keep=5)
    weights_file = tmp_path / "checkpoint-3" / "trainable.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:20])
    checkpoint, (loaded, _, _) = latest_loadable(tmp_path)
    assert checkpoint.step == 1


def _launch(assets, out, *extra):
    command = [sys.executable, "-m", "meteor", "train", "--stage", "2", "--data", str(assets["instruct"]),
               "--image-folder", str(assets["images"]), "--model", str(assets["base"]),
               "--output-dir", str(out), "--global-batch-size", "4", "--per-device-batch-size", "2",
               "--max-steps", "14", "--save-every", "5", "--learning-rate", "1e-3", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_sigterm_then_resume_reproduces_the_uninterrupted_losses(assets, tmp_path):
    reference = _launch(assets, tmp_path / "reference")
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    expected = _losses(tmp_path / "reference")

    run = tmp_path / "interrupted"
    victim = _launch(assets, run)
    deadline = time.time() + 300
    while time.time() < deadline:
        log = run / "log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGTERM)
    assert victim.wait(timeout=300) == 128 + signal.SIGTERM, victim.stderr.read()[-2000:]
    stopped_at = list_checkpoints(run)[-1].step
    assert 3 <= stopped_at < 14 and not (run / "model").exists()

    resumed = _launch(assets, run, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    assert f"resuming from {run / f'checkpoint-{stopped_at}'}" in resumed.stdout.read()
    losses = _losses(run)
    assert len(losses) == len(expected) == 14
    assert losses == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_lora_trains_adapters_and_saves_a_plain_merged_model(assets, tmp_path):
    result = train(_config(assets, tmp_path / "lora", lora=True, lora_rank=4, lora_alpha=8, max_steps=2))
    after = _tensors(result.model_dir)
    before = _tensors(assets["base"])
    assert not any("lora" in name for name in after)            # merged: a plain LlamaForCausalLM
    assert before.keys() == after.keys()
    moved = [n for n in before if n.startswith("language_model.") and not torch.equal(before[n], after[n])]
    assert moved and all(n.endswith("proj.weight") for n in moved)


def test_gradient_checkpointing_and_bf16_autocast_run(assets, tmp_path):
    """Recomputing activations changes no number: fp32 losses with gradient checkpointing are
    those without, step for step (the same seed, so the same data and initialisation); bf16
    autocast rounds, so its losses are only close to fp32's."""
    runs = {}
    for name, options in [("fp32", dict(precision="fp32")),
                          ("fp32_gc", dict(precision="fp32", gradient_checkpointing=True)),
                          ("bf16_gc", dict(precision="bf16", gradient_checkpointing=True))]:
        result = train(_config(assets, tmp_path / name, max_steps=3, **options))
        assert result.steps_done == 3
        runs[name] = _losses(tmp_path / name)
    assert len(runs["fp32"]) == 3 and len(set(runs["fp32"])) == 3          # the losses move step to step
    assert runs["fp32_gc"] == pytest.approx(runs["fp32"], rel=1e-5, abs=1e-6)
    assert runs["bf16_gc"] == pytest.approx(runs["fp32"], rel=0.01)
    assert runs["bf16_gc"] != runs["fp32"]                                  # autocast did run in bf16


def test_truncation_is_counted_and_reported(assets, tmp_path, capsys):
    records = json.loads(Path(assets["instruct"]).read_text())[:8]
    for record in records:
        record["conversations"][1]["value"] = "red " * 300     # long answers, cut at max_length
    data = tmp_path / "long.json"
    data.write_text(json.dumps(records))
    result = train(_config(assets, tmp_path / "run", data=str(data), max_length=150, max_steps=1))
    assert result.truncated == 8 and result.skipped.total == 0
    assert "8 sample(s) were truncated to max_length=150" in capsys.readouterr().err
    with pytest.raises(TrainConfigError, match="--data"):
        train(_config(assets, tmp_path / "x", data=str(tmp_path / "nope.json")))


def test_instruction_tuning_records_its_template_and_prompts_use_it(assets, tmp_path):
    result = train(_config(assets, tmp_path / "templated", stage=2, max_steps=1, template="auto"))
    saved = json.loads((result.model_dir / "config.json").read_text())
    assert saved["template"] == "vicuna_v1"          # auto, resolved: the tiny BPE has no chat template
    model, processor = load_pretrained(result.model_dir)
    assert processor.config.template == "vicuna_v1"
    vicuna = processor.prompts(["What colour is the square?"], template="vicuna_v1").input_ids
    assert torch.equal(processor.prompts(["What colour is the square?"]).input_ids, vicuna)
    plain = processor.prompts(["What colour is the square?"], template="plain").input_ids
    assert not torch.equal(plain, vicuna)


def test_a_stage1_micro_batch_without_an_image_trains_on(assets, tmp_path):
    """Stage 1 trains only the compressor, so a micro-batch of text-only records has no gradient
    to give: the step goes on (a zero gradient) instead of failing in backward."""
    records = json.loads(Path(assets["captions"]).read_text())
    for record in records[:16]:
        del record["image"]
        record["conversations"][0]["value"] = "Describe a square."
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    result = train(_config(assets, tmp_path / "run", stage=1, data=str(path), global_batch_size=4,
                           per_device_batch_size=4, max_steps=8, seed=1))   # step 5: four text-only records
    assert result.steps_done == 8 and all(math.isfinite(loss) for loss in _losses(tmp_path / "run"))


def test_freezing_the_projector_mlp_trains_only_the_fusion(assets, tmp_path):
    """Stage 1 from a converted LLaVA keeps its MLP (--freeze-projector-mlp): only Flash Global
    Fusion and the instruction token move."""
    result = train(_config(assets, tmp_path / "frozen", stage=1, data=str(assets["captions"]), max_steps=2,
                           freeze_projector_mlp=True))
    before = _compressor(assets["base"])
    after = _compressor(result.model_dir)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(not k.startswith("mlp.") for k in moved)
    assert any(k.startswith("fusion.") for k in moved)
    with pytest.raises(TrainConfigError, match="train nothing"):
        tiny, processor = tiny_model(tiny_meteor_config(projector="cls_topk"))
        save_pretrained(tmp_path / "topk", tiny, processor)
        train(_config(assets, tmp_path / "topk_run", stage=1, model=str(tmp_path / "topk"),
                      data=str(assets["captions"]), freeze_projector_mlp=True))
