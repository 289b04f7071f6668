"""SigLIP towers and the CLS-free visual experts, on tiny configs of the real transformers classes.

Each visual expert is held equal to a reference computed from transformers' own eager attention
weights (``output_attentions=True``) or, for the pooling head, from ``nn.MultiheadAttention``'s own
``need_weights=True`` output; then a SigLIP-towered LLaVA-Meteor trains through the real trainer
and generates.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionModel, LlamaForCausalLM, SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from meteor.model.configuration import CompressorConfig, ConfigError, MeteorConfig
from meteor.testing import tiny_clip_vision_config, tiny_llama_config, tiny_llava_data, tiny_tokenizer
from meteor.train import TrainConfig, train
from meteor.model.vision import VisionTower
from meteor.model.visual_expert import attention_received
from meteor.pretrained import save_pretrained
from meteor.pretrained import load_pretrained
from meteor.pretrained import build

PATCH, NATIVE = 14, 56
SIZES = [(NATIVE, NATIVE), (42, 70), (84, 28), (28, 28), (98, 112)]


def siglip_config(**overrides) -> SiglipVisionConfig:
    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=NATIVE, patch_size=PATCH, vision_use_head=True)
    values.update(overrides)
    return SiglipVisionConfig(**values)


@pytest.fixture(scope="module")
def eager_siglip() -> SiglipVisionModel:
    torch.manual_seed(0)
    model = SiglipVisionModel(siglip_config())
    model.set_attn_implementation("eager")
    return model.eval()


def reference(model, pixels: torch.Tensor, feature_layer: int, attention_layer: int, prefix: int):
    """transformers' hidden_states[feature_layer] patches and the attention received at
    attention_layer from its eager weights: mean over heads and patch queries, prefix rows and
    columns dropped, renormalised."""
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True, output_attentions=True, interpolate_pos_encoding=True)
    weights = out.attentions[attention_layer - 1 if attention_layer > 0 else attention_layer]  # (n, h, T, T)
    received = weights.mean(dim=1)[:, prefix:, prefix:].mean(dim=1)                         # (n, L)
    return out.hidden_states[feature_layer][:, prefix:], received / received.sum(-1, keepdim=True)


def tower_like(model, **kwargs) -> VisionTower:
    """A tower on a copy of ``model``'s weights with its own attention implementation."""
    kind = type(model)
    copy = kind(kind.config_class.from_dict(model.config.to_dict()))
    copy.load_state_dict(model.state_dict())
    return VisionTower.from_model(copy.eval(), **kwargs)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_siglip_tokens_and_attention_received_match_transformers(eager_siglip, attn_implementation, size):
    tower = tower_like(eager_siglip, attn_implementation=attn_implementation, visual_expert="attention_received")
    pixels = torch.randn(2, 3, *size)
    out = tower(pixels)
    rows, cols = size[0] // PATCH, size[1] // PATCH
    assert out.grid == (rows, cols) and out.patch_tokens.shape == (2, rows * cols, 32)
    tokens, received = reference(eager_siglip, pixels, -2, -2, prefix=0)
    torch.testing.assert_close(out.patch_tokens, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls_attention, received, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.cls_attention.sum(-1), torch.ones(2))
    assert out.cls_attention.dtype == torch.float32 and (out.cls_attention >= 0).all()


def test_siglip_native_size_uses_the_position_table_as_is(eager_siglip):
    tower = tower_like(eager_siglip, visual_expert="attention_received")
    pixels = torch.randn(1, 3, NATIVE, NATIVE)
    with torch.no_grad():
        plain = eager_siglip(pixels, output_hidden_states=True).hidden_states[-2]   # no interpolation asked
    torch.testing.assert_close(tower(pixels).patch_tokens, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("feature_layer", "attention_layer"), [(-1, None), (1, None), (2, -1), (-2, 1)])
def test_attention_received_follows_the_layer_numbering(eager_siglip, feature_layer, attention_layer):
    tower = tower_like(eager_siglip, feature_layer=feature_layer, attention_layer=attention_layer,
                       visual_expert="attention_received")
    pixels = torch.randn(2, 3, 42, 56)
    out = tower(pixels)
    layer = feature_layer if attention_layer is None else attention_layer
    tokens, received = reference(eager_siglip, pixels, feature_layer, layer, prefix=0)
    torch.testing.assert_close(out.patch_tokens, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls_attention, received, rtol=1e-5, atol=1e-6)


