import pytest
import torch

from meteor.projectors import TopDownCompression, count_parameters
from meteor.config import CompressorConfig
from meteor.fusion import FlashGlobalFusion, insert_at_centre, interleave, local_to_single


def test_local_to_single_is_a_border_aware_window_mean():
    grid = (3, 4)
    tokens = torch.arange(12, dtype=torch.float32).reshape(1, 12, 1)
    local = local_to_single(tokens, grid, window_size=3)[0, :, 0].reshape(3, 4)
    fmap = tokens.reshape(3, 4)
    assert local[1, 1] == fmap[0:3, 0:3].mean()          # interior: full 3×3 window
    assert local[0, 0] == fmap[0:2, 0:2].mean()          # corner: only the 4 existing tokens
    assert local[2, 3] == fmap[1:3, 2:4].mean()
    wide = local_to_single(tokens, grid, window_size=5)[0, :, 0].reshape(3, 4)
    assert wide[1, 1] == fmap[0:3, 0:4].mean()
    with pytest.raises(ValueError, match="3×5 = 15 tokens"):
        local_to_single(tokens, (3, 5))


def test_interleave_and_centre_insertion_follow_eq1():
    t = torch.tensor([[[1.0], [2.0], [3.0]]])
    tl = -t
    assert interleave(tl, t)[0, :, 0].tolist() == [-1, 1, -2, 2, -3, 3]
    seq, centre = insert_at_centre(interleave(tl, t), torch.tensor([9.0]))
    assert centre == 3 and seq[0, :, 0].tolist() == [-1, 1, -2, 9, 2, -3, 3]


def _config(**kw):
    values = dict(vision_width=16, text_width=24, tokens_per_slice=5, d_state=4, expand=2)
    values.update(kw)
    return CompressorConfig(**values)


@pytest.mark.parametrize("scan_mode", ["single", "l2s", "both"])
@pytest.mark.parametrize("window", [3, 5])
def test_fusion_shapes_every_scan_mode(scan_mode, window):
    torch.manual_seed(0)
    fusion = FlashGlobalFusion(_config(scan_mode=scan_mode, window_size=window))
    out = fusion(torch.randn(3, 12, 16), (3, 4))
    assert out.fused.shape == (3, 12, 16) and out.instruction.shape == (3, 16)


def test_fused_token_i_is_the_output_at_t_i_not_tl_i():
    """Make the block the identity (zero output projection): then Fⁱ must equal Tⁱ exactly,
    proving the TL outputs were the ones dropped, and INS' must equal INS."""
    torch.manual_seed(0)
    fusion = FlashGlobalFusion(_config(scan_mode="l2s"))
    for layer in fusion.layers:
        torch.nn.init.zeros_(layer.mixer.out_proj.weight)
    for grid in [(3, 4), (3, 5)]:          # H·W even and odd: INS between pairs, or inside one
        tokens = torch.randn(2, grid[0] * grid[1], 16)
        out = fusion(tokens, grid)
        torch.testing.assert_close(out.fused, tokens)
        torch.testing.assert_close(out.instruction, fusion.instruction_token.expand(2, -1))


@pytest.mark.parametrize("grid", [(3, 4), (3, 5), (1, 1)])
@pytest.mark.parametrize("layers", [1, 2])
def test_last_layer_shortcut_equals_computing_every_output(grid, layers):
    """The last layer computes outputs only at Tⁱ and INS; the result must equal running it on
    every position and then dropping the TL outputs."""
    torch.manual_seed(0)
    fusion = FlashGlobalFusion(_config(scan_mode="l2s", fgf_layers=layers))
    tokens = torch.randn(2, grid[0] * grid[1], 16)
    out = fusion(tokens, grid)
    sequence, centre = insert_at_centre(interleave(local_to_single(tokens, grid), tokens),
                                        fusion.instruction_token)
    for layer in fusion.layers:
        sequence = layer(sequence)
    without_ins = torch.cat([sequence[:, :centre], sequence[:, centre + 1:]], dim=1)
    torch.testing.assert_close(out.fused, without_ins[:, 1::2])
    torch.testing.assert_close(out.instruction, sequence[:, centre])


def test_fusion_is_global_and_bidirectional():
    """A change to the last token moves the first fused token (backward scan) and vice versa.
    (Untrained Δ is small, so the effect is small but exactly zero for a one-way scan.)"""
    torch.manual_seed(0)
    fusion = FlashGlobalFusion(_config(scan_mode="single"))
    tokens = torch.randn(1, 12, 16)
    base = fusion(tokens, (3, 4)).fused
    poked = tokens.clone()
    poked[0, -1] += torch.randn(16)  # not a constant: LayerNorm would cancel it
    assert (fusion(poked, (3, 4)).fused[0, 0] - base[0, 0]).abs().max() > 1e-7
    poked = tokens.clone()
    poked[0, 0] += torch.randn(16)
    assert (fusion(poked, (3, 4)).fused[0, -1] - base[0, -1]).abs().max() > 1e-7


@pytest.mark.parametrize("scan_mode", ["single", "l2s", "both"])
@pytest.mark.parametrize("expert_mode", ["visual", "native", "both"])
def test_gradients_reach_ins_and_every_fgf_parameter(scan_mode, expert_mode):
    torch.manual_seed(0)
    compressor = TopDownCompression(_config(scan_mode=scan_mode, expert_mode=expert_mode, fgf_layers=2))
    tokens = torch.randn(2, 12, 16)
    out = compressor(tokens, torch.rand(2, 12), (3, 4), progress=0.5)
    assert out.tokens.shape == (2, 5, 24)
    out.tokens.square().mean().backward()
    missing = [name for name, p in compressor.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_k_larger_than_the_view_is_refused_clearly():
    compressor = TopDownCompression(_config(tokens_per_slice=13))
    with pytest.raises(ValueError, match="K=13 tokens from a view of 12"):
        compressor(torch.randn(1, 12, 16), torch.rand(1, 12), (3, 4))


def test_wrong_vision_width_is_refused_clearly():
    compressor = TopDownCompression(_config())
    with pytest.raises(ValueError, match="width C=16, got 8"):
        compressor(torch.randn(1, 12, 8), torch.rand(1, 12), (3, 4))


def test_parameter_count_at_the_papers_widths_uses_no_memory():
    counts = count_parameters(CompressorConfig(vision_width=1024, text_width=5120))
    # LLaVA-1.5's mlp2x_gelu at these widths: 1024·5120 + 5120 + 5120·5120 + 5120.
    assert counts["projector_mlp"] == 1024 * 5120 + 5120 + 5120 * 5120 + 5120
    assert counts["instruction_token"] == 1024 and counts["visual_native_selection"] == 0
    assert 6e6 < counts["flash_global_fusion"] < 8e6
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


@pytest.mark.parametrize("length", [1, 2, 7])
def test_channels_last_causal_conv_equals_nn_conv1d(length):
    from meteor.mamba import causal_depthwise_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, length, 6, requires_grad=True)
    expected = conv(x.transpose(1, 2))[..., :length].transpose(1, 2)
    got = causal_depthwise_conv(x, conv.weight, conv.bias)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.square().sum(), [x, conv.weight, conv.bias])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, conv.weight, conv.bias])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
