"""Scene distillation (meteor.demo.distill), an auxiliary loss, on tiny configs of the real classes."""

import json
from pathlib import Path

import pytest
import torch

from meteor.train.data import LlavaDataset, collate
from meteor.testing import tiny_llava_data, tiny_model
from meteor.train import TrainConfig, TrainConfigError, train
from meteor.demo.aids import TrainingAids
from meteor.demo.distill import SceneDistillation
from meteor.demo.world import WorldConfig, make_scene
from meteor.demo.world.captions import region_phrase, scene_line
from meteor.pretrained import save_pretrained
from meteor.pretrained import load_pretrained


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    model, processor = tiny_model(seed=0)
    save_pretrained(root / "base", model, processor)
    return {"base": root / "base", "images": root / "data",
            "plain": tiny_llava_data(root / "data", 16, seed=3),
            "meta": tiny_llava_data(root / "data", 16, seed=3, meta=True)}


def _config(assets, out, **overrides):
    values = dict(stage=2, data=str(assets["meta"]), image_folder=str(assets["images"]),
                  model=str(assets["base"]), output_dir=str(out), global_batch_size=8,
                  per_device_batch_size=4, max_steps=4, save_every=100, learning_rate=1e-3)
    values.update(overrides)
    return TrainConfig(**values)


def _train(assets, out, scene_distillation=0.0, **overrides):
    return train(_config(assets, out, **overrides),
                 auxiliary=TrainingAids(scene_distillation=scene_distillation).factories())


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_scene_line_lists_shapes_in_reading_order_then_texts():
    meta = {"size": [300, 300], "texts": [{"kind": "word", "text": "CAT", "bbox": [10, 250, 40, 262]}],
            "objects": [{"shape": "star", "colour": "red", "size": "large", "bbox": [200, 200, 280, 280]},
                        {"shape": "circle", "colour": "blue", "size": "small", "bbox": [10, 10, 40, 40]}]}
    assert scene_line(meta) == ('Scene: small blue circle near the top left; large red star near the bottom '
                                'right; word "CAT" near the bottom left.')
    scene = make_scene(WorldConfig(), "train", 5)
    line = scene_line(scene.to_meta())
    for obj in scene.objects:
        assert f"{obj.size} {obj.colour} {obj.shape} {region_phrase(obj.bbox, scene.width, scene.height)}" in line


def test_the_teacher_reads_the_scene_where_the_image_was(assets):
    model, processor = load_pretrained(assets["base"])
    records = json.loads(Path(assets["meta"]).read_text())
    distiller = SceneDistillation(model.language_model, processor, "vicuna_v1", records)
    ids = distiller.teacher_ids(0)
    assert processor.image_token_id not in ids
    text = processor.tokenizer.decode(ids)
    assert scene_line(records[0]["meta"]) in text and "What colour is the square?" in text
    assert all(not p.requires_grad for p in distiller.teacher.parameters())

    dataset = LlavaDataset(records, assets["images"], processor, "vicuna_v1")
    examples = [dataset.encode(k) for k in range(4)]
    batch = collate(processor, examples)
    out = model(**batch.to_model_kwargs(), output_hidden_states=True)
    term = distiller.loss(range(4), batch, out)
    assert term.count == 4 and term.loss.requires_grad
    # Recomputed as the module docstring states it, each teacher sequence run alone (unpadded):
    # loss_i = mean over decoder layers of mean((h − t)²) / mean(t²) over the tokens after the image.
    layers = model.language_model.config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1
    expected = 0.0
    with torch.no_grad():
        for row in range(4):
            teacher_ids = distiller.teacher_ids(row)
            teacher = distiller.teacher(input_ids=torch.tensor([teacher_ids]), output_hidden_states=True).hidden_states
            length = int(batch.attention_mask[row].sum())
            student_ids = batch.input_ids[row, :length].tolist()
            start = max(t for t, token in enumerate(student_ids) if token == processor.image_token_id) + 1
            n = length - start
            assert n > 0 and teacher_ids[-n:] == student_ids[start:]       # the shared suffix
            per_layer = [((h[row, start:length] - t[0, -n:]).pow(2).mean() / t[0, -n:].pow(2).mean()).item()
                         for h, t in zip(out.hidden_states[1:], teacher[1:])]
            assert len(per_layer) == layers and min(per_layer) > 0            # the scene is not the image
            expected += sum(per_layer) / layers
    assert term.loss.item() == pytest.approx(expected, rel=1e-5)
    # A sample whose suffix differs from the teacher's (another record's teacher) is not matched.
    shifted = distiller.loss([1, 0, 3, 2], batch, out)
    assert shifted.count == 0 and shifted.loss.item() == 0


def test_training_pulls_the_hidden_states_towards_the_teacher(assets, tmp_path):
    result = _train(assets, tmp_path / "on", scene_distillation=5.0, max_steps=16,
                    learning_rate=3e-3, warmup_ratio=0.1)
    assert result.steps_done == 16
    log = _log(tmp_path / "on")
    assert all(entry["distill_count"] == 8 for entry in log)
    first, last = sum(e["distill"] for e in log[:3]) / 3, sum(e["distill"] for e in log[-3:]) / 3
    assert last < 0.8 * first, [e["distill"] for e in log]
    # The frozen teacher is a copy: the saved LLM moved away from the starting one.
    before, _ = load_pretrained(assets["base"])
    after, _ = load_pretrained(result.model_dir)
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)

    train(_config(assets, tmp_path / "off", max_steps=2))
    assert all("distill" not in entry for entry in _log(tmp_path / "off"))


def test_text_only_records_train_on_their_tokens_alone(assets, tmp_path):
    records = json.loads(Path(assets["meta"]).read_text())
    for record in records[::2]:             # half the records lose their image (and scene)
        del record["image"], record["meta"]
        record["conversations"][0]["value"] = "What colour is the square?"
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    _train(assets, tmp_path / "mixed", data=str(path), scene_distillation=1.0, max_steps=2)
    log = _log(tmp_path / "mixed")
    assert [e["samples"] for e in log] == [8, 8] and all(e["skipped"] == 0 for e in log)
    assert sum(e["distill_count"] for e in log) == 8      # the 8 records with an image
    model, processor = load_pretrained(assets["base"])
    distiller = SceneDistillation(model.language_model, processor, "vicuna_v1", records)
    assert distiller.teacher_ids(0) is None and distiller.teacher_ids(1) is not None


def test_records_without_a_scene_and_bad_weights_are_refused(assets, tmp_path):
    refused = r"16 of 16 records have none \(first: tiny-0\).*scene_distillation to 0"
    with pytest.raises(TrainConfigError, match=refused):
        _train(assets, tmp_path / "plain", data=str(assets["plain"]), scene_distillation=1.0)
    assert not (tmp_path / "plain" / "log.jsonl").exists()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(TrainConfigError, match="scene_distillation must be a finite weight"):
            TrainingAids(scene_distillation=bad)
