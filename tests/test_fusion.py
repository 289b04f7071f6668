"""Flash Global Fusion (meteor/projectors/top_down/fusion.py): L2S, the instruction token, and which outputs are F and INS'.

The compressor built on it is tested in test_top_down.py, the Mamba block in test_mamba.py."""

import pytest
import torch

from meteor.model.configuration import CompressorConfig
from meteor.model.projectors.top_down.fusion import FlashGlobalFusion, insert_at_centre, interleave, local_to_single


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
    values = {"vision_width": 16, "text_width": 24, "tokens_per_slice": 5, "d_state": 4, "expand": 2}
    values.update(kw)
    return CompressorConfig(**values)


@pytest.mark.parametrize("scan_mode", ["single", "l2s", "both"])
@pytest.mark.parametrize("window", [3, 5])
def test_every_scan_mode_fuses_each_view_on_its_own(scan_mode, window):
    """A batch of views sharing a grid is only a batch: each view's F and INS' equal what the view
    gives alone (no mixing across views through the scan or the pooling)."""
    torch.manual_seed(0)
    fusion = FlashGlobalFusion(_config(scan_mode=scan_mode, window_size=window))
    tokens = torch.randn(3, 12, 16)
    out = fusion(tokens, (3, 4))
    assert out.fused.shape == (3, 12, 16) and out.instruction.shape == (3, 16)
    for view in range(3):
        alone = fusion(tokens[view:view + 1], (3, 4))
        torch.testing.assert_close(out.fused[view:view + 1], alone.fused, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.instruction[view:view + 1], alone.instruction, rtol=1e-5, atol=1e-6)


def test_both_scan_mode_averages_the_single_and_l2s_sequences_through_one_block():
    torch.manual_seed(0)
    both = FlashGlobalFusion(_config(scan_mode="both"))
    single, l2s = FlashGlobalFusion(_config(scan_mode="single")), FlashGlobalFusion(_config(scan_mode="l2s"))
    single.load_state_dict(both.state_dict())
    l2s.load_state_dict(both.state_dict())
    tokens = torch.randn(2, 12, 16)
    out, one, two = both(tokens, (3, 4)), single(tokens, (3, 4)), l2s(tokens, (3, 4))
    torch.testing.assert_close(out.fused, 0.5 * (one.fused + two.fused))
    torch.testing.assert_close(out.instruction, 0.5 * (one.instruction + two.instruction))
    assert not torch.allclose(one.fused, two.fused)          # the TL tokens do change F


def test_window_size_reaches_the_local_tokens():
    torch.manual_seed(0)
    narrow = FlashGlobalFusion(_config(window_size=3))
    wide = FlashGlobalFusion(_config(window_size=5))
    wide.load_state_dict(narrow.state_dict())
    tokens = torch.randn(1, 20, 16)
    assert not torch.allclose(narrow(tokens, (4, 5)).fused, wide(tokens, (4, 5)).fused)


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
