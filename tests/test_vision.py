"""Tests for meteor.model.vision on tiny random configs of the real transformers CLIP classes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from meteor.model.vision import VisionOutput, VisionTower, cls_attention_row

PATCH = 14
NATIVE = 56  # a 4×4 native grid


def tiny_vision_config(num_layers: int = 3) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        patch_size=PATCH,
        image_size=NATIVE,
    )


def tiny_clip_config() -> CLIPConfig:
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPConfig(vision_config=tiny_vision_config().to_dict(), text_config=text, projection_dim=16)


@pytest.fixture(scope="module")
def eager_model() -> CLIPVisionModel:
    torch.manual_seed(0)
    model = CLIPVisionModel(tiny_vision_config())
    model.set_attn_implementation("eager")
    return model.eval()


def reference(model: CLIPVisionModel, pixel_values: torch.Tensor, layer: int):
    """transformers' own hidden_states[layer] patches and head-averaged, renormalised CLS row."""
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True, output_attentions=True, interpolate_pos_encoding=True)
    attention = out.attentions[layer - 1 if layer > 0 else layer]  # (n, heads, 1+L, 1+L)
    row = attention.mean(dim=1)[:, 0, 1:]
    return out.hidden_states[layer][:, 1:], row / row.sum(-1, keepdim=True)


SIZES = [(NATIVE, NATIVE), (42, 70), (84, 28), (28, 28), (98, 112)]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_transformers_at_every_size(eager_model, attn_implementation, size):
    tower = VisionTower.from_model(CLIPVisionModel(tiny_vision_config()), attn_implementation=attn_implementation)
    tower.clip.load_state_dict(eager_model.state_dict())
    pixels = torch.randn(2, 3, *size)

    out = tower(pixels)

    rows, cols = size[0] // PATCH, size[1] // PATCH
    assert isinstance(out, VisionOutput) and out.grid == (rows, cols)
    assert out.patch_tokens.shape == (2, rows * cols, 32)
    assert out.cls_attention.shape == (2, rows * cols) and out.cls_attention.dtype == torch.float32
    tokens, row = reference(eager_model, pixels, -2)
    torch.testing.assert_close(out.patch_tokens, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls_attention, row, rtol=1e-5, atol=1e-6)


def test_native_size_needs_no_interpolation(eager_model):
    tower = VisionTower.from_model(eager_model)
    pixels = torch.randn(1, 3, NATIVE, NATIVE)
    with torch.no_grad():
        plain = eager_model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(tower(pixels).patch_tokens, plain, rtol=0, atol=0)


def test_scores_are_a_distribution_over_patches(eager_model):
    out = VisionTower.from_model(eager_model)(torch.randn(3, 3, 42, 70))
    assert (out.cls_attention >= 0).all()
    torch.testing.assert_close(out.cls_attention.sum(-1), torch.ones(3))


@pytest.mark.parametrize(("feature_layer", "attention_layer"), [(-1, None), (1, None), (2, -1), (-2, 1)])
def test_layer_mapping_follows_hidden_states_numbering(eager_model, feature_layer, attention_layer):
    tower = VisionTower.from_model(eager_model, feature_layer=feature_layer, attention_layer=attention_layer)
    pixels = torch.randn(2, 3, 42, 56)
    out = tower(pixels)
    tokens, _ = reference(eager_model, pixels, feature_layer)
    _, row = reference(eager_model, pixels, feature_layer if attention_layer is None else attention_layer)
    torch.testing.assert_close(out.patch_tokens, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls_attention, row, rtol=1e-5, atol=1e-6)


def test_layers_past_the_needed_one_never_run(eager_model):
    tower = VisionTower.from_model(eager_model)  # feature and attention at -2 of 3 layers
    calls = []
    handles = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in tower.clip.encoder.layers]
    try:
        tower(torch.randn(1, 3, 28, 28))
    finally:
        for handle in handles:
            handle.remove()
    assert tower.num_layers_run == 2 and len(calls) == 2


def test_cls_attention_row_renormalises_without_cls():
    torch.manual_seed(1)
    n, tokens, heads, width = 2, 5, 2, 8
    query, keys = torch.randn(n, width), torch.randn(n, tokens, width)
    scores = cls_attention_row(query, keys, heads, 0.5)
    q = query.view(n, heads, 1, 4)
    k = keys.view(n, tokens, heads, 4).transpose(1, 2)
    full = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1).mean(1)[:, 0]  # (n, 1+L)
    torch.testing.assert_close(scores, full[:, 1:] / (1 - full[:, :1]))


