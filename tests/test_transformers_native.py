"""LLaVA-Meteor as a transformers model, used the way transformers users use one.

Everything here goes through transformers' own entry points (``AutoModelForImageTextToText``,
``AutoProcessor``, ``pipeline``, ``device_map``, ``dtype``, ``attn_implementation``) on tiny configs
of the real classes, as a user with a llava-hf-style folder would. ``tests/fixtures/legacy`` is a
folder in the format before 0.2, written by the class before this one (commit 4e5c9b3), with what
that class computed on it (its logits and greedy tokens for two prompts): what users of 0.1 have.
"""

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import meteor  # noqa: F401  (registers LLaVA-Meteor with the Auto classes)
from meteor.pretrained import load_pretrained, save_pretrained
from meteor.testing import tiny_meteor_config, tiny_model

LEGACY = Path(__file__).parent / "fixtures" / "legacy"


@pytest.fixture(scope="module")
def legacy_expected():
    return json.loads((LEGACY / "expected.json").read_text()), load_file(str(LEGACY / "expected.safetensors"))


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory):
    """The legacy folder rewritten by ``meteor convert --upgrade``."""
    from meteor.cli import main

    out = tmp_path_factory.mktemp("upgraded") / "tiny"
    assert main(["convert", "--upgrade", str(LEGACY / "tiny-0.1"), "--out", str(out)]) == 0
    return out


def _prompts(processor, expected):
    return processor.prompts(expected["questions"], [LEGACY / expected["image"], None])


def _greedy(model, inputs, tokens=8):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def test_a_folder_of_the_format_before_gives_the_old_class_logits_and_tokens(legacy_expected, caplog):
    expected, tensors = legacy_expected
    with caplog.at_level(logging.WARNING, logger="meteor.pretrained"):
        model, processor = load_pretrained(LEGACY / "tiny-0.1")
    assert "format before 0.2" in caplog.text and "meteor convert --upgrade" in caplog.text
    batch = _prompts(processor, expected)
    assert torch.equal(batch.input_ids, tensors["input_ids"])
    with torch.no_grad():
        logits = model(**batch.to_model_kwargs()).logits
    torch.testing.assert_close(logits, tensors["logits"], rtol=0, atol=1e-5)
    assert _greedy(model, batch.to_model_kwargs()).tolist() == expected["greedy_new_tokens"]


def test_the_upgraded_folder_is_llava_hf_shaped_and_auto_classes_load_it(upgraded, legacy_expected):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    expected, tensors = legacy_expected
    config = json.loads((upgraded / "config.json").read_text())
    assert config["model_type"] == "llava_meteor" and config["architectures"] == ["LlavaMeteorForConditionalGeneration"]
    assert config["vision_config"]["model_type"] == "clip_vision_model" and config["text_config"]["model_type"] == "llama"
    with safe_open(str(upgraded / "model.safetensors"), "pt") as weights:
        prefixes = {name.split(".")[0] if name.startswith("lm_head") else ".".join(name.split(".")[:2])
                    for name in weights.keys()}
    assert prefixes == {"model.vision_tower", "model.multi_modal_projector", "model.language_model", "lm_head"}
    assert {"tokenizer.json", "preprocessor_config.json", "processor_config.json", "chat_template.jinja",
            "generation_config.json"} <= {f.name for f in upgraded.iterdir()}
    model = AutoModelForImageTextToText.from_pretrained(upgraded)
    processor = AutoProcessor.from_pretrained(upgraded)
    assert type(model).__name__ == "LlavaMeteorForConditionalGeneration"
    assert type(processor).__name__ == "LlavaMeteorProcessor"
    inputs = _prompts(processor, expected).to_model_kwargs()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, tensors["logits"], rtol=0, atol=1e-5)
    assert _greedy(model, inputs).tolist() == expected["greedy_new_tokens"]


def test_save_then_from_pretrained_is_bit_exact(upgraded, tmp_path):
    from transformers import AutoModelForImageTextToText

    model, processor = load_pretrained(upgraded)
    again = save_pretrained(tmp_path / "again", model, processor)
    reloaded = AutoModelForImageTextToText.from_pretrained(again)
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert load_file(str(again / "model.safetensors")).keys() == load_file(str(upgraded / "model.safetensors")).keys()


