"""The demo's text-pretrained tiny LLaMA: its corpus, its training loop, the shipped asset."""

import dataclasses
import json
import re
from collections import Counter
from dataclasses import asdict

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from meteor.model.configuration import ConfigError
from meteor.demo import full_config
from meteor.demo.language import (FIRST_INDEX, LanguagePretraining, describe_scene, focus_conversations,
                                  pretrain_language_model, text_conversations)
from meteor.demo.pipeline import ASSETS, Pipeline, _text_processor
from meteor.testing import tiny_llama_config, tiny_tokenizer
from meteor.demo.world import WorldConfig, world_texts
from meteor.demo.world.scene import make_scene


def test_a_scene_written_as_text_names_every_shape_and_text_with_its_place():
    scene = make_scene(WorldConfig(), "train", 3)
    text = describe_scene(scene)
    assert text.startswith("Scene: ") and text.endswith(".")
    parts = text[len("Scene: "):-1].split("; ")
    assert len(parts) == len(scene.objects) + len(scene.texts)
    for obj in scene.objects:
        assert any(p.startswith(f"{obj.size} {obj.colour} {obj.shape} ") for p in parts)
    for item in scene.texts:
        assert any(p.startswith(f'{item.kind} "{item.text}" ') for p in parts)
    region = re.compile(r" (near the (top|bottom)( left| right)?|on the (left|right)|in the centre)$")
    assert all(region.search(p) for p in parts)