def test_frozen_and_always_eval(eager_model):
    tower = VisionTower.from_model(eager_model)
    parent = nn.ModuleDict({"vision_tower": tower, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not tower.training and not any(m.training for m in tower.modules())
    assert not any(p.requires_grad for p in tower.parameters())
    out = tower(torch.randn(1, 3, 28, 42))
    assert not out.patch_tokens.requires_grad and out.patch_tokens.grad_fn is None


def test_encode_views_keeps_input_order(eager_model):
    tower = VisionTower.from_model(eager_model)
    torch.manual_seed(2)
    views = [torch.randn(3, *size) for size in [(42, 70), (56, 56), (42, 70), (28, 84), (56, 56)]]
    outputs = tower.encode_views(views)
    assert len(outputs) == len(views)
    for view, out in zip(views, outputs):
        alone = tower(view.unsqueeze(0))
        assert out.grid == alone.grid
        torch.testing.assert_close(out.patch_tokens, alone.patch_tokens, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.cls_attention, alone.cls_attention, rtol=1e-5, atol=1e-6)


def test_bfloat16_tower_matches_the_float32_one_to_bfloat16_precision(eager_model):
    torch.manual_seed(0)
    tower = VisionTower.from_config(tiny_vision_config(), dtype="bf16")
    tower.clip.load_state_dict(eager_model.state_dict())        # the same weights, rounded to bf16
    assert all(p.dtype == torch.bfloat16 for p in tower.parameters())
    pixels = torch.randn(2, 3, 42, 70)
    out = tower(pixels)
    assert out.patch_tokens.dtype == torch.bfloat16 and out.cls_attention.dtype == torch.float32
    torch.testing.assert_close(out.cls_attention.sum(-1), torch.ones(2))
    tokens, row = reference(eager_model, pixels, -2)
    scale = float(tokens.abs().max())
    torch.testing.assert_close(out.patch_tokens.float(), tokens, rtol=0, atol=0.03 * scale)  # measured: ~1%
    torch.testing.assert_close(out.cls_attention, row, rtol=0, atol=0.02 * float(row.max()))


def test_from_config_exposes_geometry():
    config = tiny_vision_config()
    tower = VisionTower.from_config(config, attn_implementation="eager")
    assert (tower.hidden_size, tower.patch_size, tower.image_size) == (32, PATCH, NATIVE)
    assert tower.config.num_hidden_layers == 3 and tower.config._attn_implementation == "eager"
    assert config._attn_implementation != "eager"  # the caller's config is copied, not changed
    assert tower.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert tower.image_std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert tower.feature_layer == tower.attention_layer == 2


def test_from_pretrained_vision_folder(tmp_path, eager_model):
    eager_model.save_pretrained(tmp_path)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    tower = VisionTower.from_pretrained(tmp_path)
    assert tower.config._attn_implementation == "sdpa"
    assert tower.image_mean == tuple(mean) and tower.image_std == tuple(std)
    pixels = torch.randn(1, 3, 42, 70)
    tokens, row = reference(eager_model, pixels, -2)
    out = tower(pixels)
    torch.testing.assert_close(out.patch_tokens, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls_attention, row, rtol=1e-5, atol=1e-6)


def test_from_pretrained_full_clip_folder(tmp_path):
    torch.manual_seed(3)
    clip = CLIPModel(tiny_clip_config()).eval()
    clip.save_pretrained(tmp_path)
    tower = VisionTower.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")
    assert tower.dtype == torch.bfloat16 and tower.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    expected = clip.vision_model.state_dict()
    for name, tensor in tower.clip.state_dict().items():
        torch.testing.assert_close(tensor, expected[name].to(tensor.dtype), rtol=0, atol=0)


def test_from_model_takes_the_vision_half_of_a_clip_model():
    clip = CLIPModel(tiny_clip_config())
    assert VisionTower.from_model(clip).clip is clip.vision_model


def test_bad_folders_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VisionTower.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="config.json"):
        VisionTower.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"'llama'.*CLIP"):
        VisionTower.from_pretrained(tmp_path)


def test_bad_layer_indices():
    config = tiny_vision_config()
    for bad in (0, 4, -4):
        with pytest.raises(ValueError, match="out of range"):
            VisionTower.from_config(config, feature_layer=bad)
    with pytest.raises(ValueError, match="attention_layer"):
        VisionTower.from_config(config, attention_layer=7)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 56, 56), r"\(n, 3, h, w\).*unsqueeze"),
        ((1, 1, 56, 56), "1 channels.*RGB"),
        ((1, 2, 56, 56), "2 channels"),
        ((1, 3, 50, 56), r"height 50 not a multiple of the patch size 14.*meteor\.processing\.slicing"),
        ((1, 3, 56, 60), "width 60"),
        ((1, 3, 0, 56), "at least one patch"),
    ],
)
def test_bad_inputs_raise_clear_errors(eager_model, shape, message):
    tower = VisionTower.from_model(eager_model)
    with pytest.raises(ValueError, match=message):
        tower(torch.randn(shape))


def test_integer_pixels_are_rejected(eager_model):
    with pytest.raises(ValueError, match="normalised"):
        VisionTower.from_model(eager_model)(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(3, h, w\)"):
        VisionTower.from_model(eager_model).encode_views([torch.randn(1, 3, 28, 28)])


def test_checkpoint_missing_vision_weights_is_an_error(tmp_path, eager_model):
    eager_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["encoder.layers.1.self_attn.q_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 vision weights.*q_proj"):
        VisionTower.from_pretrained(tmp_path)
