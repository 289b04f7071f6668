"""Glyph alignment (meteor.demo.glyphs), an auxiliary loss, on tiny configs of the real classes and a small world."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from meteor.train.data import LlavaDataset, collate
from meteor.testing import tiny_llava_data, tiny_meteor_config, tiny_model
from meteor.train import TrainConfig, TrainConfigError, train
from meteor.train.loop import DataOrder
from meteor.demo.aids import TrainingAids
from meteor.demo.glyphs import TEMPERATURE, GlyphAlignment, glyph_loss, text_token, view_glyphs
from meteor.demo.world import WorldConfig, generate_world, world_texts
from meteor.pretrained import save_pretrained
from meteor.pretrained import load_pretrained

WORLD = WorldConfig(seed=5, n_train_images=24, n_test_images=2, base_size=112, number_digits=1,
                    text_height_patches=(2.0, 2.5), text_stroke=0.05, questions_per_image=2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("glyphs")
    world = generate_world(root / "world", WORLD)
    model, processor = tiny_model(seed=0, texts=world_texts(WORLD))
    save_pretrained(root / "base", model, processor)
    for projector, k in (("mlp", None), ("resampler", 4)):
        other, other_processor = tiny_model(tiny_meteor_config(projector=projector, tokens_per_slice=k), seed=0,
                                            texts=world_texts(WORLD))
        save_pretrained(root / projector, other, other_processor)
    return {"root": root, "world": world, "base": root / "base", "mlp": root / "mlp", "resampler": root / "resampler",
            "plain": tiny_llava_data(root / "plain", 8, seed=1, meta=True)}


def _records(assets, stage: int = 2) -> list[dict]:
    world = assets["world"]
    return json.loads((world.stage1_path if stage == 1 else world.stage2_path).read_text())


def _config(assets, out, **overrides):
    world = assets["world"]
    values = dict(stage=2, data=str(world.stage2_path), image_folder=str(world.image_folder),
                  model=str(assets["base"]), output_dir=str(out), global_batch_size=8,
                  per_device_batch_size=4, max_steps=2, save_every=100, learning_rate=1e-3)
    values.update(overrides)
    return TrainConfig(**values)


def _train(assets, out, glyph_alignment=0.0, **overrides):
    return train(_config(assets, out, **overrides), auxiliary=TrainingAids(glyph_alignment=glyph_alignment).factories())


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_texts_token_is_the_one_the_scene_line_gives_it(assets):
    _, processor = load_pretrained(assets["base"])
    tokenizer = processor.tokenizer
    for text in ("CAT", "MAP", "7", "0"):
        token = text_token(tokenizer, text)
        line = tokenizer(f'word "{text}" near the top', add_special_tokens=False).input_ids
        assert token in line
        assert text.startswith(tokenizer.decode([token]))


def _coverage(meta: dict, box, step_x: float, step_y: float, row: int, col: int, samples: int = 16):
    """The fraction of patch (row, col) inside each text's box, by sampling points (the reference)."""
    fractions = []
    for text in meta["texts"]:
        left, top, right, bottom = text["bbox"]
        inside = 0
        for i in range(samples):
            for j in range(samples):
                x = box[0] + (col + (j + 0.5) / samples) * step_x
                y = box[1] + (row + (i + 0.5) / samples) * step_y
                inside += left <= x < right and top <= y < bottom
        fractions.append(inside / samples ** 2)
    return fractions


