"""The bidirectional Mamba-1 block (meteor/projectors/top_down/mamba.py), held to a slow step-by-step reference.

The reference below is written from mamba.py's documented math, in plain PyTorch with a Python loop
over time steps and the library's nn.Conv1d: it shares no code with the module's channels-last
convolution or the selective-scan kernels, so agreement checks both.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from meteor.model.configuration import CompressorConfig
from meteor.model.projectors.top_down.mamba import BiMamba, FusionLayer, ScanDirection, causal_depthwise_conv

WIDTH, D_STATE, EXPAND, D_CONV, DT_RANK = 6, 3, 2, 3, 2


def _reference_direction(direction: ScanDirection, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """One Mamba-1 direction, step by step. x, z: (B, L, d_inner) → (B, L, d_inner).

    u = SiLU(causal depthwise conv(x)); Δ, B, C = split(x_proj(u)); Δ = softplus(dt_proj(Δ));
    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t; y_t = ⟨C_t, h_t⟩ + D u_t; out = y · SiLU(z)."""
    length = x.shape[1]
    conv = F.conv1d(x.transpose(1, 2), direction.conv1d.weight, direction.conv1d.bias,
                    padding=direction.conv1d.kernel_size[0] - 1, groups=x.shape[-1])
    u = F.silu(conv[..., :length].transpose(1, 2))                           # (B, L, d_inner)
    dt, b, c = torch.split(direction.x_proj(u), [direction.dt_rank, direction.d_state, direction.d_state], -1)
    delta = F.softplus(direction.dt_proj(dt))                                # (B, L, d_inner)
    a = -torch.exp(direction.A_log)                                          # (d_inner, N)
    h = x.new_zeros(x.shape[0], x.shape[-1], direction.d_state)              # (B, d_inner, N)
    outputs = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * a) * h + delta[:, t, :, None] * b[:, t, None, :] * u[:, t, :, None]
        y = (h * c[:, t, None, :]).sum(-1) + direction.D * u[:, t]           # (B, d_inner)
        outputs.append(y * F.silu(z[:, t]))
    return torch.stack(outputs, dim=1)                                       # (B, L, d_inner)


def _reference_block(block: BiMamba, hidden: torch.Tensor) -> torch.Tensor:
    """Eq. 1: the forward direction reads the sequence in order, the backward one reads it reversed
    and its outputs are put back in place; the two are averaged or concatenated."""
    x, z = block.in_proj(hidden).chunk(2, dim=-1)
    forward = _reference_direction(block.forward_scan, x, z)
    backward = _reference_direction(block.backward_scan, x.flip(1), z.flip(1)).flip(1)
    if block.direction_merge == "concat":
        merged = torch.cat([forward, backward], dim=-1)
    else:
        merged = (forward + backward) / 2
    return block.out_proj(merged)


def _block(direction_merge="mean", seed=0) -> BiMamba:
    """A tiny block with its dynamics made visible: the untrained Δ ≈ 0.001-0.1 barely carries any
    state, so Δ, A and D are set to random values where the recurrence clearly matters."""
    torch.manual_seed(seed)
    block = BiMamba(WIDTH, D_STATE, EXPAND, D_CONV, DT_RANK, direction_merge)
    with torch.no_grad():
        for direction in (block.forward_scan, block.backward_scan):
            direction.dt_proj.bias.uniform_(-1.0, 1.0)
            direction.A_log.add_(torch.randn_like(direction.A_log) * 0.3)
            direction.D.uniform_(0.5, 1.5)
    return block


@pytest.mark.parametrize("direction_merge", ["mean", "concat"])
@pytest.mark.parametrize("length", [1, 2, 7])
def test_block_equals_the_step_by_step_reference_forward_and_backward(direction_merge, length):
    block = _block(direction_merge)
    hidden = torch.randn(2, length, WIDTH, requires_grad=True)
    got = block(hidden)
    expected = _reference_block(block, hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(got)                         # an arbitrary loss, not a symmetric one
    wrt = [hidden, *block.parameters()]
    grads = torch.autograd.grad((got * weights).sum(), wrt)
    expected_grads = torch.autograd.grad((expected * weights).sum(), wrt)
    names = ["hidden", *(name for name, _ in block.named_parameters())]
    for name, g, e in zip(names, grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"∂/∂{n}: {m}")


def test_keep_returns_exactly_the_kept_positions_of_the_full_output():
    block = _block()
    hidden = torch.randn(2, 9, WIDTH)
    keep = [slice(1, 4, 2), slice(4, 5), slice(6, None, 2)]
    full = block(hidden)
    expected = torch.cat([full[:, part] for part in keep], dim=1)
    torch.testing.assert_close(block(hidden, keep), expected)


def test_forward_scan_is_causal_and_backward_scan_is_anti_causal():
    """With concat merging, zeroing half of the output projection leaves one direction alone.
    The forward scan must not see the future; the backward scan must not see the past."""
    hidden = torch.randn(1, 8, WIDTH)
    poked = hidden.clone()
    poked[0, 4] += torch.randn(WIDTH)
    d_inner = EXPAND * WIDTH
    for half, unchanged, changed in [(slice(d_inner, None), slice(0, 4), slice(4, None)),   # forward only
                                     (slice(0, d_inner), slice(5, None), slice(0, 5))]:     # backward only
        block = _block("concat")
        with torch.no_grad():
            block.out_proj.weight[:, half] = 0
        base, moved = block(hidden), block(poked)
        torch.testing.assert_close(moved[:, unchanged], base[:, unchanged], rtol=0, atol=0)
        assert ((moved[:, changed] - base[:, changed]).abs().amax(-1) > 1e-6).all()


@pytest.mark.parametrize("direction_merge", ["mean", "concat"])
def test_backward_scan_reads_the_sequence_reversed(direction_merge):
    """Swap the two directions' parameters (and, for concat, the halves of the output projection)
    and feed the reversed sequence: the output must be the original output reversed."""
    block = _block(direction_merge)
    swapped = _block(direction_merge)
    swapped.forward_scan.load_state_dict(block.backward_scan.state_dict())
    swapped.backward_scan.load_state_dict(block.forward_scan.state_dict())
    if direction_merge == "concat":
        with torch.no_grad():
            swapped.out_proj.weight.copy_(block.out_proj.weight.roll(EXPAND * WIDTH, dims=1))
    hidden = torch.randn(2, 7, WIDTH)
    torch.testing.assert_close(swapped(hidden.flip(1)), block(hidden).flip(1), rtol=1e-5, atol=1e-6)
    # With identical directions and mean merging the block is reversal-equivariant by itself.
    symmetric = _block("mean")
    symmetric.backward_scan.load_state_dict(symmetric.forward_scan.state_dict())
    torch.testing.assert_close(symmetric(hidden.flip(1)), symmetric(hidden).flip(1), rtol=1e-5, atol=1e-6)


def _parameters(width, d_state, expand, d_conv, dt_rank, merge):
    d_inner = expand * width
    per_direction = (d_inner * d_conv + d_inner                  # depthwise conv and its bias
                     + d_inner * (dt_rank + 2 * d_state)         # x_proj → Δ, B, C
                     + dt_rank * d_inner + d_inner               # dt_proj
                     + d_inner * d_state + d_inner)              # A_log, D
    merged = 2 * d_inner if merge == "concat" else d_inner
    return width * 2 * d_inner + 2 * per_direction + merged * width


@pytest.mark.parametrize("direction_merge", ["mean", "concat"])
def test_direction_merge_shapes_and_parameter_counts(direction_merge):
    block = _block(direction_merge)
    d_inner = EXPAND * WIDTH
    assert block.out_proj.in_features == (2 * d_inner if direction_merge == "concat" else d_inner)
    assert block(torch.randn(3, 5, WIDTH)).shape == (3, 5, WIDTH)
    assert sum(p.numel() for p in block.parameters()) == _parameters(WIDTH, D_STATE, EXPAND, D_CONV, DT_RANK,
                                                                     direction_merge)


def test_one_direction_costs_about_0_4m_parameters_at_clip_width():
    """The module docstring's figure: each direction's own conv, Δ/B/C projections, A and D."""
    with torch.device("meta"):
        direction = ScanDirection(2048, 16, 4, math.ceil(1024 / 16))
    assert sum(p.numel() for p in direction.parameters()) == 374_784


def test_initialisation_follows_mamba_1():
    """A = −(1..N) per channel (S4D-real), D = 1, and softplus(Δ bias) log-uniform in [1e-3, 1e-1]."""
    torch.manual_seed(0)
    direction = ScanDirection(d_inner=64, d_state=4, d_conv=4, dt_rank=2)
    assert torch.equal(-torch.exp(direction.A_log), -torch.arange(1.0, 5.0).expand(64, 4))
    assert torch.equal(direction.D, torch.ones(64))
    dt = F.softplus(direction.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert dt.log().std() > 0.5                     # spread over the log range, not one value


def test_untrained_fusion_layer_is_the_identity_plus_a_small_update():
    """FusionLayer is pre-norm residual: with a zero output projection it is exactly the identity,
    and the residual is added to the kept positions only."""
    layer = FusionLayer(CompressorConfig(vision_width=WIDTH, d_state=D_STATE, d_conv=D_CONV))
    hidden = torch.randn(2, 6, WIDTH)
    torch.testing.assert_close(layer(hidden), hidden + layer.mixer(layer.norm(hidden)), rtol=0, atol=0)
    torch.nn.init.zeros_(layer.mixer.out_proj.weight)
    assert torch.equal(layer(hidden), hidden)
    assert torch.equal(layer(hidden, [slice(0, 1), slice(3, None, 2)]), hidden[:, [0, 3, 5]])


@pytest.mark.parametrize("length", [1, 2, 7])
def test_channels_last_causal_conv_equals_nn_conv1d(length):
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


def test_causal_conv_without_bias_and_on_a_strided_view():
    """The block feeds it the x half of the input projection: a strided view, sometimes without bias."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(4, 4, 3, groups=4, padding=2, bias=False)
    xz = torch.randn(2, 5, 8)
    x = xz[..., :4]                                          # not contiguous
    expected = conv(x.transpose(1, 2))[..., :5].transpose(1, 2)
    torch.testing.assert_close(causal_depthwise_conv(x, conv.weight, None), expected)
