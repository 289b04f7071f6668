"""Tests for meteor.adapters.llava: LLaVA checkpoints in, Meteor models out, and back to transformers.

The llava-hf folders are written by transformers itself (``LlavaForConditionalGeneration(config)
.save_pretrained``) on tiny CLIP / SigLIP and LLaMA configs; the original LLaVA-1.5 folders are
made by hand in haotian-liu/LLaVA's layout (a LLaMA config.json with the mm_* fields,
``model.mm_projector.0`` / ``.2``, ``model.layers.*``, ``lm_head.weight``, a sentencepiece
LlamaTokenizer without an image token, the CLIP tower in a separate folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor,
                          CLIPVisionModel, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration,
                          SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel)

from meteor.cli import compressor_overrides, main
from meteor.model.configuration import CompressorConfig, ConfigError, MeteorConfig
from meteor.testing import tiny_clip_vision_config, tiny_llama_config, tiny_tokenizer
from meteor.adapters.llava import (CheckpointWeights, PickleCheckpointError, UnsupportedCheckpoint, export_components,
                            inspect_llava)
from meteor.processing.slicing import SlicedImage, plan_slices
from meteor.pretrained import save_pretrained
from meteor.pretrained import load_pretrained
from meteor.adapters.llava import from_llava

SIDE = 56          # the tiny towers' native size: a 4×4 grid of 14-px patches
PATCHES = 16


def tiny_siglip_config(**overrides) -> SiglipVisionConfig:
    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=SIDE, patch_size=14, vision_use_head=True)
    values.update(overrides)
    return SiglipVisionConfig(**values)


def llava_hf_folder(folder: Path, tower: str = "clip", seed: int = 0, **config_overrides):
    """A tiny llava-hf checkpoint saved by transformers, with its tokenizer and image processor."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    vision = tiny_clip_vision_config() if tower == "clip" else tiny_siglip_config()
    options = dict(image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    if tower == "siglip":            # LLaVA-OneVision's choice: every token of the last layer
        options.update(vision_feature_select_strategy="full", vision_feature_layer=-1)
    options.update(config_overrides)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=tiny_llama_config(len(tokenizer)).to_dict(),
                         **options)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if tower == "clip":
        CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}).save_pretrained(folder)
    else:
        SiglipImageProcessor(size={"height": SIDE, "width": SIDE}).save_pretrained(folder)
    return model, tokenizer


def random_image(seed: int = 0, size=(SIDE, SIDE)) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def prompt_ids(tokenizer, image_id: int, question: str = "What colour is the square?") -> torch.Tensor:
    """A LLaVA-1.5 prompt with the image expanded to one id per patch, as LlavaProcessor does."""
    before = tokenizer("USER: ", add_special_tokens=False)["input_ids"]
    after = tokenizer(f"\n{question} ASSISTANT:", add_special_tokens=False)["input_ids"]
    return torch.tensor([[tokenizer.bos_token_id] + before + [image_id] * PATCHES + after])


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava-hf-clip")
    model, tokenizer = llava_hf_folder(folder)
    return folder, model, tokenizer


# --- llava-hf ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_llava_hf_conversion_equals_transformers_llava(tmp_path, tower):
    reference, tokenizer = llava_hf_folder(tmp_path, tower)
    model, processor = from_llava(tmp_path)
    model.eval()

    # the projector, the tower and the LLM are the checkpoint's, bit for bit
    projector = reference.model.multi_modal_projector
    for ours, theirs in ((model.compressor.mlp.fc1, projector.linear_1), (model.compressor.mlp.fc2, projector.linear_2)):
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    theirs = reference.model.vision_tower.state_dict()
    assert all(torch.equal(t, theirs[name]) for name, t in model.vision_tower.state_dict().items())
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert model.meteor_config.compressor.projector == "mlp" and model.meteor_config.compressor.tokens_per_slice is None
    assert model.meteor_config.max_slices == 1
    assert model.meteor_config.feature_layer == (-2 if tower == "clip" else -1)
    assert model.meteor_config.visual_expert == ("cls" if tower == "clip" else "attention_received")

    # one unsliced view, the same pixels as transformers' own image processor gives
    image = random_image()
    sliced = processor.prepare_image(image)
    assert sliced.plan.num_slices == 0 and tuple(sliced.global_view.shape) == (3, SIDE, SIDE)
    hf_pixels = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(sliced.global_view, hf_pixels[0], rtol=0, atol=1e-6)
    image_id = reference.config.image_token_index
    assert processor.image_token_id == image_id
    assert processor.image_layout(sliced) == [image_id] * PATCHES   # the global view's tokens only

    ids = prompt_ids(tokenizer, image_id)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=hf_pixels).logits
        got = model(input_ids=ids, **processor.image_inputs([sliced])).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["model-prefixed", "vision_model-nested"])