def test_text_conversations_come_from_undrawn_scenes_and_answer_from_the_text():
    recipe = LanguagePretraining(scenes=12)
    conversations = text_conversations(recipe.world(), recipe)
    assert len(conversations) == 12
    for index, conversation in enumerate(conversations):
        scene_text = conversation[0]["value"].split("\n")[0]
        assert scene_text == describe_scene(make_scene(dataclasses.replace(recipe.world(), min_objects=1),
                                                       "train", FIRST_INDEX + index))
        assert [t["from"] for t in conversation] == ["human", "gpt"] * (len(conversation) // 2)
        assert sum(t["value"].startswith(("A ", "An ", "Nothing", "Two", "Three")) for t in conversation[1::2]) >= 1
        assert len(conversation) // 2 == recipe.questions_per_scene + 1      # the questions and a caption
        for question, answer in zip(conversation[0::2], conversation[1::2]):
            if question["value"].startswith(("What colour is the", "What is the colour of the")) \
                    and "\nA. " not in question["value"]:          # not the lettered choice questions
                assert answer["value"] in scene_text          # the colour is written in the scene


def test_the_second_phase_asks_one_balanced_question_per_scene_after_the_first_phases_scenes():
    recipe = LanguagePretraining(scenes=12, focus_scenes=700)
    conversations = focus_conversations(recipe.world(), recipe)
    assert len(conversations) == 700
    world = dataclasses.replace(recipe.world(), min_objects=1)
    kinds = Counter()
    for index, conversation in enumerate(conversations):
        assert [t["from"] for t in conversation] == ["human", "gpt"]        # one question, one answer
        scene_text, question = conversation[0]["value"].split("\n", 1)
        assert scene_text == describe_scene(make_scene(world, "train", FIRST_INDEX + 12 + index))
        answer = conversation[1]["value"]
        kinds["caption" if answer.endswith(".") and len(answer) > 30 else
              "exist" if answer in ("yes", "no") else "other"] += 1
    assert 60 <= kinds["caption"] <= 140                # about one in seven
    assert 70 <= kinds["exist"] <= 110                  # the types are balanced: about 600 / 6
    exist = [c[1]["value"] for c in conversations if c[1]["value"] in ("yes", "no")]
    assert abs(exist.count("yes") - exist.count("no")) <= 1


FIRST_PHASE = r"needs scenes, steps and batch_size ≥ 1, got "
SECOND_PHASE = r"second phase needs focus_scenes and focus_steps both 0 \(no second phase\) or both ≥ 1.*got "
THIRD_PHASE = r"third phase needs refine_steps ≥ 0 \(0: none\), a second phase to continue.*got "


@pytest.mark.parametrize("fields, words", [
    (dict(scenes=0), FIRST_PHASE + "0, "), (dict(steps=0), FIRST_PHASE + r"\d+, 0, "),
    (dict(focus_scenes=10), SECOND_PHASE + "10, 0, "),
    (dict(focus_steps=10, focus_scenes=0), SECOND_PHASE + "0, 10, "),
    (dict(focus_scenes=-1, focus_steps=-1), SECOND_PHASE + "-1, -1, "),
    (dict(refine_steps=5), THIRD_PHASE + "refine_steps=5, focus_steps=0,"),
    (dict(refine_steps=-1), THIRD_PHASE + "refine_steps=-1,"),
    (dict(focus_scenes=10, focus_steps=10, refine_steps=5, refine_learning_rate=0),
     THIRD_PHASE + "refine_steps=5, focus_steps=10, refine_learning_rate=0$"),
])
def test_impossible_recipes_are_refused_with_the_fix(fields, words):
    """Each refusal names the phase, the rule that fixes it, and the values given."""
    base = dict(focus_scenes=0, focus_steps=0, refine_steps=0)
    with pytest.raises(ConfigError, match="LanguagePretraining('s)? " + words):
        LanguagePretraining(**{**base, **fields})


def test_pretraining_lowers_the_loss():
    tokenizer = tiny_tokenizer(world_texts(WorldConfig(n_train_images=40, n_test_images=4)), 512)
    processor = _text_processor(tokenizer)
    recipe = LanguagePretraining(scenes=40, steps=40, batch_size=8)
    samples = [processor.encode(c, [], "vicuna_v1") for c in text_conversations(recipe.world(), recipe)]
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    lines = []
    summary = pretrain_language_model(model, samples, tokenizer.pad_token_id, recipe, lines.append)
    first = [float(line.rsplit(" ", 1)[1]) for line in lines]
    assert summary["steps"] == 40 and len(lines) == 10
    assert first[-1] < 0.8 * first[0]
    with pytest.raises(ValueError, match="phase 3"):     # a recipe without a third phase
        pretrain_language_model(model, samples, tokenizer.pad_token_id, dataclasses.replace(recipe, refine_steps=0),
                                lines.append, phase=3)


def test_the_shipped_model_fits_the_full_demo_and_its_tokenizer_is_the_recipes():
    config = full_config()
    recipe = config.language_pretraining
    key = json.loads((ASSETS["language_model"] / "key.json").read_text())
    assert key == {"text_world": recipe.world().to_dict(), "vocab": config.vocab_size, "llama": config.llama,
                   "pretraining": asdict(recipe)}
    tokenizer = AutoTokenizer.from_pretrained(ASSETS["language_model"])
    model = LlamaForCausalLM.from_pretrained(ASSETS["language_model"])
    assert model.config.hidden_size == config.llama["hidden_size"]
    assert model.get_input_embeddings().num_embeddings == len(_text_processor(tokenizer).tokenizer)
    rebuilt = tiny_tokenizer(world_texts(recipe.world()), config.vocab_size)
    assert rebuilt.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


@pytest.mark.parametrize("pretrain", [False, True])
def test_the_pipeline_uses_the_shipped_model_unless_told_to_pretrain(tmp_path, pretrain):
    config = full_config()
    if pretrain:   # a tiny recipe, so the test pretrains in seconds (its key no longer fits the asset)
        config = dataclasses.replace(config, language_pretraining=LanguagePretraining(
                                         scenes=20, steps=4, focus_scenes=20, focus_steps=3, refine_steps=2),
                                     llama=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=1))
    lines = []
    pipe = Pipeline(tmp_path, config, force=False, log=lines.append, rebuild=("language_model",) if pretrain else ())
    folder = pipe.base_language_model(world=None)
    shipped = (folder / "model.safetensors").read_bytes() == (ASSETS["language_model"] / "model.safetensors").read_bytes()
    assert shipped != pretrain
    assert any("shipped" in line for line in lines) != pretrain
    assert any("second phase in" in line for line in lines) == pretrain
    assert any("third phase in" in line for line in lines) == pretrain
    assert json.loads((folder / "key.json").read_text())["pretraining"] == asdict(config.language_pretraining)
    assert LlamaForCausalLM.from_pretrained(folder).config.hidden_size == config.llama["hidden_size"]