def test_the_targets_are_the_patches_each_text_covers_in_every_view(assets):
    _, processor = load_pretrained(assets["base"])
    world = assets["world"]
    cover, checked, sliced_seen = 0.3, 0, False
    for record in _records(assets)[:12]:
        meta = record["meta"]
        plan = processor.prepare_image(world.image_folder / record["image"]).plan
        views = view_glyphs(meta, plan, processor.tokenizer, cover)
        assert len(views) == plan.num_views
        sliced_seen |= plan.is_sliced
        boxes = list(plan.crop_boxes) + [(0, 0, *plan.image_size)]
        tokens = [text_token(processor.tokenizer, t["text"]) for t in meta["texts"]]
        for glyphs, box, (w, h), (rows, cols) in zip(views, boxes, plan.view_sizes, plan.view_patches):
            step_x = (box[2] - box[0]) / w * plan.patch_size
            step_y = (box[3] - box[1]) / h * plan.patch_size
            marked = set(zip(glyphs.patches.tolist(), glyphs.tokens.tolist()))
            assert len(marked) == len(glyphs.patches)
            for row in range(rows):
                for col in range(cols):
                    for fraction, token in zip(_coverage(meta, box, step_x, step_y, row, col), tokens):
                        if fraction >= cover + 0.07:
                            assert (row * cols + col, token) in marked
                            checked += 1
                        elif fraction <= cover - 0.07:
                            assert (row * cols + col, token) not in marked
        # at this text size every text covers enough of at least one patch of some view
        assert set(tokens) <= {token for glyphs in views for token in glyphs.tokens.tolist()}
    assert checked > 50 and sliced_seen


def test_the_loss_is_the_cross_entropy_of_cosine_similarities():
    torch.manual_seed(0)
    projected, table = torch.randn(5, 8), torch.randn(11, 8)
    labels = torch.tensor([3, 0, 10, 3, 7])
    projected[1] = 4 * table[0]               # exactly the direction of its label: a hit
    loss, hits = glyph_loss(projected, labels, table, temperature=0.1)
    expected = 0.0
    for row, label in enumerate(labels.tolist()):
        sims = torch.tensor([F.cosine_similarity(projected[row], table[v], dim=0) for v in range(11)])
        expected += -torch.log_softmax(sims / 0.1, dim=0)[label]
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    nearest = (F.normalize(projected, dim=-1) @ F.normalize(table, dim=-1).T).argmax(-1)
    assert hits == int((nearest == labels).sum()) and hits >= 1


def test_the_loss_scores_the_text_patches_and_trains_only_the_compressor(assets):
    model, processor = load_pretrained(assets["base"])
    records = _records(assets)
    dataset = LlavaDataset(records, assets["world"].image_folder, processor, "vicuna_v1")
    term = GlyphAlignment.factory(1.0)(model, dataset, "vicuna_v1")
    examples = [dataset.encode(k) for k in range(4)]
    for k, example in enumerate(examples):
        term.prepare(k, example)
    batch = collate(processor, examples)
    out = model(**batch.to_model_kwargs(), return_views=True)
    assert sum(len(group.owners) for group in out.views) == sum(e.image.plan.num_views for e in examples)
    part = term.loss(range(4), batch, out)
    expected = sum(term.units(k, e) for k, e in enumerate(examples))
    assert part.count == expected > 0
    # Recomputed patch by patch: each covered patch's fused token through the projector's MLP, its
    # cosine similarity to every input embedding / TEMPERATURE, cross-entropy with the text's token.
    assert all(e.image is not None for e in examples)        # so image i is example i
    table = model.language_model.get_input_embeddings().weight.detach()
    loss_sum, hits = 0.0, 0
    with torch.no_grad():
        for group in out.views:
            for row, (image, view) in enumerate(group.owners):
                target = term.targets(image, examples[image])[view]
                for patch, token in zip(target.patches.tolist(), target.tokens.tolist()):
                    projected = model.compressor.mlp(group.output.mlp_inputs[row, patch])
                    sims = F.cosine_similarity(projected[None], table, dim=-1) / TEMPERATURE   # (V,)
                    loss_sum -= float(torch.log_softmax(sims, dim=0)[token])
                    hits += int(sims.argmax()) == token
    assert part.loss.item() == pytest.approx(loss_sum, rel=1e-5)
    assert part.sums["accuracy"] == hits
    # an untrained projector is near uniform over the vocabulary: about log V per patch
    assert part.loss.item() / expected == pytest.approx(math.log(len(processor.tokenizer)), rel=0.1)
    part.loss.backward()
    compressor = model.compressor
    assert compressor.mlp.fc1.weight.grad.abs().sum() > 0
    # the loss reads the fused tokens, which Flash Global Fusion computes with the instruction token
    assert compressor.fusion.instruction_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.language_model.parameters())
    assert "views" not in model(**batch.to_model_kwargs())