def test_llava_hf_weight_name_generations_convert_alike(tmp_path, hf_clip, layout):
    """transformers ≥ 4.52 in memory (model.vision_tower…, model.language_model…, lm_head) and the
    hub's older folders (vision_tower.vision_model…) name the same weights differently."""
    folder, reference, tokenizer = hf_clip
    weights = load_file(folder / "model.safetensors")
    renamed = {}
    for name, tensor in weights.items():
        if layout == "model-prefixed":
            name = ("lm_head.weight" if name == "language_model.lm_head.weight"
                    else "model.language_model." + name[len("language_model.model."):] if name.startswith("language_model.model.")
                    else "model." + name)
        elif name.startswith("vision_tower."):
            name = "vision_tower.vision_model." + name[len("vision_tower."):]
        renamed[name] = tensor
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in folder.iterdir():
        if file.name != "model.safetensors":
            (copy / file.name).write_bytes(file.read_bytes())
    save_file(renamed, copy / "model.safetensors", metadata={"format": "pt"})
    model, processor = from_llava(copy)
    sliced = processor.prepare_image(random_image(1))
    ids = prompt_ids(tokenizer, processor.image_token_id)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=sliced.global_view[None]).logits
        got = model.eval()(input_ids=ids, **processor.image_inputs([sliced])).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(projector_hidden_act="relu"), r"projector_hidden_act 'relu'.*gelu"),
    (dict(vision_feature_layer=[-2, -1]), r"vision_feature_layer \[-2, -1\].*one layer"),
    (dict(vision_feature_select_strategy="full"), r"'full' keeps CLIP's CLS token"),
])
def test_llava_hf_settings_meteor_does_not_reproduce_are_refused(tmp_path, overrides, message):
    llava_hf_folder(tmp_path, **overrides)
    with pytest.raises(UnsupportedCheckpoint, match=message):
        from_llava(tmp_path)


def test_llava_next_and_foreign_folders_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_next", "architectures": ["LlavaNextForConditionalGeneration"]}))
    with pytest.raises(UnsupportedCheckpoint, match="llava_next.*anyres"):
        inspect_llava(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedCheckpoint, match="not a LLaVA checkpoint"):
        inspect_llava(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        inspect_llava(tmp_path / "nowhere")


def test_llava_hf_folder_takes_no_separate_vision_folder(hf_clip, tmp_path):
    with pytest.raises(ValueError, match="holds its own vision tower"):
        inspect_llava(hf_clip[0], vision=tmp_path)


# --- original LLaVA-1.5 -----------------------------------------------------------------------------

SENTENCES = ["USER: What is in the image? ASSISTANT: a red circle, a blue square.",
             "What colour is the square? red green blue yellow. Describe the image.",
             "A chat between a curious user and an artificial intelligence assistant."]


def llava15_tokenizer(folder: Path):
    """A Vicuna-shaped sentencepiece LlamaTokenizer (no image token: LLaVA splices images at −200)."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_prefix=str(folder / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<unk>", "legacy": False, "model_max_length": 2048, "padding_side": "right",
        "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": False}))


def llava15_folder(root: Path, weights: str = "safetensors", seed: int = 0, **config_overrides):
    """An original LLaVA-1.5 checkpoint folder and its CLIP folder; returns (folder, vision folder,
    the reference parts: CLIP, LLaMA and LLaVA's mlp2x_gelu as nn.Sequential(Linear, GELU, Linear))."""
    torch.manual_seed(seed)
    folder, vision_folder = root / "llava-v1.5-tiny", root / "clip-vit-tiny"
    folder.mkdir()
    llava15_tokenizer(folder)
    clip = CLIPVisionModel(tiny_clip_vision_config()).eval()
    clip.save_pretrained(vision_folder)
    CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}).save_pretrained(vision_folder)
    text_config = tiny_llama_config(400)
    llama = LlamaForCausalLM(text_config).eval()
    projector = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 48))
    config = {**text_config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
              "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False, "use_mm_proj": True,
              "freeze_mm_mlp_adapter": False, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right"}
    config.pop("rope_parameters", None)
    config["rope_theta"] = 10000.0               # LLaMA's legacy field, as the original config.json has
    config.update(config_overrides)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {name: tensor.clone() for name, tensor in llama.state_dict().items()}
    state.update({f"model.mm_projector.{name}": tensor.clone() for name, tensor in projector.state_dict().items()})
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)   # old LLaMA files saved these buffers
    if weights == "safetensors":
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:                                         # two .bin shards and their index, as LLaVA's folders have
        names = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        for file, group in shards.items():
            torch.save({name: state[name] for name in group}, folder / file)
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {name: file for file, group in shards.items() for name in group}}))
    return folder, vision_folder, (clip, llama, projector)


