"""Top-Down Compression (meteor/projectors/top_down.py): FGF, then VNS, then the MLP to width D.

Each test pins what the module must equal when recomputed from its parts or from the paper's
equations, on a tiny config of the real class.
"""

import pytest
import torch

from meteor.model.configuration import CompressorConfig
from meteor.model.projectors import TopDownCompression, count_parameters, parameter_report
from meteor.model.projectors.top_down.selection import native_scores, visual_scores

GRID = (3, 4)


def _config(**kw):
    values = {"vision_width": 16, "text_width": 24, "tokens_per_slice": 5, "d_state": 4, "expand": 2}
    values.update(kw)
    return CompressorConfig(**values)


def _inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, GRID[0] * GRID[1], 16, generator=generator)
    # Distinct CLS attention values, so Top-K has no ties and the expected indices are unambiguous.
    attention = torch.rand(batch, GRID[0] * GRID[1], generator=generator) + 0.01
    return tokens, attention


def _compressor(**kw):
    torch.manual_seed(0)
    return TopDownCompression(_config(**kw))


def _gather(values, indices):
    return torch.gather(values, 1, indices[..., None].expand(-1, -1, values.shape[-1]))


def test_mlp_inputs_are_the_fused_tokens_f_of_flash_global_fusion():
    compressor = _compressor()
    tokens, attention = _inputs()
    out = compressor(tokens, attention, GRID)
    torch.testing.assert_close(out.mlp_inputs, compressor.fusion(tokens, GRID).fused, rtol=0, atol=0)
    # F, not the raw patch tokens: an untrained fusion layer is near the identity but not equal to it.
    assert not torch.allclose(out.mlp_inputs, tokens)


def test_output_tokens_are_the_mlp_of_the_kept_fused_tokens():
    """The MLP runs after selection (SPEC §8): for a token-wise MLP that is exact, so the output
    must equal running the MLP on every fused token and then gathering the kept ones."""
    compressor = _compressor()
    tokens, attention = _inputs()
    out = compressor(tokens, attention, GRID)
    fused = out.mlp_inputs
    torch.testing.assert_close(out.tokens, compressor.mlp(_gather(fused, out.indices)))
    torch.testing.assert_close(out.tokens, _gather(compressor.mlp(fused), out.indices))
    assert out.tokens.shape == (2, 5, 24) and out.grid == GRID


def test_indices_are_k_per_view_in_raster_order_and_the_top_k_of_the_aggregate():
    compressor = _compressor(tokens_per_slice=4)
    tokens, attention = _inputs(batch=3)
    out = compressor(tokens, attention, GRID)
    assert out.indices.shape == (3, 4) and out.indices.dtype == torch.int64
    assert (out.indices.diff(dim=-1) > 0).all()                        # raster order, no repeats
    for view in range(3):                                              # each view chooses its own K
        best = out.aggregate_scores[view].topk(4).indices.sort().values
        assert out.indices[view].tolist() == best.tolist()


def test_views_of_one_batch_are_selected_independently():
    """Two views whose CLS attention prefers opposite corners keep different tokens: Top-K is per
    view, never over the batch."""
    compressor = _compressor(tokens_per_slice=2, expert_mode="visual")
    tokens, _ = _inputs()
    attention = torch.full((2, 12), 0.01)
    attention[0, [0, 1]] = 1.0
    attention[1, [10, 11]] = 1.0
    out = compressor(tokens, attention, GRID)
    assert out.indices.tolist() == [[0, 1], [10, 11]]


