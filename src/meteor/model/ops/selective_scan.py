"""The Mamba-1 selective scan: a readable reference, fast paths, and the dispatch between them.

Same signature, shapes and semantics as ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``
(variable B/C):

    u, delta, z     (batch, d_inner, L)
    A               (d_inner, N)          real
    B, C            (batch, N, L)         or grouped (batch, G, N, L), channel d using group d // (d_inner / G)
    D, delta_bias   (d_inner,)

    delta = softplus(delta + delta_bias)                  (bias and softplus each optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = sum_n C_t[n] * h_t[n]
    out   = (y + D * u) * silu(z)                          (D and z optional)

``out`` has u's dtype; the scan computes in float32 (float64 when an input is float64, on the paths
that support it). With ``return_last_state`` the result is ``(out, h_L)``, h_L (batch, d_inner, N).

Paths (``scan_backend(device)`` names the one ``selective_scan`` takes on a device):
    "mamba_ssm-cuda"  CUDA tensors and mamba_ssm importable: its fused CUDA kernel.
    "cpu-cpp"         CPU: csrc/selective_scan.cpp, JIT-compiled on first use for the CPU's instruction
                      set (avx512, avx2 or default; ``scan_isa()`` says which, see _build.py).
    "torch-loop"      the same checkpointed algorithm in PyTorch: any device, slower; used when the
                      C++ build fails (with one warning) or on CUDA without mamba_ssm.
    "reference"       selective_scan_ref, the step-by-step loop under autograd.
Set ``METEOR_SELECTIVE_SCAN`` to ``auto`` (default), ``cpp``, ``torch`` or ``reference`` to force one;
a forced ``cpp`` that cannot build raises with the compiler's error instead of falling back. Set
``METEOR_SCAN_ISA`` to ``avx512``, ``avx2`` or ``default`` (alias ``scalar``) to force the cpu-cpp
path's instruction set; one this CPU cannot run raises, naming those it can.

The cpu-cpp path reads u, delta, z (and the incoming gradient) in place when they are contiguous or
channel-contiguous (transposed (batch, L, d_inner) tensors, as a Mamba block makes delta and z);
other layouts are copied. Its large outputs reuse a few idle blocks of memory from earlier calls,
because fresh 66 MB tensors cost ~9 ms each in page faults here; ``build_extension()
.release_cached_memory()`` hands those blocks back to the OS.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from meteor.model.ops._build import build_extension, error_gist, selected_isa

ENV_VAR = "METEOR_SELECTIVE_SCAN"
MODES = ("auto", "cpp", "torch", "reference")
# The fast paths store the state every CHECKPOINT_INTERVAL steps and recompute in between during the
# backward: (batch, d_inner, L / 64, N) floats kept instead of (batch, d_inner, L, N).
CHECKPOINT_INTERVAL = 64


# ------------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True)
class ScanShape:
    batch: int
    dim: int  # d_inner
    length: int  # L
    dstate: int  # N
    groups: int  # G (1 for B, C of shape (batch, N, L))


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> ScanShape:
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex():
            raise TypeError(f"selective_scan: {name} is complex ({t.dtype}); only real tensors are supported "
                            "(mamba's complex-A variant is not implemented)")
        if not t.is_floating_point():
            raise TypeError(f"selective_scan: {name} must be floating point, got {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"selective_scan: {name} is on {t.device} but u is on {u.device}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length < 1:
        raise ValueError("selective_scan: the sequence is empty (L = 0); pass at least one step")
    for name in ("delta", "z"):
        t = named[name]
        if t is not None and t.shape != u.shape:
            raise ValueError(f"selective_scan: {name} has shape {tuple(t.shape)} but u has {tuple(u.shape)}; "
                             "both must be (batch, d_inner, L)")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (d_inner, N) with d_inner = {dim} (from u), "
                         f"got shape {tuple(A.shape)}")
    dstate = A.shape[1]
    for name in ("D", "delta_bias"):
        t = named[name]
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"selective_scan: {name} must be (d_inner,) = ({dim},), got shape {tuple(t.shape)}")
    if B.dim() not in (3, 4):
        raise ValueError(f"selective_scan: B must be (batch, N, L) or (batch, G, N, L), got shape {tuple(B.shape)}"
                         " (time-invariant B of shape (d_inner, N) is not supported)")
    if C.shape != B.shape:
        raise ValueError(f"selective_scan: C has shape {tuple(C.shape)} but B has {tuple(B.shape)}; they must match")
    groups = B.shape[1] if B.dim() == 4 else 1
    for axis, got, want, what in ((0, B.shape[0], batch, "batch"), (-2, B.shape[-2], dstate, "N (from A)"),
                                  (-1, B.shape[-1], length, "L (from u)")):
        if got != want:
            raise ValueError(f"selective_scan: B and C have size {got} in dimension {axis} but {what} is {want}")
    if groups < 1 or dim % groups:
        raise ValueError(f"selective_scan: d_inner = {dim} is not divisible by the {groups} groups of B and C")
    return ScanShape(batch, dim, length, dstate, groups)


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_channel(x: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C at one step, (batch, N) or grouped (batch, G, N) → broadcastable against (batch, dim, N)."""
    if x.dim() == 2:
        return x[:, None, :]  # (b, 1, N)
    return x.repeat_interleave(dim // x.shape[1], dim=1)  # (b, d, N)


# ------------------------------------------------------------------------------------------------
# The reference: one step at a time, autograd for the gradients


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Readable per-step selective scan, the reference of truth for every other path.

    Shapes as in the module docstring: u, delta, z (batch, d_inner, L); A (d_inner, N); B, C
    (batch, N, L) or (batch, G, N, L); D, delta_bias (d_inner,). Returns out (batch, d_inner, L) in u's
    dtype, and the last state (batch, d_inner, N) if ``return_last_state``. Memory under autograd
    grows with L (a few (batch, d_inner, N) tensors per step).
    """
    shape = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]  # (b, d, L)
    if delta_softplus:
        delta = F.softplus(delta)  # (b, d, L)
    h = u.new_zeros(shape.batch, shape.dim, shape.dstate)  # (b, d, N)
    ys = []
    # unbind, not x[..., t]: the backward of indexing writes a full (b, d, L) zero tensor per step,
    # which makes the reference's backward quadratic in L (mamba_ssm's reference has that problem).
    for dt, u_t, B_t, C_t in zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        dt = dt[:, :, None]  # (b, d, 1)
        B_t = _per_channel(B_t, shape.dim)  # (b, d or 1, N)
        C_t = _per_channel(C_t, shape.dim)  # (b, d or 1, N)
        h = torch.exp(dt * A) * h + dt * B_t * u_t[:, :, None]  # (b, d, N)
        ys.append((h * C_t).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=-1)  # (b, d, L)
    out = y if D is None else y + D.to(dtype)[:, None] * u  # (b, d, L)
    if z is not None:
        out = out * F.silu(z.to(dtype))  # (b, d, L)
    out = out.to(out_dtype)
    return (out, h) if return_last_state else out


# ------------------------------------------------------------------------------------------------
# "torch-loop": the C++ kernel's algorithm (checkpoints + recompute) in PyTorch, same contract as
# csrc's forward/backward: B, C grouped (batch, G, N, L), everything contiguous in one float dtype.


def _chunk_of(X: torch.Tensor, t0: int, t1: int, dim: int) -> torch.Tensor:
    """B or C (b, G, N, L) at steps [t0, t1) → (b, d or 1, T, N)."""
    x = X[..., t0:t1].transpose(-1, -2)  # (b, G, T, N)
    return x if x.shape[1] == 1 else x.repeat_interleave(dim // x.shape[1], dim=1)


def _recompute_chunk(dt, u, A, B, h, t0, t1):
    """Decays a_t = exp(dt_t A) and states h_t for steps [t0, t1) from the state h before t0."""
    dt_c = dt[:, :, t0:t1, None]  # (b, d, T, 1)
    a = torch.exp(dt_c * A[:, None, :])  # (b, d, T, N)
    bu = dt_c * u[:, :, t0:t1, None] * _chunk_of(B, t0, t1, u.shape[1])  # (b, d, T, N)
    hs = torch.empty_like(a)
    for j in range(t1 - t0):
        h = torch.addcmul(bu[:, :, j], a[:, :, j], h)  # (b, d, N)
        hs[:, :, j] = h
    return a, hs


def _torch_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, save_checkpoints):
    x = delta if delta_bias is None else delta + delta_bias[:, None]  # (b, d, L)
    dt = F.softplus(x) if delta_softplus else x
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, N)
    y = torch.empty_like(u)
    checkpoints = []
    for t0 in range(0, u.shape[-1], chunk):
        t1 = min(t0 + chunk, u.shape[-1])
        checkpoints.append(h)
        _, hs = _recompute_chunk(dt, u, A, B, h, t0, t1)  # (b, d, T, N)
        h = hs[:, :, -1]
        y[:, :, t0:t1] = (hs * _chunk_of(C, t0, t1, u.shape[1])).sum(-1)
    out = y if D is None else y + D[:, None] * u
    if z is not None:
        out = out * F.silu(z)
    ckpt = torch.stack(checkpoints, dim=1) if save_checkpoints else u.new_empty(0)  # (b, chunks, d, N)
    return out, h, ckpt


def _torch_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, ckpt, dout, dlast):
    batch, dim, length = u.shape
    groups = B.shape[1]
    x = delta if delta_bias is None else delta + delta_bias[:, None]  # (b, d, L)
    dt = F.softplus(x) if delta_softplus else x
    gy = dout if z is None else dout * F.silu(z)  # dL/dy
    du = gy * D[:, None] if D is not None else torch.zeros_like(u)
    ddt, y = torch.empty_like(u), torch.empty_like(u)
    dA, dB, dC = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
    carry = dlast if dlast is not None else u.new_zeros(batch, dim, A.shape[1])  # a_{t+1} dL/dh_{t+1}
    for k in reversed(range(ckpt.shape[1])):
        t0, t1 = k * chunk, min((k + 1) * chunk, length)
        h0 = ckpt[:, k]  # (b, d, N)
        a, hs = _recompute_chunk(dt, u, A, B, h0, t0, t1)  # (b, d, T, N)
        hprev = torch.cat([h0[:, :, None], hs[:, :, :-1]], dim=2)  # (b, d, T, N)
        B_c, C_c = _chunk_of(B, t0, t1, dim), _chunk_of(C, t0, t1, dim)  # (b, d or 1, T, N)
        dt_c, u_c, gy_c = dt[:, :, t0:t1], u[:, :, t0:t1], gy[:, :, t0:t1]  # (b, d, T)
        y[:, :, t0:t1] = (hs * C_c).sum(-1)
        gyC = gy_c[..., None] * C_c  # (b, d, T, N)
        gh = torch.empty_like(a)  # dL/dh_t
        for j in reversed(range(t1 - t0)):
            carry = carry + gyC[:, :, j]
            gh[:, :, j] = carry
            carry = a[:, :, j] * carry
        q = gh * hprev * a  # dL/d(a_t) * a_t, (b, d, T, N)
        sb = (gh * B_c).sum(-1)  # (b, d, T)
        ddt[:, :, t0:t1] = (q * A[:, None, :]).sum(-1) + u_c * sb
        du[:, :, t0:t1] += dt_c * sb
        dA += (q * dt_c[..., None]).sum((0, 2))
        group_sum = lambda v: v.view(batch, groups, dim // groups, t1 - t0, -1).sum(2).transpose(-1, -2)
        dB[..., t0:t1] = group_sum(gh * (dt_c * u_c)[..., None])  # (b, G, N, T)
        dC[..., t0:t1] = group_sum(gy_c[..., None] * hs)
    dD = (gy * u).sum((0, 2)) if D is not None else None
    dz = None
    if z is not None:
        sz = torch.sigmoid(z)
        o = y if D is None else y + D[:, None] * u
        dz = dout * o * sz * (1 + z * (1 - sz))  # silu'(z) = s (1 + z (1 - s))
    ddelta = ddt * torch.sigmoid(x) if delta_softplus else ddt
    dbias = ddelta.sum((0, 2)) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias


_TORCH_LOOP = SimpleNamespace(forward=_torch_forward, backward=_torch_backward, simd="none")


# ------------------------------------------------------------------------------------------------
# Autograd over either fast path (cpu-cpp or torch-loop): both take and return the same tensors


def _sequence(t: torch.Tensor) -> torch.Tensor:
    """A (batch, d_inner, L) operand as the kernels read it: time-contiguous (a contiguous tensor) or
    channel-contiguous (a transposed (batch, L, d_inner) tensor, how a Mamba block makes delta and z)
    are taken as they are; anything else is copied."""
    return t if t.stride(-1) == 1 or t.stride(1) == 1 else t.contiguous()


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        save = any(ctx.needs_input_grad)
        out, last, ckpt = kernels.forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          CHECKPOINT_INTERVAL, save)
        ctx.kernels, ctx.delta_softplus = kernels, delta_softplus
        ctx.set_materialize_grads(False)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        dout = torch.zeros_like(u) if dout is None else _sequence(dout)
        dlast = None if dlast is None else dlast.contiguous()
        grads = ctx.kernels.backward(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus,
                                     CHECKPOINT_INTERVAL, ckpt, dout, dlast)
        return (None, *grads, None)


# ------------------------------------------------------------------------------------------------
# Dispatch

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r} is not one of {', '.join(MODES)}")
    return mode


def scan_backend(device: torch.device | str) -> str:
    """Name of the path ``selective_scan`` takes for tensors on ``device`` (see the module docstring).

    On CPU under ``auto`` this builds the C++ extension if it is not built yet (about 30 s the first
    time in an environment, cached afterwards). Raises when ``METEOR_SCAN_ISA`` names an instruction
    set this CPU cannot run (also under ``auto``: a forced choice is never silently replaced).
    """
    device = torch.device(device)
    mode = _mode()
    if mode == "reference":
        return "reference"
    if mode == "torch":
        return "torch-loop"
    if mode == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{ENV_VAR}=cpp forces the CPU kernel but the tensors are on {device}; "
                             f"unset it or use {ENV_VAR}=torch")
        isa = selected_isa()
        try:
            build_extension(isa=isa)
        except Exception as exc:
            raise RuntimeError(f"{ENV_VAR}=cpp but the CPU selective-scan kernel ({isa}) failed to build: "
                               f"{error_gist(exc)}\n(full error above; unset {ENV_VAR} to fall back to the "
                               "pure-PyTorch loop)") from exc
        return "cpu-cpp"
    if device.type == "cuda" and importlib.util.find_spec("mamba_ssm") is not None:
        return "mamba_ssm-cuda"
    if device.type == "cpu":
        isa = selected_isa()
        try:
            build_extension(isa=isa)
            return "cpu-cpp"
        except Exception as exc:
            _warn_once("cpp", f"meteor.model.ops: the CPU selective-scan kernel ({isa}) failed to build, using the "
                              f"slower pure-PyTorch loop instead. Compiler said: {error_gist(exc)}. "
                              f"Set {ENV_VAR}=cpp to see the full error.")
            return "torch-loop"
    _warn_once(f"torch-{device.type}", f"meteor.model.ops: no fused selective scan for {device.type} tensors "
                                       "(mamba_ssm is not installed): using the pure-PyTorch loop")
    return "torch-loop"


def scan_isa(device: torch.device | str = "cpu") -> str | None:
    """The instruction set of the kernel ``selective_scan`` runs on ``device`` ("avx512", "avx2" or
    "default"), or None when the path taken is not the CPU kernel (``scan_backend`` names it).
    ``METEOR_SCAN_ISA`` forces one; see _build.py."""
    return selected_isa() if scan_backend(device) == "cpu-cpp" else None


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """Selective scan on the fastest available path; a drop-in for mamba_ssm's ``selective_scan_fn``.

    u, delta, z: (batch, d_inner, L); A: (d_inner, N); B, C: (batch, N, L) or (batch, G, N, L);
    D, delta_bias: (d_inner,). Returns out (batch, d_inner, L) in u's dtype, and the last state
    (batch, d_inner, N) if ``return_last_state``. Gradients flow to every tensor argument.
    ``scan_backend(u.device)`` says which path runs (``scan_isa()``: which CPU instruction set);
    ``METEOR_SELECTIVE_SCAN`` and ``METEOR_SCAN_ISA`` force them.
    """
    backend = scan_backend(u.device)
    args = (u, delta, A, B, C, D, z, delta_bias)
    if backend == "reference":
        return selective_scan_ref(*args, delta_softplus, return_last_state)
    _check_inputs(*args)
    if backend == "mamba_ssm-cuda":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(*args, delta_softplus, return_last_state)
    dtype = _compute_dtype(*args)
    if backend == "cpu-cpp":
        if dtype == torch.float64:
            raise TypeError(f"selective_scan: the cpu-cpp kernel computes in float32 and float64 inputs would "
                            f"lose precision silently; pass float32/bfloat16/float16, or set {ENV_VAR}=torch "
                            "(or reference) for a float64 scan")
        kernels = build_extension()
    else:
        kernels = _TORCH_LOOP
    return scan_with(kernels, *args, delta_softplus=delta_softplus, return_last_state=return_last_state, dtype=dtype)


def scan_with(kernels, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
              return_last_state=False, dtype=torch.float32):
    """``selective_scan`` on given kernels (a module from ``_build.load_isa``, or another build with
    the same ``forward``/``backward`` contract), inputs already validated; computes in ``dtype``.
    ``selective_scan`` calls it; benchmarks call it to time one build against another."""

    def prepared(t):
        return None if t is None else t.to(dtype).contiguous()

    grouped = [X if X.dim() == 4 else X.unsqueeze(1) for X in (B, C)]  # (b, G, N, L)
    out, last = _SelectiveScanFn.apply(kernels, _sequence(u.to(dtype)), _sequence(delta.to(dtype)), prepared(A),
                                       prepared(grouped[0]), prepared(grouped[1]), prepared(D),
                                       None if z is None else _sequence(z.to(dtype)), prepared(delta_bias),
                                       bool(delta_softplus))
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out