def llava15_reference_logits(parts, pixels: torch.Tensor, ids: torch.Tensor, image_positions: torch.Tensor):
    """What LLaVA-1.5 computes: hidden_states[-2] without CLS → mm_projector → spliced into the LLM's
    input embeddings at the image positions."""
    clip, llama, projector = parts
    with torch.no_grad():
        features = clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]     # (1, L, C)
        visual = projector(features)[0]                                                 # (L, D)
        embeds = llama.get_input_embeddings()(ids.masked_fill(image_positions, 0))
        embeds[image_positions] = visual
        return llama(inputs_embeds=embeds).logits


@pytest.mark.parametrize("weights", ["safetensors", "bin-shards"])
def test_original_llava15_conversion_equals_llava(tmp_path, weights):
    folder, vision_folder, parts = llava15_folder(tmp_path, weights)
    model, processor = from_llava(folder, vision=vision_folder)
    model.eval()
    projector = parts[2]
    assert torch.equal(model.compressor.mlp.fc1.weight, projector[0].weight)
    assert torch.equal(model.compressor.mlp.fc2.bias, projector[2].bias)
    assert model.meteor_config.feature_layer == -2 and model.meteor_config.max_slices == 1
    image = random_image(2)
    sliced = processor.prepare_image(image)
    hf_pixels = AutoImageProcessor.from_pretrained(vision_folder)(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(sliced.global_view, hf_pixels[0], rtol=0, atol=1e-6)
    batch = processor.prompts("What colour is the square?", [sliced])
    ids = batch.input_ids
    image_positions = ids == processor.image_token_id
    assert int(image_positions.sum()) == PATCHES
    with torch.no_grad():
        got = model(**batch.to_model_kwargs()).logits
    expected = llava15_reference_logits(parts, hf_pixels, ids, image_positions)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_original_llava15_names_the_vision_tower_it_needs(tmp_path):
    folder, _, _ = llava15_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"openai/clip-vit-large-patch14-336.*--vision"):
        from_llava(folder)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(mm_projector_type="linear"), r"mm_projector_type 'linear'.*mlp2x_gelu"),
    (dict(mm_projector_type="mlp3x_gelu"), r"mm_projector_type 'mlp3x_gelu'"),
    (dict(mm_vision_select_feature="cls_patch"), r"mm_vision_select_feature 'cls_patch'"),
    (dict(image_aspect_ratio="anyres"), r"anyres"),
    (dict(mm_use_im_start_end=True), r"im_start"),
    (dict(architectures=["LlavaMptForCausalLM"]), r"'LlavaMptForCausalLM'"),
])
def test_original_llava15_unsupported_settings_are_refused(tmp_path, overrides, message):
    folder, vision_folder, _ = llava15_folder(tmp_path, **overrides)
    with pytest.raises(UnsupportedCheckpoint, match=message):
        from_llava(folder, vision=vision_folder)


def test_original_llava15_with_the_wrong_tower_width_is_refused(tmp_path):
    folder, vision_folder, _ = llava15_folder(tmp_path, mm_hidden_size=1024)
    with pytest.raises(ValueError, match=r"width 32.*mm_hidden_size 1024"):
        from_llava(folder, vision=vision_folder)