def test_attention_received_on_clip_leaves_the_cls_token_out():
    torch.manual_seed(1)
    model = CLIPVisionModel(tiny_clip_vision_config())
    model.set_attn_implementation("eager")
    tower = tower_like(model.eval(), visual_expert="attention_received", attn_implementation="sdpa")
    pixels = torch.randn(2, 3, 42, 70)
    tokens, received = reference(model, pixels, -2, -2, prefix=1)
    out = tower(pixels)
    torch.testing.assert_close(out.patch_tokens, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls_attention, received, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(NATIVE, NATIVE), (42, 70)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pooling_head_scores_are_the_heads_own_attention_weights(eager_siglip, size):
    tower = tower_like(eager_siglip, visual_expert="pooling_head", attn_implementation="sdpa")
    assert tower.num_layers_run == 3                   # the head reads the last layer: every layer runs
    pixels = torch.randn(3, 3, *size)
    with torch.no_grad():
        out = eager_siglip(pixels, interpolate_pos_encoding=True)
        head = eager_siglip.head
        probe = head.probe.expand(3, -1, -1)
        _, weights = head.attention(probe, out.last_hidden_state, out.last_hidden_state, need_weights=True)
    scores = tower(pixels).cls_attention
    torch.testing.assert_close(scores, weights[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.sum(-1), torch.ones(3))


def test_attention_received_does_not_depend_on_the_query_chunk():
    torch.manual_seed(2)
    queries, keys = torch.randn(2, 1 + 30, 16), torch.randn(2, 1 + 30, 16)
    whole = attention_received(queries, keys, num_heads=4, scale=0.5, num_prefix=1, chunk=1000)
    for chunk in (1, 7, 30):
        torch.testing.assert_close(attention_received(queries, keys, 4, 0.5, num_prefix=1, chunk=chunk), whole)
    assert whole.shape == (2, 30)


def test_visual_experts_the_tower_cannot_give_are_refused(eager_siglip):
    with pytest.raises(ValueError, match=r"'cls' needs a CLS token.*SiglipVisionModel.*attention_received.*pooling_head"):
        VisionTower.from_model(eager_siglip)
    headless = SiglipVisionModel(siglip_config(vision_use_head=False))
    with pytest.raises(ValueError, match=r"pooling_head.*none.*attention_received"):
        VisionTower.from_model(headless, visual_expert="pooling_head")
    with pytest.raises(ValueError, match=r"pooling_head.*attention_layer must be None"):
        VisionTower.from_model(eager_siglip, attention_layer=1, visual_expert="pooling_head")
    with pytest.raises(ConfigError, match=r"visual_expert must be one of cls, attention_received, pooling_head"):
        MeteorConfig(visual_expert="probe")
    with pytest.raises(ConfigError, match="attention_layer None"):
        MeteorConfig(visual_expert="pooling_head", attention_layer=-1)


def test_tower_geometry_and_normalisation_of_siglip():
    tower = VisionTower.from_config(siglip_config(image_size=60), visual_expert="attention_received")
    assert tower.image_size == 56 and tower.patch_size == PATCH   # 60 px cover 4 whole patches per side
    assert tower.image_mean == (0.5, 0.5, 0.5) and tower.image_std == (0.5, 0.5, 0.5)
    assert not tower.has_cls


def test_siglip_folders_load_and_save(tmp_path, eager_siglip):
    full = SiglipModel(SiglipConfig(vision_config=siglip_config().to_dict(), text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)))
    full.save_pretrained(tmp_path / "full")
    tower = VisionTower.from_pretrained(tmp_path / "full", visual_expert="pooling_head")
    expected = full.vision_model.state_dict()
    assert all(torch.equal(t, expected[name]) for name, t in tower.clip.state_dict().items())
    tower.save_pretrained(tmp_path / "tower")
    settings = json.loads((tmp_path / "tower" / "preprocessor_config.json").read_text())
    assert settings["image_processor_type"] == "SiglipImageProcessor" and settings["image_mean"] == [0.5] * 3
    again = VisionTower.from_pretrained(tmp_path / "tower", visual_expert="attention_received")
    pixels = torch.randn(1, 3, 42, 70)
    torch.testing.assert_close(again(pixels).patch_tokens, tower(pixels).patch_tokens, rtol=0, atol=0)


def siglip_meteor(visual_expert: str = "attention_received", seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    vision = VisionTower.from_model(SiglipVisionModel(siglip_config(num_hidden_layers=4)), visual_expert=visual_expert)
    language_model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    config = MeteorConfig(compressor=CompressorConfig(tokens_per_slice=4, d_state=8), visual_expert=visual_expert)
    return build(vision, language_model, tokenizer, config)


def test_the_config_and_the_tower_must_agree_on_the_expert():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    vision = VisionTower.from_model(SiglipVisionModel(siglip_config()), visual_expert="attention_received")
    with pytest.raises(ValueError, match=r"tower computes the visual expert 'attention_received'.*asks for 'cls'"):
        build(vision, LlamaForCausalLM(tiny_llama_config(len(tokenizer))), tokenizer, MeteorConfig())


@pytest.mark.parametrize("visual_expert", ["attention_received", "pooling_head"])
def test_a_siglip_meteor_trains_and_generates(tmp_path, visual_expert):
    model, processor = siglip_meteor(visual_expert)
    save_pretrained(tmp_path / "base", model, processor)
    data = tiny_llava_data(tmp_path / "data", 16, seed=1)
    result = train(TrainConfig(stage=2, data=str(data), image_folder=str(tmp_path / "data"),
                               model=str(tmp_path / "base"), output_dir=str(tmp_path / "run"), global_batch_size=8,
                               per_device_batch_size=4, max_steps=3, save_every=100, learning_rate=1e-3,
                               progress="none"))
    assert result.steps_done == 3 and result.final_loss is not None and result.final_loss == result.final_loss
    trained, processor = load_pretrained(result.model_dir)
    assert trained.meteor_config.visual_expert == visual_expert and not trained.model.tower.has_cls
    before = model.compressor.state_dict()
    assert any(not torch.equal(t, before[n]) for n, t in trained.compressor.state_dict().items())

    image = tmp_path / "data" / "images" / "0004.png"          # a sliced image: slices and a global view
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
