"""The baseline projectors: same interface as Top-Down Compression, each trains and answers."""

import pytest
import torch

from meteor.model.projectors import build_projector, count_parameters
from meteor.model.configuration import CompressorConfig
from meteor.model.projectors.baselines import pooled_grid, sincos_2d
from meteor.testing import tiny_llava_data, tiny_meteor_config, tiny_model
from meteor.train import TrainConfig, train
from meteor.pretrained import save_pretrained
from meteor.pretrained import load_pretrained

VARIANTS = [("meteor", 4), ("mlp", None), ("resampler", 4), ("avgpool", 4), ("cls_topk", 4), ("random_topk", 4)]


def _config(projector, k, **kw):
    return CompressorConfig(vision_width=16, text_width=32, projector=projector, tokens_per_slice=k,
                            d_state=4, resampler_heads=4, **kw)


@pytest.mark.parametrize("projector, k", VARIANTS)
def test_every_projector_maps_views_to_k_tokens_of_width_d_and_trains_every_parameter(projector, k):
    torch.manual_seed(0)
    module = build_projector(_config(projector, k))
    tokens, attention = torch.randn(3, 12, 16), torch.softmax(torch.randn(3, 12), -1)
    out = module(tokens, attention, (3, 4))
    assert out.tokens.shape == (3, k or 12, 32) and out.grid == (3, 4)
    (out.tokens * torch.randn_like(out.tokens)).sum().backward()
    untrained = [name for name, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert untrained == []


@pytest.mark.parametrize("projector", ["mlp", "cls_topk", "random_topk"])
def test_selecting_projectors_map_the_kept_raw_tokens_through_their_mlp(projector):
    """CompressionOutput's contract: mlp(mlp_inputs[:, i]) is what patch i becomes in the LLM;
    these baselines keep raw CLIP tokens, so mlp_inputs is the patch tokens themselves."""
    torch.manual_seed(0)
    module = build_projector(_config(projector, None if projector == "mlp" else 4)).eval()
    tokens, attention = torch.randn(2, 12, 16), torch.softmax(torch.randn(2, 12), -1)
    out = module(tokens, attention, (3, 4))
    assert torch.equal(out.mlp_inputs, tokens)
    assert (out.indices.diff(dim=-1) > 0).all()                     # raster order
    kept = torch.gather(tokens, 1, out.indices[..., None].expand(-1, -1, 16))
    torch.testing.assert_close(out.tokens, module.mlp(kept))


def test_avgpool_tokens_are_the_mlp_of_each_cells_mean():
    module = build_projector(_config("avgpool", 4))
    tokens = torch.randn(1, 12, 16)
    out = module(tokens, torch.rand(1, 12), (3, 4))
    grid = tokens.reshape(3, 4, 16)
    # K=4 on a 3×4 grid pools to 2×2 cells; adaptive pooling splits 3 rows as [0, 2) and [1, 3).
    cells = [grid[0:2, 0:2], grid[0:2, 2:4], grid[1:3, 0:2], grid[1:3, 2:4]]
    expected = torch.stack([cell.mean(dim=(0, 1)) for cell in cells])[None]
    torch.testing.assert_close(out.tokens, module.mlp(expected))
    assert out.indices is None and torch.equal(out.mlp_inputs, tokens)


def test_cls_topk_keeps_the_most_attended_raw_tokens():
    module = build_projector(_config("cls_topk", 2))
    attention = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05, 0.0]])
    out = module(torch.randn(1, 6, 16), attention, (2, 3))
    assert out.indices.tolist() == [[1, 3]]


def test_random_topk_is_repeatable_at_inference_only():
    module = build_projector(_config("random_topk", 3)).eval()
    tokens, attention = torch.randn(1, 12, 16), torch.rand(1, 12)
    assert torch.equal(module(tokens, attention, (3, 4)).indices, module(tokens, attention, (3, 4)).indices)
    torch.manual_seed(0)                                         # training draws afresh every call
    drawn = {tuple(module.train()(tokens, attention, (3, 4)).indices[0].tolist()) for _ in range(8)}
    assert len(drawn) > 1 and all(len(set(d)) == 3 for d in drawn)


def test_avgpool_grid_follows_the_aspect_ratio_and_refuses_impossible_k():
    assert pooled_grid((24, 24), 144) == (12, 12)
    assert pooled_grid((19, 29), 144) == (9, 16)      # 9/16 is the factorisation closest to 19/29
    with pytest.raises(ValueError, match="K=7 tokens from a 3×4"):
        pooled_grid((3, 4), 7)


def test_sincos_positions_differ_per_cell_and_encode_row_then_column():
    pos = sincos_2d((3, 4), 16)
    assert pos.shape == (12, 16) and torch.unique(pos, dim=0).shape[0] == 12
    # Cell (row 2, col 3): channels [sin(r·f), cos(r·f), sin(c·f), cos(c·f)], f = 10000^(−j/4), j < 4.
    f = 1.0 / 10000 ** (torch.arange(4.0) / 4)
    expected = torch.cat([(2 * f).sin(), (2 * f).cos(), (3 * f).sin(), (3 * f).cos()])
    torch.testing.assert_close(pos[2 * 4 + 3], expected)
    assert torch.equal(sincos_2d((3, 4), 18)[:, 16:], torch.zeros(12, 2))   # a width not divisible by 4 pads


def test_parameter_counts_at_the_papers_widths():
    resampler = count_parameters(CompressorConfig(projector="resampler"))["total"]
    assert abs(resampler - 137.84e6) / 137.84e6 < 0.01          # LLaVA-UHD's projector, Table 4
    mlp = count_parameters(CompressorConfig(projector="mlp", tokens_per_slice=None))["total"]
    assert mlp == 1024 * 5120 + 5120 + 5120 * 5120 + 5120


@pytest.mark.slow
@pytest.mark.parametrize("projector, k", VARIANTS)
def test_every_variant_trains_and_answers(projector, k, tmp_path):
    model, processor = tiny_model(tiny_meteor_config(projector=projector, tokens_per_slice=k))
    save_pretrained(tmp_path / "base", model, processor)
    data = tiny_llava_data(tmp_path / "data", 8)
    result = train(TrainConfig(stage=2, data=str(data), image_folder=str(tmp_path / "data"),
                               model=str(tmp_path / "base"), output_dir=str(tmp_path / "run"),
                               global_batch_size=4, per_device_batch_size=4, max_steps=2,
                               learning_rate=1e-3))
    assert result.steps_done == 2 and result.final_loss == result.final_loss
    trained, processor = load_pretrained(result.model_dir)
    assert trained.meteor_config.compressor.projector == projector
    # Two steps at lr 1e-3 move every tensor of the projector that the loss reaches (all of them).
    before, after = model.compressor.state_dict(), trained.compressor.state_dict()
    assert before.keys() == after.keys()
    assert [name for name in before if torch.equal(before[name], after[name])] == []
    batch = processor.prompts(["What colour is the square?"], [tmp_path / "data" / "images" / "0004.png"])
    assert trained.eval().generate(**batch.to_model_kwargs(), max_new_tokens=3, do_sample=False).shape[1] >= 1