class _Opaque:
    """Any class outside torch's allowlist makes a file need full pickle."""


def test_a_checkpoint_that_needs_pickle_is_refused_with_how_to_convert(tmp_path):
    folder, vision_folder, _ = llava15_folder(tmp_path, weights="bin-shards")
    shard = folder / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["model.note"] = _Opaque()
    torch.save(state, shard)
    with pytest.raises(PickleCheckpointError,
                       match=r"(?s)pytorch_model-00001-of-00002\.bin can only be loaded with pickle.*"
                             r"weights_only=True.*convert it once to safetensors.*save_file"):
        from_llava(folder, vision=vision_folder)


def test_plain_tensor_bin_files_load_without_pickle(tmp_path):
    torch.save({"a": torch.arange(3), "b": torch.ones(2, 2)}, tmp_path / "pytorch_model.bin")
    weights = CheckpointWeights(tmp_path)
    assert sorted(weights.keys()) == ["a", "b"] and torch.equal(weights.get("a"), torch.arange(3))
    assert set(weights.with_prefix("b")) == {""}


def test_a_folder_without_weights_says_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
        CheckpointWeights(tmp_path)


# --- training-free compression of a converted LLaVA ---------------------------------------------------

def test_cls_topk_on_a_converted_llava_is_its_mlp_on_the_top_k_patches(hf_clip):
    """FasterVLM's setting: the converted LLaVA's own projector on the K patches the CLS token
    attends to most, nothing trained."""
    folder, reference, tokenizer = hf_clip
    config = MeteorConfig(compressor=CompressorConfig(projector="cls_topk", tokens_per_slice=5), max_slices=1)
    model, processor = from_llava(folder, config=config)
    sliced = processor.prepare_image(random_image(3))
    tokens, selections = model.encode_images(**processor.image_inputs([sliced]), return_selection=True)
    pixels = sliced.global_view[None]
    eager_tower = CLIPVisionModel(reference.config.vision_config)
    eager_tower.load_state_dict(reference.model.vision_tower.state_dict())
    eager_tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager_tower(pixels, output_hidden_states=True, output_attentions=True)
    row = out.attentions[-2].mean(1)[0, 0, 1:]                        # CLS → patches at the feature layer
    kept = torch.sort(torch.topk(row / row.sum(), 5).indices).values
    assert torch.equal(selections[0].indices, kept)
    with torch.no_grad():
        expected = reference.model.multi_modal_projector(out.hidden_states[-2][0, 1:][kept])
    torch.testing.assert_close(tokens[0], expected, rtol=1e-5, atol=1e-5)
    batch = processor.prompts("What colour is the square?", [sliced])
    assert int((batch.input_ids == processor.image_token_id).sum()) == 5
    new = model.generate(**batch.to_model_kwargs(), max_new_tokens=3, do_sample=False)[:, batch.input_ids.shape[1]:]
    assert new.shape[0] == 1 and 1 <= new.shape[1] <= 3


def test_load_time_override_compresses_a_saved_all_tokens_model(hf_clip, tmp_path):
    folder, _, _ = hf_clip
    model, processor = from_llava(folder)
    save_pretrained(tmp_path / "llava", model, processor)
    compressed, processor = load_pretrained(
        tmp_path / "llava", compressor_overrides={"projector": "cls_topk", "tokens_per_slice": 6})
    assert compressed.meteor_config.compressor.projector == "cls_topk" and compressed.meteor_config.compressor.tokens_per_slice == 6
    for name, tensor in model.compressor.state_dict().items():
        assert torch.equal(compressed.compressor.state_dict()[name], tensor)
    batch = processor.prompts("What colour is the square?", [random_image(4)])
    assert int((batch.input_ids == processor.image_token_id).sum()) == 6
    compressed.generate(**batch.to_model_kwargs(), max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match=r"no weights for the 'meteor' projector's \['fusion"):
        load_pretrained(tmp_path / "llava", compressor_overrides={"projector": "meteor", "tokens_per_slice": 4})
    with pytest.raises(ConfigError, match=r"unknown compressor option\(s\) \['k'\]"):
        load_pretrained(tmp_path / "llava", compressor_overrides={"k": 4})
    with pytest.raises(ConfigError, match="text_width"):
        load_pretrained(tmp_path / "llava", compressor_overrides={"text_width": 8})


