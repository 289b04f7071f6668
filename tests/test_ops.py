"""Tests for meteor.model.ops: every selective-scan path equals the reference on outputs and all gradients.

The C++ kernel is compiled on first use for each instruction set (about 30 s each, once per Python
environment, cached afterwards); a build failure makes these tests fail rather than skip, because auto
mode would then silently be slow. Every instruction-set build this CPU can run is tested (on an AVX-512
machine: avx512, avx2 and default; on an AVX2-only CI machine the avx512 cases are skipped and say so).
Build-cache and selection tests are in test_scan_build.py.
"""

import importlib
import warnings

import pytest
import torch

from meteor.model import ops
from meteor.model.ops import _build, scan_backend, scan_isa, selective_scan, selective_scan_ref

scan_module = importlib.import_module("meteor.model.ops.selective_scan")  # the package attribute is the function

OPTIONAL = ("D", "z", "delta_bias")
# The pure-PyTorch loop, and the C++ kernel built for each instruction set (forced with METEOR_SCAN_ISA).
FAST_PATHS = ("torch", *(f"cpp-{isa}" for isa in _build.ISAS))
LANES = {"avx512": 16, "avx2": 8}


def make_inputs(batch=2, dim=16, dstate=16, length=70, groups=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    bc_shape = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
    return {
        "u": randn(batch, dim, length),
        "delta": randn(batch, dim, length) * 0.5,
        # Mamba's A is negative; a few channels with small |A| keep long memories in the test.
        "A": -(torch.rand(dim, dstate, generator=gen) * 2 + 0.05).to(dtype),
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(dim),
        "z": randn(batch, dim, length),
        "delta_bias": randn(dim) * 0.3,
    }


def run(fn, inputs, use=OPTIONAL, delta_softplus=True, return_last_state=False, grad=True):
    """Output, last state and the gradients of a fixed random projection of both."""
    if not delta_softplus:  # without softplus the step must already be positive, or the state explodes
        inputs = dict(inputs, delta=inputs["delta"].abs(), delta_bias=inputs["delta_bias"].abs())
    leaves = {k: v.clone().requires_grad_(grad) for k, v in inputs.items() if k not in OPTIONAL or k in use}
    result = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves.get("D"),
                z=leaves.get("z"), delta_bias=leaves.get("delta_bias"), delta_softplus=delta_softplus,
                return_last_state=return_last_state)
    out, last = result if return_last_state else (result, None)
    if not grad:
        return out, last, {}
    gen = torch.Generator().manual_seed(1)
    loss = (out.float() * torch.randn(out.shape, generator=gen)).sum()
    if last is not None:
        loss = loss + (last * torch.randn(last.shape, generator=gen)).sum()
    loss.backward()
    return out.detach(), None if last is None else last.detach(), {k: v.grad for k, v in leaves.items()}


def assert_close(name, got, want, rel=2e-5):
    # Relative to the tensor's scale: the scan's outputs and gradients span several orders of magnitude.
    scale = want.abs().max().clamp_min(1e-6)
    err = (got.float() - want.float()).abs().max()
    assert err <= rel * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g} (tolerance {rel:g})"


def assert_paths_equal(got, want, rel=2e-5):
    assert_close("out", got[0], want[0], rel)
    if want[1] is not None:
        assert_close("last_state", got[1], want[1], rel)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        assert_close(f"grad {name}", got[2][name], want[2][name], rel)


@pytest.fixture(params=FAST_PATHS)
def fast_path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv(ops.ENV_VAR, "torch")
        return request.param
    isa = request.param.removeprefix("cpp-")
    if isa not in _build.cpu_isas():
        pytest.skip(f"this CPU ({_build.cpu_name()}) cannot run the {isa} build: it runs "
                    f"{', '.join(_build.cpu_isas())}")
    monkeypatch.setenv(ops.ENV_VAR, "cpp")
    monkeypatch.setenv(ops.ISA_ENV_VAR, isa)
    kernels = _build.build_extension()
    assert scan_isa("cpu") == kernels.isa == isa  # the forced build is the one that runs
    if isa in LANES:
        assert kernels.lanes == LANES[isa]
    return request.param


# (batch, dim, N, L, groups): L = 70 and 129 span 2 and 3 checkpoint chunks with ragged ends; L = 1 and
# L = 64 are the edges; no L but 64 is a multiple of the 8 or 16 lanes' transposes. dim 24, 20 and 36
# are not multiples of 16 (20 not of 8 either): blocks narrower than a vector. N = 5 and 20 run the
# generic loop (20: two lane-sum groups, the second padded); N = 8 and 4 are narrower than AVX-512's
# lane-sum tree. Grouped B/C: 2 groups of 16 channels, 3 groups of 12, 2 groups of 20.
SHAPES = [(2, 16, 16, 70, None), (2, 24, 5, 33, None), (1, 32, 8, 1, None), (2, 8, 4, 64, None),
          (1, 16, 16, 129, None), (2, 32, 16, 40, 2), (1, 20, 16, 37, None), (2, 36, 16, 19, 3),
          (1, 40, 20, 67, 2)]
