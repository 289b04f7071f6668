"""meteor.demo.world: a deterministic synthetic world; answers recomputed here from the scene metadata."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from meteor.model.configuration import ConfigError
from meteor.processing.slicing import plan_slices
from meteor.demo.world import (
    COLOURS,
    QUESTION_TYPES,
    SHAPES,
    WORDS,
    WorldConfig,
    WorldManifest,
    generate_world,
    make_scene,
    render_scene,
    world_texts,
)

SMALL = WorldConfig(seed=3, n_train_images=30, n_test_images=20, base_size=112, questions_per_image=4)
FILES = ("stage1.json", "stage2.json", "test.jsonl", "manifest.json")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> WorldManifest:
    return generate_world(tmp_path_factory.mktemp("world"), SMALL)


def load(world: WorldManifest) -> tuple[list[dict], list[dict], list[dict]]:
    stage1 = json.loads(world.stage1_path.read_text())
    stage2 = json.loads(world.stage2_path.read_text())
    test = [json.loads(line) for line in world.test_path.read_text().splitlines()]
    return stage1, stage2, test


def questions_of(world: WorldManifest) -> dict[str, list[tuple[dict, dict]]]:
    """(question fields, scene meta) per split."""
    _, stage2, test = load(world)
    return {"train": [(q, r["meta"]) for r in stage2 for q in r["questions"]],
            "test": [(r, r["meta"]) for r in test]}


def matching(meta: dict, query: dict) -> list[dict]:
    keys = [k for k in ("shape", "colour", "size") if k in query]
    return [o for o in meta["objects"] if all(o[k] == query[k] for k in keys)]


# --- configuration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options, words", [
    (dict(n_test_images=0), "at least one image per split"),
    (dict(base_size=100), "multiple of patch_size"),
    (dict(base_size=42), "at least 4 patches"),
    (dict(slice_mix=(0, 1)), "at least two slices"),
    (dict(slice_mix=(7,)), "2..max_slices=6"),
    (dict(min_objects=5, max_objects=3), "min_objects"),
    (dict(min_texts=0, max_texts=0), "read"),
    (dict(text_height_patches=(0.2, 1.0)), "text_height_patches"),
    (dict(question_types=("colour", "colour")), "question_types"),
    (dict(question_types=("ocr",)), "question_types"),
    (dict(seed=-1), "seed"),
    (dict(number_digits=0), "number_digits"),
    (dict(number_digits=5), "number_digits"),
    (dict(n_train_images=2.5), "integer"),
])
def test_bad_configs_are_refused_with_the_field_named(options, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        WorldConfig(**options)


def test_config_round_trips_through_its_dict():
    config = WorldConfig(slice_mix=[0, 2, 6], question_types=["count", "read"])
    assert config.slice_mix == (0, 2, 6) and config.question_types == ("count", "read")
    assert WorldConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="unknown WorldConfig"):
        WorldConfig.from_dict({"sed": 1})


@pytest.mark.parametrize("digits", [1, 2])
def test_numbers_have_at_most_number_digits_digits(digits):
    config = WorldConfig(seed=5, n_train_images=200, n_test_images=1, number_digits=digits)
    numbers = [t.text for i in range(200) for t in make_scene(config, "train", i).texts if t.kind == "number"]
    lengths = Counter(len(n) for n in numbers)
    assert set(lengths) == set(range(1, digits + 1)), lengths
    assert all(n.isdigit() and (len(n) == 1 or n[0] != "0") for n in numbers)
    if digits == 1:
        assert set(numbers) == set("0123456789")


# --- determinism and splits -----------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files_and_pixels(world, tmp_path):
    again = generate_world(tmp_path / "again", SMALL)
    assert not again.reused
    for name in FILES:
        assert (world.out_dir / name).read_bytes() == (again.out_dir / name).read_bytes(), name
    first = sorted(p.relative_to(world.image_folder) for p in world.image_folder.rglob("*.png"))
    assert first == sorted(p.relative_to(again.image_folder) for p in again.image_folder.rglob("*.png"))
    for path in first:
        assert np.array_equal(np.asarray(Image.open(world.image_folder / path)),
                              np.asarray(Image.open(again.image_folder / path))), path
    other = generate_world(tmp_path / "other", WorldConfig(**{**SMALL.to_dict(), "seed": 4}))
    assert other.test_path.read_bytes() != world.test_path.read_bytes()


def test_train_and_test_never_share_an_image(world):
    stage1, stage2, test = load(world)
    train_images = {r["image"] for r in stage1} | {r["image"] for r in stage2}
    test_images = {r["image"] for r in test}
    assert train_images and test_images and not train_images & test_images
    assert all(r["id"].startswith("train-") for r in stage1 + stage2)
    assert all(r["image_id"].startswith("test-") for r in test)
    pixels = {split: {np.asarray(Image.open(world.image_folder / image)).tobytes() for image in images}
              for split, images in (("train", train_images), ("test", test_images))}
    assert not pixels["train"] & pixels["test"]
    assert len(train_images) == SMALL.n_train_images and len(test_images) == SMALL.n_test_images


# --- record format ----------------------------------------------------------------------------------

def test_records_are_llava_format_with_one_image_token(world):
    stage1, stage2, test = load(world)
    for record in stage1 + stage2:
        assert {"id", "image", "conversations"} <= set(record)
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert (world.image_folder / record["image"]).is_file()
    for record in stage2:
        answers = [t["value"] for t in record["conversations"][1::2]]
        assert answers == [q["answer"] for q in record["questions"]]
    for record in test:
        assert {"question_id", "image", "question", "answer", "question_type"} <= set(record)
        assert "<image>" not in record["question"] and (world.image_folder / record["image"]).is_file()
    assert len({r["question_id"] for r in test}) == len(test)


def test_captions_name_every_object_and_text(world):
    stage1, _, _ = load(world)
    for record in stage1:
        caption = record["conversations"][1]["value"]
        for text in record["meta"]["texts"]:
            assert f'"{text["text"]}"' in caption
        for obj in record["meta"]["objects"]:
            assert obj["colour"] in caption and obj["shape"] in caption


# --- questions and answers ------------------------------------------------------------------------------

def test_every_question_type_is_asked_and_balanced(world):
    for split, questions in questions_of(world).items():
        counts = Counter(q["question_type"] for q, _ in questions)
        assert set(counts) == set(QUESTION_TYPES), split
        assert max(counts.values()) - min(counts.values()) <= 2, counts
        exist = Counter(q["answer"] for q, _ in questions if q["question_type"] == "exist")
        assert abs(exist["yes"] - exist["no"]) <= 1, exist  # POPE balance
        letters = Counter(q["answer"] for q, _ in questions if q["question_type"] == "choice")
        assert max(letters.values()) - min(letters.get(k, 0) for k in "ABCD") <= 1, letters


def test_answers_follow_from_the_scene_metadata(world):
    seen_subtypes = Counter()
    for split, questions in questions_of(world).items():
        for q, meta in questions:
            kind, query, answer, text = q["question_type"], q["query"], q["answer"], q["question"]
            seen_subtypes[(kind, q["subtype"])] += 1
            if kind == "colour":
                assert "colour" not in query
                (target,) = matching(meta, query)  # the named object is unique
                name = " ".join(query[k] for k in ("size", "shape") if k in query)
                assert answer == target["colour"] and text.endswith(f"the {name}?")
            elif kind == "count":
                assert answer == str(len(matching(meta, query)))
            elif kind == "exist":
                present = bool(matching(meta, query))
                assert answer == ("yes" if present else "no")
                assert (q["subtype"] == "positive") == present
                shapes = {o["shape"] for o in meta["objects"]}
                colours = {o["colour"] for o in meta["objects"]}
                if q["subtype"] == "adversarial":  # a near miss: its shape or colour is in the image
                    assert query["shape"] in shapes or query.get("colour") in colours
                if q["subtype"] == "random":
                    assert query["shape"] not in shapes and query.get("colour") not in colours
            elif kind == "read":
                texts = meta["texts"]
                assert answer in {t["text"] for t in texts}
                if "kind" in query:
                    (target,) = [t for t in texts if t["kind"] == query["kind"]]
                    assert target["text"] == answer
                elif "extreme" in query:
                    (target,) = [t for t in texts if t["text"] == answer]
                    others = [t["bbox"] for t in texts if t is not target]
                    box = target["bbox"]
                    beyond = {"top": lambda o: box[3] <= o[1], "bottom": lambda o: box[1] >= o[3],
                              "left": lambda o: box[2] <= o[0], "right": lambda o: box[0] >= o[2]}
                    assert others and all(map(beyond[query["extreme"]], others))
                else:
                    assert len(texts) == 1
            elif kind == "position":
                (a,), (b,) = matching(meta, query["first"]), matching(meta, query["second"])
                expected = {"left": a["bbox"][2] <= b["bbox"][0], "right": b["bbox"][2] <= a["bbox"][0],
                            "above": a["bbox"][3] <= b["bbox"][1], "below": b["bbox"][3] <= a["bbox"][1]}
                assert expected[answer]
            elif kind == "choice":
                options = q["options"]
                assert len(options) == len(set(options)) == 4 and answer in "ABCD"
                assert text.endswith("Answer with the option's letter from the given choices directly.")
                for letter, option in zip("ABCD", options):
                    assert f"\n{letter}. {option}\n" in text
                chosen = options["ABCD".index(answer)]
                if q["subtype"] == "colour":
                    (target,) = matching(meta, query)
                    assert chosen == target["colour"]
                elif q["subtype"] == "shape":
                    (target,) = matching(meta, query)
                    assert chosen == target["shape"]
                elif q["subtype"] == "count":
                    assert chosen == str(len(matching(meta, query)))
                else:
                    (target,) = [t for t in meta["texts"] if t["kind"] == "word"]
                    assert chosen == target["text"]
                    assert not set(options) - {chosen} & {t["text"] for t in meta["texts"]}
    assert seen_subtypes[("exist", "adversarial")] and seen_subtypes[("exist", "random")]


def test_named_objects_in_questions_exist_and_absent_ones_do_not(world):
    for q, meta in questions_of(world)["test"]:
        if q["question_type"] == "exist" and q["answer"] == "no":
            assert not matching(meta, q["query"])
        if q["question_type"] in ("colour", "position"):
            query = q["query"]
            queries = [query] if q["question_type"] == "colour" else [query["first"], query["second"]]
            assert all(len(matching(meta, query)) == 1 for query in queries)


# --- geometry --------------------------------------------------------------------------------------

@pytest.mark.parametrize("base_size", [112, 168])
@pytest.mark.parametrize("target", [0, 2, 3, 4, 5, 6])
def test_slice_counts_cover_zero_to_six(base_size, target):
    config = WorldConfig(n_train_images=4, n_test_images=1, base_size=base_size, slice_mix=(target,))
    for index in range(config.n_train_images):
        scene = make_scene(config, "train", index)
        plan = plan_slices(scene.width, scene.height, config.max_slices, config.patch_size, base_size)
        assert plan.num_slices == scene.num_slices == target


def test_text_is_at_least_one_patch_tall_in_its_slice(world):
    _, stage2, test = load(world)
    patch = SMALL.patch_size
    global_heights = []
    for meta in [r["meta"] for r in stage2] + [r["meta"] for r in test]:
        width, height = meta["size"]
        plan = plan_slices(width, height, SMALL.max_slices, patch, SMALL.base_size)
        assert plan.num_slices == meta["num_slices"]
        for text in meta["texts"]:
            left, top, right, bottom = text["bbox"]
            if plan.is_sliced:
                box = plan.crop_boxes[text["view"]]
                assert box[0] <= left and box[1] <= top and right <= box[2] and bottom <= box[3]  # not cut
                scale = plan.slice_size[1] / (box[3] - box[1])
                global_heights.append((bottom - top) * plan.global_size[1] / height)
            else:
                assert text["view"] == -1
                scale = plan.global_size[1] / height
            assert (bottom - top) * scale >= patch
    assert min(global_heights) < patch  # slicing is what makes some text legible


@pytest.mark.parametrize("options", [{}, dict(text_stroke=0.05, text_height_patches=(1.5, 2.0))])
def test_drawn_pixels_stay_inside_the_recorded_boxes(options):
    config = WorldConfig(seed=1, n_train_images=24, n_test_images=1, **options)
    checked = 0
    for index in range(config.n_train_images):
        scene = make_scene(config, "train", index)
        if scene.background != "plain":
            continue
        pixels = np.asarray(render_scene(scene))
        drawn = (pixels != np.array(scene.background_rgb, dtype=np.uint8)).any(-1)
        covered = np.zeros_like(drawn)
        for left, top, right, bottom in [o.bbox for o in scene.objects] + [t.bbox for t in scene.texts]:
            covered[top:bottom, left:right] = True
        assert not (drawn & ~covered).any(), scene.image_id
        for text in scene.texts:  # the box is tight vertically: ink in its first and last rows
            left, top, right, bottom = text.bbox
            assert drawn[top, left:right].any() and drawn[bottom - 1, left:right].any()
        checked += 1
    assert checked >= 3


def test_text_stroke_thickens_the_glyphs_inside_their_box():
    """The same scene with a stroke: each text keeps its string and place, is drawn with more ink
    (about one more pixel on every side of each stroke) and its box still holds all of it."""
    thin, bold = WorldConfig(seed=2, number_digits=1), WorldConfig(seed=2, number_digits=1, text_stroke=0.1)
    for index in range(6):
        a, b = make_scene(thin, "train", index), make_scene(bold, "train", index)
        assert all(t.stroke == 0 for t in a.texts) and all(t.stroke >= 1 for t in b.texts)
        assert [t.text for t in a.texts] == [t.text for t in b.texts]
        for text in b.texts:
            assert text.to_dict()["stroke"] == text.stroke
        ink = [(np.asarray(render_scene(s)) != np.array(s.background_rgb, dtype=np.uint8)).any(-1) for s in (a, b)]
        if a.background == "plain":
            area = [sum(m[t.bbox[1]:t.bbox[3], t.bbox[0]:t.bbox[2]].sum() for t in s.texts)
                    for m, s in zip(ink, (a, b))]
            assert area[1] > 1.3 * area[0]


# --- the folder ---------------------------------------------------------------------------------------------

def test_rerun_reuses_the_same_world_and_refuses_a_different_one(world, tmp_path):
    folder = tmp_path / "w"
    first = generate_world(folder, SMALL)
    stamps = {name: (folder / name).stat().st_mtime_ns for name in FILES}
    again = generate_world(folder, SMALL)
    assert again.reused and again.data == first.data
    assert stamps == {name: (folder / name).stat().st_mtime_ns for name in FILES}

    different = WorldConfig(**{**SMALL.to_dict(), "n_test_images": 5})
    with pytest.raises(FileExistsError, match="n_test_images: 20 there, 5 asked"):
        generate_world(folder, different)
    assert WorldManifest.load(folder).config == SMALL  # untouched

    (folder / "notes.txt").write_text("mine")
    replaced = generate_world(folder, different, overwrite=True)
    assert replaced.counts["test_images"] == 5 and not replaced.reused
    assert len(list((folder / "images" / "test").iterdir())) == 5
    assert (folder / "notes.txt").read_text() == "mine"  # only the world's own files are replaced

    (folder / "images" / "train" / "000000.png").unlink()  # an incomplete copy of the same world
    assert not generate_world(folder, different).reused
    assert (folder / "images" / "train" / "000000.png").is_file()


def test_a_folder_of_other_files_is_never_overwritten(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_world(tmp_path, SMALL)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_world(tmp_path, SMALL, overwrite=True)
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8"


def test_manifest_reports_histogram_types_and_baselines(world):
    data = world.data
    assert data["config"] == SMALL.to_dict()
    assert sum(data["slice_histogram"]["train"].values()) == SMALL.n_train_images
    assert sum(data["question_types"]["test"].values()) == data["counts"]["test_questions"]
    baselines = data["baselines"]
    assert baselines["exist"]["chance_accuracy"] == 0.5 and baselines["choice"]["chance_accuracy"] == 0.25
    assert baselines["all"]["questions"] == data["counts"]["test_questions"]
    _, _, test = load(world)
    counts = Counter(r["answer"] for r in test if r["question_type"] == "count")
    assert baselines["count"]["majority_accuracy"] == round(max(counts.values()) / sum(counts.values()), 4)
    assert data["text_view_height"]["min"] >= SMALL.patch_size


def test_world_texts_match_the_files_and_cover_the_vocabulary(world):
    from_config = world_texts(SMALL)
    assert from_config == world_texts(world.out_dir) == world_texts(world)
    assert not any("<image>" in text for text in from_config)
    corpus = " ".join(from_config)
    assert all(word in corpus for word in (*SHAPES, *COLOURS, *WORDS, "yes", "no"))
    with_test = world_texts(world, include_test=True)
    _, _, test = load(world)
    assert len(with_test) == len(from_config) + 2 * len(test)


def test_foil_captions_change_exactly_one_detail_and_cover_every_kind():
    import random as _random

    from meteor.demo.world.captions import foil_caption
    text = ('A large yellow diamond, an orange circle and three medium purple diamonds on a plain light '
            'background. The number "370" is written in small grey letters near the top. The word "CAT" '
            'is written in small grey letters in the centre.')
    rng, kinds = _random.Random(0), Counter()
    for _ in range(300):
        foil = foil_caption(text, rng)
        assert foil != text
        old, new = text.split(), foil.split()
        assert len(old) == len(new)
        changed = [(a, b) for a, b in zip(old, new) if a != b]
        # one swapped word, plus at most its article ("a orange" is never written)
        assert 1 <= len(changed) <= 2 and " a orange" not in foil and " an large" not in foil
        a, b = changed[-1]
        if a.startswith('"'):
            kinds["number" if a.strip('"').isdigit() else "word"] += 1
            assert len(a) == len(b) if a.strip('"').isdigit() else b.strip('"').isupper()
        else:
            kinds[a.strip(",.")] += 1
    assert {"number", "word", "yellow", "large", "diamond", "three", "diamonds"} <= set(kinds)
    assert foil_caption("Nothing here.", rng) is None
    assert foil_caption(text, _random.Random(3)) == foil_caption(text, _random.Random(3))


def test_clip_training_puts_each_captions_foil_beside_it(tmp_path):
    from meteor.demo.clip import ClipPretrainConfig, pretrain_clip
    from meteor.testing import tiny_tokenizer
    from meteor.demo.world import generate_world, world_texts
    from meteor.demo.world.captions import foil_caption
    world = generate_world(tmp_path / "w", WorldConfig(n_train_images=8, n_test_images=1, slice_mix=(0,)))
    tokenizer = tiny_tokenizer(world_texts(world.config), 256)
    records = json.loads(world.stage1_path.read_text())
    calls = []

    def counting_foil(caption, rng):
        calls.append(caption)
        return foil_caption(caption, rng)

    config = ClipPretrainConfig(epochs=2, batch_size=4, vision_width=16, text_width=16, projection_dim=16)
    summary = pretrain_clip(records, world.image_folder, tokenizer, tmp_path / "clip", config,
                            progress=lambda line: None, foil=counting_foil)
    captions = {r["conversations"][1]["value"] for r in records}
    assert summary["steps"] == 4 and len(calls) == 4 * 4 and set(calls) <= captions


def test_patch_weights_average_each_box_over_the_patches_it_covers():
    import torch

    from meteor.demo.clip import patch_weights
    # a 56×28 image resized to a 28-px square of 14-px patches (2×2): x is halved, y kept
    weights = patch_weights([(0, 0, 28, 14), (14, 7, 42, 21), (30, 20, 30, 20)], (56, 28), 28, 14)
    assert weights.shape == (3, 4)
    assert torch.allclose(weights.sum(1), torch.ones(3))
    assert torch.allclose(weights[0], torch.tensor([1.0, 0, 0, 0]))                 # exactly patch (0, 0)
    assert torch.allclose(weights[1], torch.full((4,), 0.25))                      # the middle of all four
    assert torch.allclose(weights[2], torch.tensor([0, 0, 0, 1.0]))                # empty box: its centre's patch


def test_item_phrases_name_each_shape_and_text_alone():
    from meteor.demo.world.captions import item_phrases
    meta = {"objects": [{"shape": "cross", "colour": "orange", "size": "large", "bbox": [62, 40, 89, 67]}],
            "texts": [{"text": "SUN", "kind": "word", "bbox": [14, 3, 53, 17]}]}
    assert item_phrases(meta) == [((62, 40, 89, 67), "a large orange cross"), ((14, 3, 53, 17), 'the word "SUN"')]


def test_clip_region_loss_trains_the_patch_tokens_of_its_layer(tmp_path):
    import dataclasses

    from meteor.demo.clip import ClipPretrainConfig, pretrain_clip
    from meteor.testing import tiny_tokenizer
    from meteor.demo.world import generate_world, world_texts
    from meteor.demo.world.captions import foil_caption, item_phrases
    world = generate_world(tmp_path / "w", WorldConfig(n_train_images=8, n_test_images=1, slice_mix=(0,)))
    tokenizer = tiny_tokenizer(world_texts(world.config), 256)
    records = json.loads(world.stage1_path.read_text())
    asked = []

    def regions(record):
        asked.append(record["id"])
        return item_phrases(record["meta"])

    config = ClipPretrainConfig(epochs=3, batch_size=4, vision_width=16, text_width=16, projection_dim=16,
                                learning_rate=3e-3)
    summary = pretrain_clip(records, world.image_folder, tokenizer, tmp_path / "clip", config,
                            progress=lambda line: None, foil=foil_caption, regions=regions)
    assert sorted(asked) == sorted(r["id"] for r in records)          # each record's regions, once
    assert 0 <= summary["final_region_accuracy"] <= 1
    log = [json.loads(line) for line in (tmp_path / "clip" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(entry["region_loss"] > 0 for entry in log)
    assert log[-1]["region_loss"] < log[0]["region_loss"]
    # without regions, or with weight 0, there is no region loss
    plain = pretrain_clip(records, world.image_folder, tokenizer, tmp_path / "plain",
                          dataclasses.replace(config, region_weight=0.0), progress=lambda line: None, regions=regions)
    assert plain["final_region_accuracy"] is None
    broken = [dict(records[0], meta={"objects": []})] + records[1:]
    with pytest.raises(ValueError, match="meta.size"):
        pretrain_clip(broken, world.image_folder, tokenizer, tmp_path / "broken", config,
                      progress=lambda line: None, regions=regions)
    for bad in (dict(region_weight=-1.0), dict(region_layer=0), dict(region_layer=9)):
        with pytest.raises(ValueError, match="region"):
            ClipPretrainConfig(**bad)