def test_meteor_projector_starts_from_the_llava_mlp(hf_clip):
    folder, reference, _ = hf_clip
    config = MeteorConfig(compressor=CompressorConfig(tokens_per_slice=4, d_state=8))
    model, _ = from_llava(folder, config=config)
    assert model.meteor_config.compressor.projector == "meteor" and model.meteor_config.max_slices == 6
    assert torch.equal(model.compressor.mlp.fc1.weight, reference.model.multi_modal_projector.linear_1.weight)
    with pytest.raises(ValueError, match="no token-wise MLP"):
        from_llava(folder, config=MeteorConfig(compressor=CompressorConfig(
            projector="resampler", tokens_per_slice=4, resampler_heads=4)))


# --- the command line -------------------------------------------------------------------------------

def test_compressor_override_values_are_read_as_json():
    assert compressor_overrides(["projector=cls_topk", "tokens_per_slice=16", "lam=0.5", "dt_rank=null",
                                 "expert-mode=visual"]) == {
        "projector": "cls_topk", "tokens_per_slice": 16, "lam": 0.5, "dt_rank": None, "expert_mode": "visual"}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        compressor_overrides(["projector"])


def test_convert_from_llava_and_export_through_the_cli(tmp_path, capsys):
    folder, vision_folder, parts = llava15_folder(tmp_path)
    out = tmp_path / "meteor"
    assert main(["convert", "--from-llava", str(folder), "--vision", str(vision_folder), "--out", str(out),
                 "--projector", "cls_topk", "--tokens-per-slice", "4"]) == 0
    printed = capsys.readouterr()
    assert "projector cls_topk, tokens_per_slice 4, feature_layer -2, max_slices 1" in printed.out
    assert "pads a non-square image" in printed.err
    model, processor = load_pretrained(out)
    assert torch.equal(model.compressor.mlp.fc1.weight, parts[2][0].weight)
    assert (out / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    assert main(["convert", "--from-llava", str(folder), "--out", str(tmp_path / "bad")]) == 2
    assert "openai/clip-vit-large-patch14-336" in capsys.readouterr().err

    exported = tmp_path / "exported"
    assert main(["convert", "--export", str(out), "--out", str(exported)]) == 0
    language = AutoModelForCausalLM.from_pretrained(exported / "language_model")
    tokenizer = AutoTokenizer.from_pretrained(exported / "language_model")
    ids = tokenizer("What colour is the square?", return_tensors="pt")["input_ids"]
    assert ids.tolist() == processor.tokenizer("What colour is the square?", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(language(ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_export_components_load_in_plain_transformers(tmp_path):
    reference_folder = tmp_path / "llava-hf"
    reference_folder.mkdir()
    llava_hf_folder(reference_folder, "siglip")
    model, processor = from_llava(reference_folder)
    out = export_components(model, processor, tmp_path / "out")
    vision = SiglipVisionModel.from_pretrained(out / "vision_tower").eval()
    image_processor = AutoImageProcessor.from_pretrained(out / "vision_tower")
    image = random_image(5)
    pixels = image_processor(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels[0], processor.prepare_image(image).global_view, rtol=0, atol=1e-6)
    with torch.no_grad():
        theirs = vision(pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(model.model.tower(pixels).patch_tokens, theirs, rtol=1e-5, atol=1e-5)
    assert load_file(out / "compressor.safetensors").keys() == model.compressor.state_dict().keys()
    assert MeteorConfig.load(out).visual_expert == "attention_received"
    with pytest.raises(FileExistsError, match="overwrite"):
        export_components(model, processor, out)


def test_an_unsliced_image_is_laid_out_as_its_global_view_only():
    """The equalities above rest on this: an image of the tower's size is one view, no slices."""
    plan = plan_slices(SIDE, SIDE, max_slices=6, patch_size=14, base_size=SIDE)
    assert plan.num_slices == 0 and plan.global_size == (SIDE, SIDE)
    sliced = SlicedImage(torch.empty(0, 3, 0, 0), torch.zeros(3, SIDE, SIDE), plan)
    assert len(sliced.views()) == 1
