"""DINOv2 towers (``Dinov2Model`` and ``Dinov2WithRegistersModel``) on tiny configs of the real
transformers classes: the patch tokens and both visual experts held equal to transformers' own eager
forward (``output_hidden_states`` / ``output_attentions``), the position table's interpolation to
non-square grids checked against a bicubic resize written out here, folders, and a DINOv2-towered
LLaVA-Meteor saved and loaded through ``AutoModelForImageTextToText``, trained and generating.
The real DINOv2 ViT-S/14 is checked in tests/test_real_parts.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import (AutoImageProcessor, AutoModelForImageTextToText, Dinov2Config, Dinov2Model,
                          Dinov2WithRegistersConfig, Dinov2WithRegistersModel, LlamaForCausalLM)

from meteor.model.configuration import CompressorConfig, MeteorConfig
from meteor.model.vision import VisionTower
from meteor.pretrained import build, load_pretrained, save_pretrained
from meteor.testing import tiny_llama_config, tiny_llava_data, tiny_tokenizer
from meteor.train import TrainConfig, train

PATCH, NATIVE = 14, 56          # a 4×4 position table
SIZES = [(NATIVE, NATIVE), (42, 70), (70, 42), (84, 28), (28, 28), (98, 112)]
REGISTERS = 3


def dinov2_config(registers: int = 0, **overrides):
    values = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=NATIVE,
                  patch_size=PATCH, layerscale_value=0.5, initializer_range=0.2)
    values.update(overrides)
    if registers:
        return Dinov2WithRegistersConfig(num_register_tokens=registers, **values)
    return Dinov2Config(**values)


def eager(registers: int, seed: int = 0):
    torch.manual_seed(seed)
    kind = Dinov2WithRegistersModel if registers else Dinov2Model
    model = kind(dinov2_config(registers))
    with torch.no_grad():       # a table with structure, so that a transposed interpolation would show
        model.embeddings.position_embeddings.add_(torch.randn_like(model.embeddings.position_embeddings))
    model.set_attn_implementation("eager")
    return model.eval()


@pytest.fixture(scope="module", params=[0, REGISTERS], ids=["dinov2", "registers"])
def eager_dinov2(request):
    return eager(request.param)


def copy_of(model, attn_implementation: str):
    kind = type(model)
    twin = kind(kind.config_class.from_dict(model.config.to_dict()))
    twin.load_state_dict(model.state_dict())
    twin.set_attn_implementation(attn_implementation)
    return twin.eval()


def reference(model, pixels: torch.Tensor, feature_layer: int, attention_layer: int):
    """From transformers' own eager forward: hidden_states[feature_layer] without the CLS and register
    tokens; the CLS row of attentions at attention_layer and the attention each patch receives,
    each averaged over heads with the CLS and register columns (and rows) dropped, renormalised."""
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    weights = out.attentions[attention_layer - 1 if attention_layer > 0 else attention_layer].mean(dim=1)
    cls_row = weights[:, 0, prefix:]
    received = weights[:, prefix:, prefix:].mean(dim=1)
    return (out.hidden_states[feature_layer][:, prefix:], cls_row / cls_row.sum(-1, keepdim=True),
            received / received.sum(-1, keepdim=True))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dinov2_tokens_and_both_experts_match_transformers(eager_dinov2, attn_implementation, size):
    pixels = torch.randn(2, 3, *size)
    tokens, cls_row, received = reference(eager_dinov2, pixels, -2, -2)
    rows, cols = size[0] // PATCH, size[1] // PATCH
    for expert, expected in (("cls", cls_row), ("attention_received", received)):
        tower = VisionTower.from_model(copy_of(eager_dinov2, attn_implementation), visual_expert=expert)
        out = tower(pixels)
        assert out.grid == (rows, cols) and out.patch_tokens.shape == (2, rows * cols, 32)
        assert out.cls_attention.shape == (2, rows * cols) and out.cls_attention.dtype == torch.float32
        torch.testing.assert_close(out.patch_tokens, tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.cls_attention, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.cls_attention.sum(-1), torch.ones(2))


def test_registers_are_neither_patches_nor_scored():
    model = eager(REGISTERS)
    tower = VisionTower.from_model(model)
    assert tower.has_cls and tower.num_prefix == 1 + REGISTERS
    pixels = torch.randn(1, 3, 42, 70)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    hidden = out.hidden_states[-2]
    assert hidden.shape[1] == 1 + REGISTERS + 15
    # transformers' sequence: CLS, the registers, then the patches
    with torch.no_grad():
        embedded = model.embeddings(pixels)
    torch.testing.assert_close(embedded[:, 1:1 + REGISTERS], model.embeddings.register_tokens.expand(1, -1, -1))
    got = tower(pixels)
    torch.testing.assert_close(got.patch_tokens, hidden[:, 1 + REGISTERS:], rtol=1e-5, atol=1e-5)
    # registers draw attention, so a row that took them for the first patches would differ
    weights = out.attentions[-2].mean(1)[:, 0]
    assert float(weights[:, 1:1 + REGISTERS].sum()) > 1e-3
    misread = weights[:, 1:16] / weights[:, 1:16].sum(-1, keepdim=True)
    assert (got.cls_attention - misread).abs().max() > 1e-2


@pytest.mark.parametrize("registers", [0, REGISTERS])
@pytest.mark.parametrize("size", [(42, 70), (70, 42), (84, 28)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_position_table_is_interpolated_to_rows_by_cols(registers, size):
    """The embeddings the tower starts from: the patch projection, plus the 4×4 table resized
    bicubically (align_corners=False; antialiased for the registers' class) to (rows, cols), in
    raster order, not to (cols, rows) transposed."""
    model = eager(registers)
    pixels = torch.randn(1, 3, *size)
    rows, cols = size[0] // PATCH, size[1] // PATCH
    embeddings = model.embeddings
    table = embeddings.position_embeddings[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)

    def resized(shape):
        grid = nn.functional.interpolate(table, size=shape, mode="bicubic", align_corners=False,
                                         antialias=bool(registers))
        return grid.permute(0, 2, 3, 1).reshape(1, shape[0] * shape[1], 32)

    with torch.no_grad():
        patches = embeddings.patch_embeddings(pixels)
        got = embeddings(pixels)[:, 1 + registers:] - patches
        expected = resized((rows, cols))
        transposed = resized((cols, rows)).reshape(1, cols, rows, 32).transpose(1, 2).reshape(1, -1, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - transposed).abs().max() > 1e-2
    # and these embeddings are what the tower's features are computed from
    with torch.no_grad():
        first = model(pixel_values=pixels, output_hidden_states=True).hidden_states[1][:, 1 + registers:]
    torch.testing.assert_close(VisionTower.from_model(model, feature_layer=1)(pixels).patch_tokens, first,
                               rtol=1e-5, atol=1e-5)


def test_native_size_uses_the_table_as_is(eager_dinov2):
    registers = getattr(eager_dinov2.config, "num_register_tokens", 0)
    pixels = torch.randn(1, 3, NATIVE, NATIVE)
    with torch.no_grad():
        got = eager_dinov2.embeddings(pixels)
        patches = eager_dinov2.embeddings.patch_embeddings(pixels)
    torch.testing.assert_close(got[:, 1 + registers:] - patches, eager_dinov2.embeddings.position_embeddings[:, 1:],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize(("feature_layer", "attention_layer"), [(-1, None), (1, None), (2, -1), (-2, 1)])
def test_layer_numbering_is_hidden_states_numbering(eager_dinov2, feature_layer, attention_layer):
    pixels = torch.randn(2, 3, 42, 56)
    tower = VisionTower.from_model(eager_dinov2, feature_layer=feature_layer, attention_layer=attention_layer)
    out = tower(pixels)
    tokens, _, _ = reference(eager_dinov2, pixels, feature_layer, feature_layer)
    _, cls_row, _ = reference(eager_dinov2, pixels, feature_layer,
                              feature_layer if attention_layer is None else attention_layer)
    torch.testing.assert_close(out.patch_tokens, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls_attention, cls_row, rtol=1e-5, atol=1e-6)


def test_only_the_needed_layers_run():
    tower = VisionTower.from_model(eager(0))
    calls = []
    handles = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in tower.clip.encoder.layer]
    try:
        tower(torch.randn(1, 3, 28, 28))
    finally:
        for handle in handles:
            handle.remove()
    assert tower.num_layers_run == 2 and len(calls) == 2


def test_from_config_geometry_normalisation_and_refusals():
    for config in (dinov2_config(), dinov2_config(REGISTERS)):
        tower = VisionTower.from_config(config, attn_implementation="eager")
        assert (tower.hidden_size, tower.patch_size, tower.image_size) == (32, PATCH, NATIVE)
        assert tower.config._attn_implementation == "eager" and config._attn_implementation != "eager"
        assert tower.image_mean == pytest.approx((0.485, 0.456, 0.406))
        assert tower.image_std == pytest.approx((0.229, 0.224, 0.225))
        assert tower.has_cls and tower.is_dinov2 and tower.dtype == torch.float32
    assert VisionTower.from_config(dinov2_config(), dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"pooling_head.*none.*attention_received.*or 'cls'"):
        VisionTower.from_config(dinov2_config(), visual_expert="pooling_head")
    with pytest.raises(TypeError, match="CLIP, SigLIP or DINOv2 configuration"):
        VisionTower.from_config(tiny_llama_config(64))


@pytest.mark.parametrize("registers", [0, REGISTERS])
def test_dinov2_folders_load_and_save(tmp_path, registers):
    model = eager(registers)
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "BitImageProcessor", "image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2]}))
    tower = VisionTower.from_pretrained(tmp_path / "hf")
    assert type(tower.clip) is type(model) and tower.config._attn_implementation == "sdpa"
    assert tower.image_mean == (0.4, 0.4, 0.4) and tower.image_std == (0.2, 0.2, 0.2)
    pixels = torch.randn(1, 3, 70, 42)
    tokens, cls_row, _ = reference(model, pixels, -2, -2)
    out = tower(pixels)
    torch.testing.assert_close(out.patch_tokens, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls_attention, cls_row, rtol=1e-5, atol=1e-6)
    tower.save_pretrained(tmp_path / "tower")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "tower")      # what a transformers user loads
    assert type(processor).__name__.startswith("BitImageProcessor")
    assert processor.crop_size == {"height": NATIVE, "width": NATIVE} and list(processor.image_mean) == [0.4] * 3
    again = VisionTower.from_pretrained(tmp_path / "tower", attn_implementation="eager")
    torch.testing.assert_close(again(pixels).patch_tokens, out.patch_tokens, rtol=1e-5, atol=1e-5)
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match=r"'vit'.*CLIP, SigLIP or DINOv2"):
        VisionTower.from_pretrained(tmp_path / "vit")


def dinov2_meteor(registers: int = 0, seed: int = 0, visual_expert: str = "cls"):
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    vision = (Dinov2WithRegistersModel if registers else Dinov2Model)(dinov2_config(registers, num_hidden_layers=4))
    language_model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    config = MeteorConfig(compressor=CompressorConfig(tokens_per_slice=4, d_state=8), visual_expert=visual_expert)
    return build(vision, language_model, tokenizer, config)


@pytest.mark.parametrize("registers", [0, REGISTERS])
def test_a_dinov2_meteor_saves_and_loads_through_the_auto_class(tmp_path, registers):
    model, processor = dinov2_meteor(registers)
    folder = save_pretrained(tmp_path / "meteor", model, processor)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["vision_config"]["model_type"] == ("dinov2_with_registers" if registers else "dinov2")
    loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(loaded.model.vision_tower) is type(model.model.vision_tower)
    assert loaded.model.tower.num_prefix == 1 + registers
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 150, 3), dtype=np.uint8))
    inputs = processor(images=[image], text="<image>\nWhat is in the image?")
    assert inputs["image_grids"].tolist() != [[0, 0]]                          # sliced: several view sizes
    with torch.no_grad():
        expected = model(**inputs).logits
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_dinov2_meteor_trains_and_generates(tmp_path):
    model, processor = dinov2_meteor(REGISTERS, visual_expert="cls")
    save_pretrained(tmp_path / "base", model, processor)
    data = tiny_llava_data(tmp_path / "data", 16, seed=1)
    result = train(TrainConfig(stage=2, data=str(data), image_folder=str(tmp_path / "data"),
                               model=str(tmp_path / "base"), output_dir=str(tmp_path / "run"), global_batch_size=8,
                               per_device_batch_size=4, max_steps=3, save_every=100, learning_rate=1e-3,
                               progress="none"))
    assert result.steps_done == 3 and result.final_loss == result.final_loss
    trained, processor = load_pretrained(result.model_dir)
    before = model.compressor.state_dict()
    assert any(not torch.equal(t, before[n]) for n, t in trained.compressor.state_dict().items())
    image = tmp_path / "data" / "images" / "0004.png"
    batch = processor.prompts("What colour is the square?", [str(image)])
    sliced = batch.images[0]
    assert sliced.plan.num_slices > 1
    _, selections = trained.encode_images(**processor.image_inputs([sliced]), return_selection=True)
    assert len(selections) == sliced.plan.num_views
    for selection in selections:
        torch.testing.assert_close(selection.visual_scores.sum(), torch.tensor(1.0))
        assert selection.indices.shape == (4,)
    new = trained.generate(**batch.to_model_kwargs(), max_new_tokens=3, do_sample=False)[:, batch.input_ids.shape[1]:]
    assert new.shape[0] == 1 and 1 <= new.shape[1] <= 3


def test_build_takes_a_base_size_for_slicing(tmp_path):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    vision = Dinov2Model(dinov2_config())
    language_model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    config = MeteorConfig(compressor=CompressorConfig(tokens_per_slice=4, d_state=8))
    model, processor = build(vision, language_model, tokenizer, config, base_size=28)
    assert processor.base_size == 28 and processor.image_processor.plan(56, 56).num_slices == 4
    folder = save_pretrained(tmp_path / "m", model, processor)
    _, again = load_pretrained(folder)
    assert again.base_size == 28
    for bad in (30, 0, 7):
        with pytest.raises(ValueError, match="multiple of the tower's 14-pixel patch"):
            build(vision, language_model, tokenizer, config, base_size=bad)