# Each optional argument alone, all, none; softplus on and off; with and without the last state.
OPTION_SETS = [(OPTIONAL, True, True), ((), False, False), (("D",), True, False), (("z",), False, True),
               (("delta_bias",), True, True), (OPTIONAL, False, False)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-d{}-n{}-L{}-g{}".format(*s))
def test_fast_paths_match_reference(fast_path, shape):
    batch, dim, dstate, length, groups = shape
    inputs = make_inputs(batch, dim, dstate, length, groups)
    for use, softplus, last in OPTION_SETS:
        want = run(selective_scan_ref, inputs, use, softplus, last)
        got = run(selective_scan, inputs, use, softplus, last)
        assert_paths_equal(got, want)


def test_no_grad_forward_matches(fast_path):
    inputs = make_inputs(length=45)
    with torch.no_grad():
        got = run(selective_scan, inputs, return_last_state=True, grad=False)
    want = run(selective_scan_ref, inputs, return_last_state=True, grad=False)
    assert_paths_equal(got, want)


def test_steps_large_enough_to_underflow_the_decay(fast_path):
    # dt * A * log2(e) below -126 (the decay exp(dt A) underflows to ~0): the AVX2 build's exp then
    # takes its clamped version, the others saturate by construction; all must match the reference.
    inputs = make_inputs(batch=1, dim=24, length=45)
    inputs["delta"] = inputs["delta"].abs() * 20 + 60  # dt in [60, ~100], A in [-2.05, -0.05]
    got = run(selective_scan, inputs, use=("D", "z"), delta_softplus=False, return_last_state=True)
    want = run(selective_scan_ref, inputs, use=("D", "z"), delta_softplus=False, return_last_state=True)
    assert_paths_equal(got, want)


def test_half_precision_inputs_are_upcast(fast_path):
    inputs = make_inputs(length=20, dtype=torch.bfloat16)
    got = run(selective_scan, inputs)
    want = run(selective_scan_ref, inputs)
    assert got[0].dtype == torch.bfloat16
    assert all(got[2][k].dtype == torch.bfloat16 for k in got[2])
    assert_close("out", got[0], want[0], rel=1e-2)  # both compute in float32; bf16 rounding of out only


def test_torch_loop_gradcheck_float64(monkeypatch):
    # The hand-derived backward of the checkpointed algorithm, checked against finite differences.
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    monkeypatch.setattr(scan_module, "CHECKPOINT_INTERVAL", 2)  # L = 5: three chunks, ragged end
    inputs = make_inputs(batch=1, dim=2, dstate=3, length=5, dtype=torch.float64)
    args = [inputs[k].requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]

    def fn(*a):
        return selective_scan(*a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(fn, args)


def test_reference_gradcheck_float64():
    inputs = make_inputs(batch=1, dim=2, dstate=3, length=4, dtype=torch.float64)
    args = [inputs[k].requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    assert torch.autograd.gradcheck(
        lambda *a: selective_scan_ref(*a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=True), args)


def test_reference_matches_closed_form_single_step():
    # L = 1 from h_0 = 0: h_1 = dt B u, y = dt u (B . C), by hand.
    inputs = make_inputs(batch=1, dim=3, dstate=4, length=1)
    u, delta, B, C = inputs["u"], inputs["delta"], inputs["B"], inputs["C"]
    out = selective_scan_ref(u, delta, inputs["A"], B, C)
    expected = delta[0, :, 0] * u[0, :, 0] * (B[0, :, 0] * C[0, :, 0]).sum()
    torch.testing.assert_close(out[0, :, 0], expected)


@pytest.mark.parametrize("mode, backend", [("reference", "reference"), ("torch", "torch-loop"), ("cpp", "cpu-cpp")])
def test_backend_follows_environment(monkeypatch, mode, backend):
    monkeypatch.setenv(ops.ENV_VAR, mode)
    assert scan_backend("cpu") == backend
    assert scan_isa("cpu") == (_build.selected_isa() if mode == "cpp" else None)


def test_auto_uses_cpp_on_cpu_with_the_best_build_the_cpu_runs(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    monkeypatch.delenv(ops.ISA_ENV_VAR, raising=False)
    assert scan_backend(torch.device("cpu")) == "cpu-cpp"
    best = _build.cpu_isas()[0]
    torch_choice = _build.torch_isa()  # no higher than torch's own choice (ATEN_CPU_CAPABILITY lowers it)
    expected = best if _build.ISAS.index(best) >= _build.ISAS.index(torch_choice) else torch_choice
    assert scan_isa("cpu") == expected == _build.build_extension().isa
    print(f"auto runs the {expected} build on this CPU ({_build.cpu_name()}; runnable: "
          f"{', '.join(_build.cpu_isas())})")


def test_invalid_mode_and_cpp_on_cuda_raise(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="METEOR_SELECTIVE_SCAN='fastest' is not one of"):
        scan_backend("cpu")
    monkeypatch.setenv(ops.ENV_VAR, "cpp")
    with pytest.raises(ValueError, match="CPU kernel but the tensors are on cuda"):
        scan_backend("cuda")


def test_failed_build_falls_back_once_under_auto_and_raises_when_forced(monkeypatch):
    def broken_build(verbose=False, isa=None):
        raise RuntimeError("Error building extension\nselective_scan.cpp:1:1: error: simulated failure")

    monkeypatch.setattr(scan_module, "build_extension", broken_build)
    monkeypatch.setattr(scan_module, "_warned", set())
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    with pytest.warns(RuntimeWarning, match="simulated failure"):
        assert scan_backend("cpu") == "torch-loop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must not warn again
        assert scan_backend("cpu") == "torch-loop"
    monkeypatch.setenv(ops.ENV_VAR, "cpp")
    with pytest.raises(RuntimeError, match="failed to build: .*simulated failure"):
        scan_backend("cpu")


def _with(inputs, **changes):
    merged = dict(inputs, **changes)
    return (merged["u"], merged["delta"], merged["A"], merged["B"], merged["C"]), {k: merged[k] for k in OPTIONAL}


@pytest.mark.parametrize("change, error, match", [
    (lambda i: dict(u=i["u"][0]), ValueError, r"u must be \(batch, d_inner, L\), got shape \(16, 70\)"),
    (lambda i: dict(delta=i["delta"][:, :, :69]), ValueError, r"delta has shape \(2, 16, 69\) but u has \(2, 16, 70\)"),
    (lambda i: dict(A=i["A"][:15]), ValueError, r"A must be \(d_inner, N\) with d_inner = 16"),
    (lambda i: dict(B=i["B"][:, :8], C=i["C"][:, :8]), ValueError, r"size 8 in dimension -2 but N \(from A\) is 16"),
    (lambda i: dict(B=i["B"][..., :60], C=i["C"][..., :60]), ValueError, r"size 60 in dimension -1 but L"),
    (lambda i: dict(C=i["C"][:1]), ValueError, r"C has shape \(1, 16, 70\) but B has \(2, 16, 70\)"),
    (lambda i: dict(B=i["B"][:, None].expand(2, 3, 16, 70), C=i["C"][:, None].expand(2, 3, 16, 70)),
     ValueError, "d_inner = 16 is not divisible by the 3 groups"),
    (lambda i: dict(D=i["D"][:4]), ValueError, r"D must be \(d_inner,\) = \(16,\), got shape \(4,\)"),
    (lambda i: dict(u=i["u"][..., :0], delta=i["delta"][..., :0], B=i["B"][..., :0], C=i["C"][..., :0],
                    z=i["z"][..., :0]), ValueError, "L = 0"),
    (lambda i: dict(u=i["u"].long()), TypeError, "u must be floating point, got torch.int64"),
    (lambda i: dict(A=torch.complex(i["A"], i["A"])), TypeError, "A is complex"),
    (lambda i: dict(B=i["B"][0, 0]), ValueError, r"B must be \(batch, N, L\) or \(batch, G, N, L\)"),
])
@pytest.mark.parametrize("fn", [selective_scan, selective_scan_ref], ids=["dispatch", "reference"])
def test_bad_inputs_raise_clear_errors(monkeypatch, fn, change, error, match):
    monkeypatch.setenv(ops.ENV_VAR, "cpp")
    inputs = make_inputs()
    args, kwargs = _with(inputs, **change(inputs))
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


def test_cpp_refuses_float64_with_advice(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "cpp")
    args, kwargs = _with(make_inputs(dtype=torch.float64))
    with pytest.raises(TypeError, match="METEOR_SELECTIVE_SCAN=torch"):
        selective_scan(*args, **kwargs)


def test_channel_contiguous_operands_are_read_in_place(fast_path):
    # A Mamba block hands over delta and z as transposed (batch, L, d_inner) tensors; dout may come
    # back in that layout too. The kernel reads them without copies and must give the same answers.
    inputs = make_inputs(dim=24, length=70)
    transposed = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") else v)
                  for k, v in inputs.items()}
    assert transposed["delta"].stride(1) == 1
    assert_paths_equal(run(selective_scan, transposed, return_last_state=True),
                       run(selective_scan_ref, inputs, return_last_state=True))