def test_the_mlp_baseline_aligns_its_raw_patch_tokens(assets, tmp_path):
    config = _config(assets, tmp_path / "mlp", model=str(assets["mlp"]))
    train(config, auxiliary=TrainingAids(glyph_alignment=1.0).factories())
    log = _log(tmp_path / "mlp")
    assert len(log) == 2
    # Each step's count is the covered patches of that step's records; the first step's loss (before
    # any update) is the term's over those records on the untrained model, micro-batch by micro-batch.
    model, processor = load_pretrained(assets["mlp"])
    assert model.meteor_config.compressor.projector == "mlp"
    dataset = LlavaDataset(config.data, config.image_folder, processor, config.template, config.max_length)
    term = GlyphAlignment.factory(1.0)(model, dataset, config.template)
    order = DataOrder(len(dataset), config.global_batch_size, config.seed)
    for step, entry in enumerate(log):
        records = order.step_records(step)
        examples = [dataset.encode(k) for k in records]
        assert entry["glyph_count"] == int(sum(term.units(k, e) for k, e in zip(records, examples))) > 0
    records = order.step_records(0)
    examples = [dataset.encode(k) for k in records]
    for k, example in zip(records, examples):
        term.prepare(k, example)
    model.train()
    loss_sum, hits = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(records), config.per_device_batch_size):
            span = slice(start, start + config.per_device_batch_size)
            batch = collate(processor, examples[span])
            part = term.loss(records[span], batch, model(**batch.to_model_kwargs(), return_views=True))
            loss_sum, hits = loss_sum + part.loss.item(), hits + part.sums["accuracy"]
    assert log[0]["glyph"] == pytest.approx(loss_sum / log[0]["glyph_count"], rel=1e-4)
    assert log[0]["glyph_accuracy"] == pytest.approx(hits / log[0]["glyph_count"], abs=1e-9)


def test_training_teaches_the_projector_the_glyphs(assets, tmp_path):
    result = _train(assets, tmp_path / "on", stage=1, data=str(assets["world"].stage1_path),
                    glyph_alignment=1.0, max_steps=30, learning_rate=1e-2, warmup_ratio=0.1)
    assert result.steps_done == 30
    log = _log(tmp_path / "on")
    assert all(entry["glyph_count"] > 0 for entry in log)
    first, last = sum(e["glyph"] for e in log[:3]) / 3, sum(e["glyph"] for e in log[-3:]) / 3
    assert last < 0.7 * first, [round(e["glyph"], 2) for e in log]
    assert max(e["glyph_accuracy"] for e in log[-5:]) > 0.2
    train(_config(assets, tmp_path / "off"))
    assert all("glyph" not in entry for entry in _log(tmp_path / "off"))


def test_records_without_texts_meta_other_projectors_and_bad_weights_are_refused(assets, tmp_path):
    records = _records(assets)
    del records[2]["meta"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(records))
    with pytest.raises(TrainConfigError, match=r"1 of \d+ records have none .*glyph_alignment to 0"):
        _train(assets, tmp_path / "broken", data=str(broken), glyph_alignment=1.0)
    assert not (tmp_path / "broken" / "log.jsonl").exists()
    with pytest.raises(TrainConfigError, match="needs a projector that maps each patch token .*'resampler'"):
        _train(assets, tmp_path / "resampler", model=str(assets["resampler"]), glyph_alignment=1.0)
    assert not (tmp_path / "resampler" / "log.jsonl").exists()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(TrainConfigError, match="glyph_alignment must be a finite weight"):
            TrainingAids(glyph_alignment=bad)
    # records with a scene but no texts train, with nothing to align
    _train(assets, tmp_path / "notext", data=str(assets["plain"]),
           image_folder=str(assets["plain"].parent), glyph_alignment=1.0)
    assert all(e["glyph_count"] == 0 and e["glyph"] == 0 for e in _log(tmp_path / "notext"))
