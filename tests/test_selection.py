import pytest
import torch

from meteor.model.configuration import CompressorConfig
from meteor.model.projectors.top_down.selection import (VisualNativeSelection, aggregate_scores, native_scores, native_weight,
                              select_top_k, visual_scores)


def test_visual_scores_sum_to_one_per_view():
    attention = torch.rand(3, 20) * 0.7    # the CLS row without its self-attention: sums below 1
    scores = visual_scores(attention)
    torch.testing.assert_close(scores.sum(-1), torch.ones(3))
    assert torch.equal(scores.argsort(-1), attention.argsort(-1))


def test_native_scores_are_eq4_softmax_of_dot_products():
    fused, ins = torch.randn(2, 6, 5), torch.randn(2, 5)
    expected = torch.softmax((fused @ ins[..., None]).squeeze(-1), dim=-1)
    torch.testing.assert_close(native_scores(fused, ins), expected)
    flatter = native_scores(fused, ins, temperature=10.0)
    assert (flatter.max(-1).values < expected.max(-1).values).all()


def test_native_weight_ramps_linearly_then_holds():
    assert native_weight(0.8, 0.0, 0.5) == 0.0
    assert native_weight(0.8, 0.25, 0.5) == pytest.approx(0.1)
    assert native_weight(0.8, 0.9, 0.5) == pytest.approx(0.2)
    assert native_weight(0.8, None, 0.5) == pytest.approx(0.2)     # inference: full weight
    assert native_weight(0.8, 0.0, 0.0) == pytest.approx(0.2)      # no warm-up


def test_aggregate_is_eq5():
    vs, ns = torch.rand(2, 4), torch.rand(2, 4)
    torch.testing.assert_close(aggregate_scores(vs, ns, 0.8, 0.2), 0.8 * vs + 0.2 * ns)
    assert aggregate_scores(vs, None, 0.8, 0.2) is vs
    assert aggregate_scores(None, ns, 0.8, 0.2) is ns


def test_top_k_keeps_the_best_in_raster_order():
    scores = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert select_top_k(scores, 2).tolist() == [[1, 3], [0, 1]]    # ties go to earlier tokens
    with pytest.raises(ValueError, match="K=6 .* 5 patch tokens"):
        select_top_k(scores, 6)


@pytest.mark.parametrize("mode", ["visual", "native", "both"])
def test_module_selects_from_fused_tokens(mode):
    torch.manual_seed(0)
    selection = VisualNativeSelection(CompressorConfig(tokens_per_slice=3, expert_mode=mode))
    fused, ins, attention = torch.randn(2, 9, 4), torch.randn(2, 4), torch.rand(2, 9)
    out = selection(fused, ins, attention)
    assert out.tokens.shape == (2, 3, 4) and out.indices.shape == (2, 3)
    assert (out.indices.diff(dim=-1) > 0).all()
    torch.testing.assert_close(out.tokens, torch.gather(fused, 1, out.indices[..., None].expand(-1, -1, 4)))
    assert (out.visual is None) == (mode == "native") and (out.native is None) == (mode == "visual")
    expected = {"visual": visual_scores(attention), "native": native_scores(fused, ins)}
    if mode != "both":
        torch.testing.assert_close(out.aggregate, expected[mode])
    else:
        torch.testing.assert_close(out.aggregate, 0.8 * expected["visual"] + 0.2 * expected["native"])


def test_warm_up_starts_with_the_visual_expert_alone():
    torch.manual_seed(1)
    selection = VisualNativeSelection(CompressorConfig(tokens_per_slice=2, native_warmup=0.5))
    fused, ins, attention = torch.randn(1, 8, 4) * 5, torch.randn(1, 4) * 5, torch.rand(1, 8)
    at_start = selection(fused, ins, attention, progress=0.0)
    assert at_start.indices.tolist() == select_top_k(visual_scores(attention), 2).tolist()


def test_straight_through_leaves_values_and_sends_gradient_to_scores():
    torch.manual_seed(2)
    config = CompressorConfig(tokens_per_slice=3)
    fused = torch.randn(1, 6, 4, requires_grad=True)
    ins = torch.randn(1, 4, requires_grad=True)
    attention = torch.rand(1, 6)
    plain = VisualNativeSelection(CompressorConfig(tokens_per_slice=3, native_gradient="none"))
    st = VisualNativeSelection(config)
    torch.testing.assert_close(st(fused, ins, attention).tokens, plain(fused, ins, attention).tokens)
    st(fused, ins, attention).tokens.sum().backward()
    assert ins.grad is not None and ins.grad.abs().sum() > 0     # only reachable through NS
    ins.grad = None
    out = plain(fused, ins, attention).tokens.sum()
    out.backward()
    assert ins.grad is None


def test_keep_all_mode_keeps_every_token_in_order():
    selection = VisualNativeSelection(CompressorConfig(tokens_per_slice=None))
    fused = torch.randn(2, 5, 3)
    out = selection(fused, torch.randn(2, 3), torch.rand(2, 5))
    assert torch.equal(out.tokens, fused) and out.indices.tolist() == [list(range(5))] * 2