def test_visual_expert_alone_keeps_the_top_k_of_the_cls_attention():
    compressor = _compressor(expert_mode="visual")
    tokens, attention = _inputs()
    out = compressor(tokens, attention, GRID, progress=0.5)
    expected = attention.topk(5, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(out.indices, expected)
    torch.testing.assert_close(out.visual_scores, attention / attention.sum(-1, keepdim=True))  # Eq. 3
    assert out.native_scores is None
    torch.testing.assert_close(out.aggregate_scores, out.visual_scores)


def test_native_expert_alone_is_eq4_on_f_and_ins_prime():
    compressor = _compressor(expert_mode="native")
    tokens, attention = _inputs()
    out = compressor(tokens, attention, GRID)
    fused = compressor.fusion(tokens, GRID)
    expected = torch.softmax(torch.einsum("blc,bc->bl", fused.fused, fused.instruction), dim=-1)
    torch.testing.assert_close(out.native_scores, expected)
    assert out.visual_scores is None
    assert torch.equal(out.indices, expected.topk(5, dim=-1).indices.sort(dim=-1).values)


def test_native_warm_up_starts_visual_only_and_ends_at_eq5():
    compressor = _compressor(native_warmup=0.5, lam=0.8)
    tokens, attention = _inputs()
    fused = compressor.fusion(tokens, GRID)
    vs, ns = visual_scores(attention), native_scores(fused.fused, fused.instruction)
    start = compressor(tokens, attention, GRID, progress=0.0)
    # At progress 0 the native weight is 0: AS = λ·VS, so the selection is the visual expert's.
    torch.testing.assert_close(start.aggregate_scores, 0.8 * vs)
    assert torch.equal(start.indices, vs.topk(5, dim=-1).indices.sort(dim=-1).values)
    halfway = compressor(tokens, attention, GRID, progress=0.25)          # half the ramp: w = 0.1
    torch.testing.assert_close(halfway.aggregate_scores, 0.8 * vs + 0.1 * ns)
    for done in (0.5, 1.0, None):                                         # after warm-up, and inference
        after = compressor(tokens, attention, GRID, progress=done)
        torch.testing.assert_close(after.aggregate_scores, 0.8 * vs + 0.2 * ns)


def test_straight_through_keeps_values_and_sends_the_kept_tokens_gradient_to_their_scores():
    """native_gradient="straight_through" multiplies each kept Fⁱ by (1 + ASⁱ − stopgrad(ASⁱ)):
    the values are those of plain selection, and ∂L/∂ASⁱ = ⟨∂L/∂Fⁱ_kept, Fⁱ⟩ for kept i, 0 else."""
    st = _compressor(native_gradient="straight_through")
    plain = TopDownCompression(_config(native_gradient="none"))
    plain.load_state_dict(st.state_dict())
    tokens, attention = _inputs()
    weights = torch.randn(2, 5, 24)                                       # L = Σ tokens · weights

    out = st(tokens, attention, GRID, progress=0.5)
    out.aggregate_scores.retain_grad()
    (out.tokens * weights).sum().backward()
    reference = plain(tokens, attention, GRID, progress=0.5)
    # Equal up to rounding: 1 + ASⁱ − ASⁱ is 1 within an ulp in float32, not always exactly 1.
    torch.testing.assert_close(out.tokens, reference.tokens)
    assert torch.equal(out.indices, reference.indices)

    kept = _gather(reference.mlp_inputs, reference.indices).detach().requires_grad_()
    (st.mlp(kept) * weights).sum().backward()
    expected = torch.zeros(2, 12).scatter(1, reference.indices, (kept.grad * kept).sum(-1))
    torch.testing.assert_close(out.aggregate_scores.grad, expected)

    # With "none" the tokens do not depend on the scores: no gradient path reaches them.
    again = plain(tokens, attention, GRID, progress=0.5)
    assert torch.autograd.grad(again.tokens.sum(), again.aggregate_scores, allow_unused=True) == (None,)


def test_keeping_every_token_maps_all_fused_tokens_in_order():
    compressor = _compressor(tokens_per_slice=None)
    tokens, attention = _inputs()
    out = compressor(tokens, attention, GRID)
    assert out.indices.tolist() == [list(range(12))] * 2
    torch.testing.assert_close(out.tokens, compressor.mlp(out.mlp_inputs))


@pytest.mark.parametrize("scan_mode", ["single", "l2s", "both"])
@pytest.mark.parametrize("expert_mode", ["visual", "native", "both"])
def test_gradients_reach_ins_and_every_fgf_parameter(scan_mode, expert_mode):
    compressor = _compressor(scan_mode=scan_mode, expert_mode=expert_mode, fgf_layers=2)
    tokens, attention = _inputs()
    out = compressor(tokens, attention, GRID, progress=0.5)
    assert out.tokens.shape == (2, 5, 24)
    out.tokens.square().mean().backward()
    missing = [name for name, p in compressor.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_k_larger_than_the_view_is_refused_clearly():
    compressor = _compressor(tokens_per_slice=13)
    with pytest.raises(ValueError, match="K=13 tokens from a view of 12"):
        compressor(torch.randn(1, 12, 16), torch.rand(1, 12), GRID)


def test_wrong_vision_width_is_refused_clearly():
    compressor = _compressor()
    with pytest.raises(ValueError, match="width C=16, got 8"):
        compressor(torch.randn(1, 12, 8), torch.rand(1, 12), GRID)


@pytest.mark.parametrize("overrides", [{}, {"direction_merge": "concat"}, {"fgf_layers": 2}, {"scan_mode": "both"}])
def test_parameter_counts_partition_every_parameter_of_the_module(overrides):
    compressor = _compressor(**overrides)
    counts = compressor.parameter_counts()
    assert sum(counts.values()) == sum(p.numel() for p in compressor.parameters())
    assert counts["visual_native_selection"] == 0                       # VNS has no parameters
    assert count_parameters(_config(**overrides)) == {**counts, "total": sum(counts.values())}


def _fgf_layer_parameters(c, d, n=16, expand=2, d_conv=4, merge="mean"):
    """Closed form of one FusionLayer (see meteor/projectors/top_down/mamba.py): LayerNorm, shared in/out projections,
    and per direction a depthwise conv, the Δ/B/C projections, A_log and D."""
    d_inner, dt_rank = expand * c, -(-c // 16)
    per_direction = (d_inner * d_conv + d_inner + d_inner * (dt_rank + 2 * n)
                     + dt_rank * d_inner + d_inner + d_inner * n + d_inner)
    merged = 2 * d_inner if merge == "concat" else d_inner
    return 2 * c + c * 2 * d_inner + 2 * per_direction + merged * c


def test_parameter_count_at_the_papers_widths_is_the_closed_form_and_matches_meteor_params():
    counts = count_parameters(CompressorConfig(vision_width=1024, text_width=5120))
    # LLaVA-1.5's mlp2x_gelu at these widths: 1024·5120 + 5120 + 5120·5120 + 5120.
    assert counts == {"instruction_token": 1024, "flash_global_fusion": _fgf_layer_parameters(1024, 5120),
                      "visual_native_selection": 0,
                      "projector_mlp": 1024 * 5120 + 5120 + 5120 * 5120 + 5120, "total": 38_511_616}
    assert counts["flash_global_fusion"] == 7_043_072
    # `meteor params` prints parameter_report: the same total, beside the paper's 37.08M.
    assert "| total | 38,511,616 (38.51M) |" in parameter_report() and "37.08M" in parameter_report()
    concat = count_parameters(CompressorConfig(direction_merge="concat"))
    assert concat["flash_global_fusion"] == _fgf_layer_parameters(1024, 5120, merge="concat")
    assert concat["total"] - counts["total"] == 2048 * 1024             # the wider output projection