def test_the_pipeline_answers_a_chat_with_an_image(upgraded):
    from transformers import AutoProcessor, pipeline

    chat = [{"role": "user", "content": [{"type": "image", "path": str(LEGACY / "noise.png")},
                                         {"type": "text", "text": "What is in the image?"}]}]
    pipe = pipeline("image-text-to-text", model=str(upgraded))
    answer = pipe(text=chat, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    processor = AutoProcessor.from_pretrained(upgraded)
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    # the chat renders as the model's own prompt for that question (the template it trained with)
    assert torch.equal(inputs["input_ids"][0], processor.prompts(["What is in the image?"],
                                                                  [LEGACY / "noise.png"]).input_ids[0])
    new = _greedy(pipe.model, dict(inputs), 6)[0]
    assert answer == processor.decode(new, skip_special_tokens=True) and answer.strip()


def test_processor_outputs_go_into_generate_left_padded_with_mixed_slice_counts():
    """One prompt of a 1-view image, one of a 6-slice image, one text only: the batch answers as each
    prompt does alone."""
    model, processor = tiny_model(tiny_meteor_config(), seed=3)
    tag = processor.config.image_token
    small, large = Image.new("RGB", (56, 56), (200, 30, 30)), Image.new("RGB", (168, 112), (30, 200, 30))
    texts = [f"{tag}\nWhat colour?", f"{tag}\nHow many?", "Say something."]
    images = [[small], [large], []]
    batch = processor(images=images, text=texts, return_tensors="pt")
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"].all()        # left-padded
    assert batch["view_grids"].shape[0] == 1 + 7 and batch["image_grids"].tolist() == [[0, 0], [2, 3]]
    together = _greedy(model, dict(batch), 5)
    for row, (text, own) in enumerate(zip(texts, images)):
        alone = _greedy(model, dict(processor(images=own or None, text=[text])), 5)
        assert together[row].tolist() == alone[0].tolist()


def test_dtype_device_map_offload_and_sdpa_as_transformers_users_pass_them(upgraded, tmp_path, legacy_expected):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    expected, tensors = legacy_expected
    processor = AutoProcessor.from_pretrained(upgraded)
    inputs = _prompts(processor, expected).to_model_kwargs()
    bf16 = AutoModelForImageTextToText.from_pretrained(upgraded, dtype=torch.bfloat16)
    # transformers keeps Mamba's A_log in float32 (as mamba does): every other weight is bf16
    assert {n.rsplit(".", 1)[-1] for n, p in bf16.named_parameters() if p.dtype != torch.bfloat16} == {"A_log"}
    with torch.no_grad():
        assert torch.isfinite(bf16(**inputs).logits.float()).all()
    on_cpu = AutoModelForImageTextToText.from_pretrained(upgraded, device_map="cpu")
    assert {p.device.type for p in on_cpu.parameters()} == {"cpu"}
    # accelerate's split across the CPU and disk: the decoder's weights offloaded, brought in per call
    split = AutoModelForImageTextToText.from_pretrained(
        upgraded, device_map={"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                              "model.language_model": "disk", "lm_head": "cpu"},
        offload_folder=str(tmp_path / "offload"))
    assert split.hf_device_map["model.language_model"] == "disk"
    assert {p.device.type for p in split.model.language_model.parameters()} == {"meta"}    # loaded per call
    sdpa = AutoModelForImageTextToText.from_pretrained(upgraded, attn_implementation="sdpa")
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    for model in (on_cpu, split, sdpa):
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, tensors["logits"], rtol=1e-4, atol=1e-4)
        assert _greedy(model, inputs).tolist() == expected["greedy_new_tokens"]


def test_bad_folders_are_refused_naming_the_file_and_the_fix(upgraded, tmp_path):
    import shutil

    from transformers import AutoModelForImageTextToText

    from meteor.model.configuration import ConfigError
    from meteor.model.modeling import LlavaMeteorForConditionalGeneration

    no_weights = tmp_path / "no-weights"
    shutil.copytree(upgraded, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights .*model.safetensors"):
        LlavaMeteorForConditionalGeneration.from_pretrained(no_weights)
    other_type = tmp_path / "llava"
    shutil.copytree(upgraded, other_type)
    config = json.loads((other_type / "config.json").read_text())
    (other_type / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(ConfigError, match="config.json describes a 'llava' model.*meteor convert --from-llava"):
        LlavaMeteorForConditionalGeneration.from_pretrained(other_type)
    with pytest.raises(FileNotFoundError, match="format before 0.2.*meteor convert --upgrade"):
        AutoModelForImageTextToText.from_pretrained(LEGACY / "tiny-0.1")
    no_image_token = tmp_path / "no-image-token"
    shutil.copytree(upgraded, no_image_token)
    tokenizer = json.loads((no_image_token / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<image>"]
    tokenizer["model"]["vocab"].pop("<image>", None)
    (no_image_token / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ConfigError, match="tokenizer.*<image>.*image_token_id"):
        load_pretrained(no_image_token)
