"""A cost model of LLaVA-Meteor and its baselines: FLOPs, bytes and allocations of every stage, from
the configurations and the token counts alone (no tensors, no torch).

Conventions, once:

* A multiply-add is 2 FLOPs: a (M×K)·(K×N) product is 2·M·K·N.
* Attention over query i and key j is one *pair*, 4·h·d FLOPs (q·k and p·v for h heads of width d);
  the softmax runs inside the fused kernel and is part of its measured rate. Causal attention counts
  the pairs a causal kernel computes, the lower triangle (T(T+1)/2 for a prompt of T): half of the
  square. ``causal=False`` counts the whole square, as eager attention (or SDPA given an explicit
  mask) computes it and as ``torch.utils.flop_counter`` counts it.
* Bytes are each op's traffic as PyTorch runs it unfused: inputs read once, outputs written once
  (a matmul's weights once per call, however many tokens share them; ``addmm`` also copies the bias
  into its output first). Element-wise ops count their passes over memory.
* ``outputs`` are the sizes of the tensors an op allocates. On a CPU with glibc, blocks over 32 MiB
  are mapped fresh from the OS at every allocation, and their first touch (page faults) is slower
  than the write itself; ``Rates.fresh`` prices that.

An op's time is max(FLOPs / its compute rate, bytes / its stream rate, exp-like evaluations / the
transcendental rate) + fresh-page time: a roofline per op, each op either compute-, memory- or
transcendental-bound. On a CPU a matrix product first packs its weight operand into the BLAS's
blocked layout, a pass over the weights that does not overlap the arithmetic: its time
(``Op.packed`` bytes at ``Rates.pack``) adds to the compute time. That pass does not shrink with the
rows, so a product of few rows (a short prompt) runs below the rate of a large one. ``Rates`` holds
the machine's ceilings (the benchmark measures each with one micro-benchmark in the same run);
``Rates.roofline(peak, bandwidth)`` is the plain two-number model.

The counts follow the code that runs: CLIP's vision layers as transformers writes them (pre-norm,
four projections with bias, quick-GELU MLP), LLaMA's decoder layers (RMSNorm in float32,
grouped-query attention, rotary embeddings, SwiGLU's three matrices, the KV cache grown by
``torch.cat`` as ``DynamicCache`` does, so each decode step copies it), ``meteor.fusion`` and
``meteor.mamba`` (the last Mamba layer projects only the kept positions), ``meteor.model.projectors``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterable, Literal, Sequence

Kind = Literal["matmul", "matvec", "attention", "elementwise", "scan"]
Stage = Literal[1, 2]
Grid = tuple[int, int]

SCAN_FLOPS = 9
"""FLOPs per (batch, channel, step, state) of the Mamba-1 selective scan (exp(Δ·A), the state update
h = a·h + Δ·B·u, and C·h), as ``benchmarks/bench_scan.py`` counts its floor."""

MATVEC_ROWS = 4
"""A product with at most this many rows streams its weights once per row block: a matrix-vector
product (decoding), priced by ``Rates.matvec``."""

FP32 = 4
MIB = 1 << 20


@dataclass(frozen=True)
class Rates:
    """A machine's ceilings, per second, in one dtype. Only ``matmul`` and ``bandwidth`` are needed;
    each other ceiling left None falls back to them (or, for ``transcendental`` and ``fresh``, costs
    nothing)."""

    matmul: float
    """FLOP/s of a large matrix product (of its arithmetic alone where ``pack`` prices the weight
    pass)."""
    bandwidth: float
    """Bytes/s of a large copy into existing memory (read + write counted)."""
    attention: float | None = None
    """FLOP/s (4·h·d per pair) of the fused attention kernel."""
    matvec: float | None = None
    """Bytes/s of weights streamed by a product of one row (the decode step's products)."""
    transcendental: float | None = None
    """Elements/s of an exp-like function (sigmoid) into existing memory."""
    scan: float | None = None
    """FLOP/s (``SCAN_FLOPS`` per state) of the selective-scan kernel."""
    fresh: float | None = None
    """Bytes/s of first writes to newly mapped memory (page faults); None where freed memory is
    reused (a GPU's caching allocator)."""
    fresh_threshold: float = 32 * MIB
    """Allocations above this size are mapped fresh (glibc's largest mmap threshold on 64-bit)."""
    pack: float | None = None
    """Bytes/s at which a product packs its weight operand before computing (a CPU BLAS), added to
    its compute time; None where the weights stream while the arithmetic runs (a GPU) and in the
    plain roofline."""

    @classmethod
    def roofline(cls, matmul: float, bandwidth: float) -> "Rates":
        return cls(matmul=matmul, bandwidth=bandwidth)

    def __post_init__(self) -> None:
        for name in ("matmul", "bandwidth", "attention", "matvec", "transcendental", "scan", "fresh", "pack"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Rates.{name} must be positive (per second), got {value}")


@dataclass(frozen=True)
class Op:
    """One kernel call (``calls`` of them), with what it computes, moves and allocates per call."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    kind: Kind = "elementwise"
    transcendentals: float = 0.0
    outputs: tuple[float, ...] = ()
    calls: float = 1.0
    packed: float = 0.0
    """Bytes of the weight operand a product packs before computing (``matmul`` ops)."""

    def seconds(self, rates: Rates) -> float:
        compute_rate = {"attention": rates.attention, "scan": rates.scan}.get(self.kind) or rates.matmul
        stream_rate = rates.matvec if self.kind == "matvec" and rates.matvec else rates.bandwidth
        special = self.transcendentals / rates.transcendental if rates.transcendental else 0.0
        compute = self.flops / compute_rate
        if rates.pack and self.kind == "matmul":
            compute += self.packed / rates.pack
        fresh = 0.0
        if rates.fresh:
            fresh = sum(size for size in self.outputs if size > rates.fresh_threshold) / rates.fresh
        return self.calls * (max(compute, self.bytes / stream_rate, special) + fresh)

    def times(self, factor: float, suffix: str = "") -> "Op":
        return replace(self, name=self.name + suffix, calls=self.calls * factor)


@dataclass(frozen=True)
class Cost:
    """The ops of one stage (or several)."""

    ops: tuple[Op, ...] = ()

    @property
    def flops(self) -> float:
        return sum(op.flops * op.calls for op in self.ops)

    @property
    def bytes(self) -> float:
        return sum(op.bytes * op.calls for op in self.ops)

    @property
    def matmul_flops(self) -> float:
        """FLOPs of products and attention: what ``torch.utils.flop_counter`` counts."""
        return sum(op.flops * op.calls for op in self.ops if op.kind in ("matmul", "matvec", "attention"))

    def seconds(self, rates: Rates) -> float:
        """The predicted time on a machine with these ceilings: Σ over ops of each op's roofline."""
        return sum(op.seconds(rates) for op in self.ops)

    def scaled(self, factor: float, suffix: str = "") -> "Cost":
        """Every op run ``factor`` times as often (the layers of a model, a backward pass)."""
        return Cost(tuple(op.times(factor, suffix) for op in self.ops))

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.ops + other.ops)

    def by_kind(self) -> dict[str, float]:
        """FLOPs per kind of op."""
        totals: Counter = Counter()
        for op in self.ops:
            totals[op.kind] += op.flops * op.calls
        return dict(totals)


def total(costs: Iterable[Cost]) -> Cost:
    out = Cost()
    for cost in costs:
        out = out + cost
    return out


def _matmul(name: str, m: float, k: float, n: float, itemsize: int) -> Op:
    """(m×k)·(k×n) into a new (m×n), the (k×n) operand a weight: reads both operands once, writes
    the product, packs the weight (a product of more than ``MATVEC_ROWS`` rows)."""
    out = m * n * itemsize
    return Op(name, 2.0 * m * k * n, (m * k + k * n) * itemsize + out,
              "matvec" if m <= MATVEC_ROWS else "matmul", outputs=(out,), packed=k * n * itemsize)


def _linear(name: str, m: float, k: float, n: float, itemsize: int) -> list[Op]:
    """``nn.Linear`` with a bias: ``addmm`` first copies the bias into every row of the new output (a
    separate memory-bound pass), then the product accumulates onto it (reading it once more)."""
    product = _matmul(name, m, k, n, itemsize)
    out = m * n * itemsize
    return [Op(name + "_bias", 0.0, out, outputs=(out,)),
            replace(product, bytes=product.bytes + out, outputs=())]


def _pointwise(name: str, elements: float, itemsize: int, reads: float = 1, writes: float = 1,
               new: float | None = None, flops: float = 1, exp: bool = False) -> Op:
    """An element-wise op over ``elements``: ``reads`` and ``writes`` passes at ``itemsize``, ``new``
    of the written tensors freshly allocated (default: all of them; 0 for in-place ops)."""
    new = writes if new is None else new
    size = elements * itemsize
    outputs = (size,) * int(new) + ((size * (new - int(new)),) if new != int(new) else ())
    return Op(name, flops * elements, (reads + writes) * size, "elementwise",
              transcendentals=elements if exp else 0.0, outputs=outputs)


def _attention(name: str, heads: int, head_dim: int, kv_heads: int, queries: float, keys: float,
               pairs: float, itemsize: int) -> Op:
    """One fused attention call: reads Q, K and V (``kv_heads`` of them), writes a new O."""
    out = queries * heads * head_dim * itemsize
    traffic = 2 * out + 2.0 * keys * kv_heads * head_dim * itemsize
    return Op(name, 4.0 * head_dim * heads * pairs, traffic, "attention", outputs=(out,))


def causal_pairs(new_tokens: int, context: int) -> int:
    """Query-key pairs of causal attention for ``new_tokens`` queries appended to a cache holding
    ``context`` keys in all after them: a prompt of T (new = context = T) has T(T+1)/2; one decode
    step has ``context``."""
    if not 0 < new_tokens <= context:
        raise ValueError(f"need 0 < new_tokens ≤ context, got {new_tokens} new of {context}")
    past = context - new_tokens
    return new_tokens * past + new_tokens * (new_tokens + 1) // 2


# --- shapes ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlmShape:
    """The widths of a LLaMA-family decoder (Vicuna is LLaMA)."""

    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    layers: int
    head_dim: int = 0
    """0 means hidden / heads."""
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @classmethod
    def from_config(cls, config) -> "LlmShape":
        """From a transformers ``LlamaConfig`` (or any config with its field names)."""
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(hidden=config.hidden_size, heads=config.num_attention_heads, kv_heads=kv,
                   ffn=config.intermediate_size, vocab=config.vocab_size, layers=config.num_hidden_layers,
                   head_dim=getattr(config, "head_dim", None) or 0,
                   tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def params_per_layer(self) -> int:
        d, a, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return d * a + 2 * d * kv + a * d + 3 * d * self.ffn + 2 * d

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.params_per_layer + embeddings + self.hidden


VICUNA_13B = LlmShape(hidden=5120, heads=40, kv_heads=40, ffn=13824, vocab=32000, layers=40)
"""Vicuna-13B (LLaMA-2-13B widths; no grouped-query attention)."""

VICUNA_7B = LlmShape(hidden=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000, layers=32)
"""Vicuna-7B (LLaMA-2-7B widths)."""


@dataclass(frozen=True)
class VisionShape:
    """The widths of a CLIP ViT vision tower and how many of its layers run."""

    hidden: int
    heads: int
    ffn: int
    patch: int
    layers_run: int
    channels: int = 3

    @classmethod
    def from_config(cls, config, layers_run: int | None = None) -> "VisionShape":
        """From a transformers ``CLIPVisionConfig``; ``layers_run`` defaults to every layer (a
        ``meteor.model.vision.VisionTower`` runs ``num_layers_run`` of them: 23 of 24 by default)."""
        return cls(hidden=config.hidden_size, heads=config.num_attention_heads, ffn=config.intermediate_size,
                   patch=config.patch_size, channels=config.num_channels,
                   layers_run=config.num_hidden_layers if layers_run is None else layers_run)


CLIP_VIT_L_336 = VisionShape(hidden=1024, heads=16, ffn=4096, patch=14, layers_run=23)
"""CLIP ViT-L/14-336 as the vision tower runs it: features and CLS attention from layer 23 of 24."""


# --- the LLM ---------------------------------------------------------------------------------------------


def _rms_norm(name: str, rows: float, width: int, itemsize: int) -> Op:
    """transformers' LlamaRMSNorm: upcast to float32, square, mean, scale by the root, downcast,
    times the weight; every step a new tensor."""
    e = rows * width
    if itemsize == FP32:   # the casts are no-ops: square, scale, weight
        return Op(name, 4 * e, 7 * e * FP32, outputs=(e * FP32,) * 3)
    b = itemsize
    return Op(name, 4 * e, e * (b + 4 + 8 + 4 + 8 + 4 + b + 2 * b),
              outputs=(e * FP32, e * FP32, e * FP32, e * b, e * b))


def llm_layer(shape: LlmShape, new_tokens: int, context: int, itemsize: int, causal: bool = True) -> Cost:
    """One decoder layer for ``new_tokens`` tokens appended to a KV cache that holds ``context``
    tokens after them (a prompt: new_tokens = context; a decode step: new_tokens = 1)."""
    t, d, f, b = new_tokens, shape.hidden, shape.ffn, itemsize
    a, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    pairs = causal_pairs(t, context) if causal else t * context
    rotated = t * (a + kv)
    return Cost((
        _rms_norm("input_norm", t, d, b),
        _matmul("q_proj", t, d, a, b), _matmul("k_proj", t, d, kv, b), _matmul("v_proj", t, d, kv, b),
        # q·cos + cat(−x₂, x₁)·sin for q and k: neg (half), cat, two products, a sum
        Op("rotary", 6 * rotated, 10 * rotated * b, outputs=tuple(rotated * b * s for s in (0.5, 1, 1, 1, 1))),
        # DynamicCache appends with torch.cat: keys and values are copied whole into new tensors
        Op("kv_cache_append", 0.0, 4.0 * context * kv * b, outputs=(context * kv * b,) * 2),
        _attention("attention", shape.heads, shape.head_dim, shape.kv_heads, t, context, pairs, b),
        _pointwise("attention_transpose", t * a, b),
        _matmul("o_proj", t, a, d, b),
        _pointwise("residual_add", t * d, b, reads=2),
        _rms_norm("post_norm", t, d, b),
        _matmul("gate_proj", t, d, f, b), _matmul("up_proj", t, d, f, b),
        _pointwise("silu", t * f, b, flops=4, exp=True),
        _pointwise("gate_times_up", t * f, b, reads=2),
        _matmul("down_proj", t, f, d, b),
        _pointwise("residual_add", t * d, b, reads=2),
    ))


def llm_head(shape: LlmShape, norm_rows: int, logit_rows: int, itemsize: int) -> Cost:
    """The final norm (on every position) and the LM head on ``logit_rows`` of them (1 when
    generating: transformers' ``logits_to_keep=1``; all of them in training)."""
    return Cost((_rms_norm("final_norm", norm_rows, shape.hidden, itemsize),
                 _matmul("lm_head", logit_rows, shape.hidden, shape.vocab, itemsize)))


def _embed(shape: LlmShape, tokens: int, itemsize: int) -> Cost:
    return Cost((_pointwise("embed_lookup", tokens * shape.hidden, itemsize, flops=0),))


def llm_prefill(shape: LlmShape, tokens: int, itemsize: int, layers: int | None = None,
                causal: bool = True) -> Cost:
    """The prompt of ``tokens`` through ``layers`` (default: all) decoder layers and the logits of
    its last position (all the first generated token needs)."""
    layers = shape.layers if layers is None else layers
    return (_embed(shape, tokens, itemsize) + llm_layer(shape, tokens, tokens, itemsize, causal).scaled(layers)
            + llm_head(shape, tokens, 1, itemsize))


def llm_decode_token(shape: LlmShape, context: int, itemsize: int, layers: int | None = None) -> Cost:
    """One generated token when the cache already holds ``context`` tokens: every weight is read once
    for one row (memory-bound), and the cache (2·context·kv·d per layer) is read by attention and
    copied by the append."""
    layers = shape.layers if layers is None else layers
    return (_embed(shape, 1, itemsize) + llm_layer(shape, 1, context + 1, itemsize).scaled(layers)
            + llm_head(shape, 1, 1, itemsize))


def kv_cache_bytes(shape: LlmShape, tokens: int, itemsize: int, layers: int | None = None) -> int:
    """Keys and values of ``tokens`` positions in every layer: 2 · layers · tokens · kv_heads · d."""
    layers = shape.layers if layers is None else layers
    return 2 * layers * tokens * shape.kv_heads * shape.head_dim * itemsize


def llm_weight_bytes(shape: LlmShape, itemsize: int, layers: int | None = None) -> int:
    layers = shape.layers if layers is None else layers
    return (shape.params + (layers - shape.layers) * shape.params_per_layer) * itemsize


# --- the vision tower ------------------------------------------------------------------------------------


def _groups(grids: Sequence[Grid]) -> list[tuple[Grid, int]]:
    """Views of one size run as one batch (as ``LlavaMeteor.encode_images`` batches them)."""
    return list(Counter(tuple(g) for g in grids).items())


def vision_encoder(shape: VisionShape, grids: Sequence[Grid], itemsize: int) -> Cost:
    """CLIP's patch embedding and ``layers_run`` encoder layers over every view (a grid is a view's
    patch rows and columns; a CLS token is added), and the CLS attention row (Eq. 3)."""
    c, f, b = shape.hidden, shape.ffn, itemsize
    head_dim = c // shape.heads
    ops: list[Op] = []
    for (rows, cols), n in _groups(grids):
        patches = rows * cols
        tokens = n * (patches + 1)
        ops += [_matmul("patch_embed", n * patches, shape.channels * shape.patch ** 2, c, b),
                # flatten and transpose, the CLS token prepended, position embeddings, pre-norm
                _pointwise("embeddings_pre_norm", tokens * c, b, reads=3, writes=3, flops=4)]
        layer = Cost((
            _pointwise("layer_norm", tokens * c, b, flops=6),
            *_linear("q_proj", tokens, c, c, b), *_linear("k_proj", tokens, c, c, b),
            *_linear("v_proj", tokens, c, c, b),
            _attention("attention", shape.heads, head_dim, shape.heads, tokens, tokens, n * (patches + 1) ** 2, b),
            _pointwise("attention_transpose", tokens * c, b),
            *_linear("out_proj", tokens, c, c, b),
            _pointwise("residual_add", tokens * c, b, reads=2),
            _pointwise("layer_norm", tokens * c, b, flops=6),
            *_linear("fc1", tokens, c, f, b),
            # quick GELU: x · sigmoid(1.702 · x), three kernels
            _pointwise("quick_gelu_scale", tokens * f, b), _pointwise("quick_gelu_sigmoid", tokens * f, b, exp=True),
            _pointwise("quick_gelu_product", tokens * f, b, reads=2),
            *_linear("fc2", tokens, f, c, b),
            _pointwise("residual_add", tokens * c, b, reads=2),
        ))
        ops += layer.scaled(shape.layers_run).ops
        # Eq. 3 from the captured projections: the CLS query against every key, in float32
        ops += [_pointwise("cls_row_upcast", tokens * c, FP32, reads=0.5, writes=1),
                Op("cls_attention_row", 2.0 * c * tokens, 2 * tokens * c * FP32, "matvec", outputs=(tokens * c * FP32,)),
                _pointwise("cls_row_softmax", shape.heads * tokens, FP32, reads=2, writes=3, flops=6, exp=True)]
    return Cost(tuple(ops))


# --- the projectors --------------------------------------------------------------------------------------


def _mlp(config, tokens: float, itemsize: int) -> Cost:
    """LLaVA-1.5's 2-layer GELU MLP (C → hidden → D, with biases) on ``tokens`` tokens."""
    hidden = config.resolved_projector_hidden
    return Cost((*_linear("mlp_fc1", tokens, config.vision_width, hidden, itemsize),
                 _pointwise("mlp_gelu", tokens * hidden, itemsize, flops=8, exp=True),
                 *_linear("mlp_fc2", tokens, hidden, config.text_width, itemsize)))


def _fusion_lengths(config, patches: int) -> list[tuple[int, int]]:
    """(sequence length, positions the last layer projects) of each sequence FGF runs per view."""
    single, l2s = (patches + 1, patches + 1), (2 * patches + 1, patches + 1)
    return {"single": [single], "l2s": [l2s], "both": [single, l2s]}[config.scan_mode]


def _scan_direction(config, elems: float, b: int) -> Cost:
    """One direction of ``meteor.mamba.BiMamba`` over ``elems`` = batch × length positions."""
    di, state, rank = config.d_inner, config.d_state, config.resolved_dt_rank
    e = elems * di
    taps = config.d_conv
    ops = [
        # the causal depthwise convolution as shifted multiply-adds: one new tensor, taps − 1 in place
        Op("causal_conv", 2.0 * taps * e, (2 + 3 * (taps - 1)) * e * b, outputs=(e * b,)),
        _pointwise("silu_inplace", e, b, new=0, flops=4, exp=True),
        _matmul("x_proj", elems, di, rank + 2 * state, b),
        _matmul("dt_proj", elems, rank, di, b),
        _pointwise("bc_transpose", 2 * elems * state, b),
    ]
    if b != FP32:   # the scan computes in float32: u, Δ, z converted in, the output converted back
        ops.append(Op("scan_casts", 0.0, e * (3 * (b + FP32) + FP32 + b),
                      outputs=(e * FP32,) * 3 + (e * b,)))
    # reads u, Δ, z, writes y (into a reused block); 9 FLOPs per state, exp included
    ops.append(Op("selective_scan", SCAN_FLOPS * e * state, 4.0 * e * FP32, "scan"))
    return Cost(tuple(ops))


def flash_global_fusion(config, grids: Sequence[Grid], itemsize: int) -> Cost:
    """Flash Global Fusion (Eq. 1-2) on every view: local-to-single pooling and interleaving, the
    instruction token at the centre, ``fgf_layers`` bidirectional Mamba blocks (the last one
    projects only the Tⁱ and INS' positions), the fused tokens gathered back."""
    c, di, b = config.vision_width, config.d_inner, itemsize
    merged = 2 * di if config.direction_merge == "concat" else di
    ops: list[Op] = []
    for (rows, cols), n in _groups(grids):
        patches = rows * cols
        for length, kept in _fusion_lengths(config, patches):
            elems = n * length
            if length > patches + 1:
                ops += [_pointwise("l2s_layout", n * patches * c, b),
                        _pointwise("l2s_pool", n * patches * c, b, flops=config.window_size ** 2),
                        _pointwise("interleave", 2 * n * patches * c, b)]
            ops.append(_pointwise("insert_ins", elems * c, b))
            for index in range(config.fgf_layers):
                last = index == config.fgf_layers - 1
                out_positions = n * (kept if last else length)
                ops += [_pointwise("layer_norm", elems * c, b, flops=6),
                        _matmul("in_proj", elems, c, 2 * di, b),
                        _pointwise("flip_sequence", elems * 2 * di, b)]
                ops += _scan_direction(config, elems, b).scaled(2).ops
                ops += [_pointwise("flip_backward_output", elems * di, b),
                        _pointwise("merge_directions", elems * di, b, reads=3, writes=2, new=0),
                        *((_pointwise("keep_positions", out_positions * merged, b),) if last else ()),
                        _matmul("out_proj", out_positions, merged, c, b),
                        _pointwise("residual", out_positions * c, b, reads=3, writes=2)]
            ops.append(_pointwise("gather_fused", n * patches * c, b))
        if config.scan_mode == "both":
            ops.append(_pointwise("average_scans", n * patches * c, b, reads=2))
    return Cost(tuple(ops))


def visual_native_selection(config, grids: Sequence[Grid], itemsize: int) -> Cost:
    """Visual-Native Selection (Eq. 3-6): the native scores ⟨Fⁱ, INS'⟩ in float32, the softmaxes,
    the aggregate, a stable sort and the gather of K tokens per view."""
    c, k = config.vision_width, config.tokens_per_slice
    ops: list[Op] = []
    for (rows, cols), n in _groups(grids):
        patches = rows * cols
        keep = patches if k is None else min(k, patches)
        ops += [
            *((_pointwise("to_float32", n * patches * c, FP32),) if itemsize != FP32 else ()),
            Op("native_scores", 2.0 * n * patches * c, n * patches * c * FP32, "matvec"),
            _pointwise("softmax_aggregate", n * patches, FP32, reads=4, writes=4, flops=9, exp=True),
            _pointwise("top_k_sort", n * patches, 8, reads=2, writes=2, flops=math.log2(max(patches, 2))),
            _pointwise("gather_kept", n * keep * c, itemsize),
        ]
    return Cost(tuple(ops))


def resampler(config, grids: Sequence[Grid], itemsize: int) -> Cost:
    """LLaVA-UHD's compression layer as ``meteor.model.projectors.Resampler`` computes it: the view's tokens
    projected to D, 2-D sine-cosine positions added to the keys, K queries attending once
    (``nn.MultiheadAttention``: q, k, v and out projections at D), a final D × D map."""
    c, d, k, b = config.vision_width, config.text_width, config.tokens_per_slice, itemsize
    heads = config.resolved_resampler_heads
    ops: list[Op] = []
    for (rows, cols), n in _groups(grids):
        patches = rows * cols
        kv = n * patches
        ops += [
            _matmul("kv_proj", kv, c, d, b),
            _pointwise("ln_kv", kv * d, b, flops=6),
            _pointwise("sincos_positions", patches * d, FP32, reads=1, writes=4, flops=4, exp=True),
            _pointwise("keys_plus_positions", kv * d, b, reads=2),
            *_linear("q_in_proj", n * k, d, d, b),
            *_linear("k_in_proj", kv, d, d, b),
            *_linear("v_in_proj", kv, d, d, b),
            _attention("cross_attention", heads, d // heads, heads, n * k, kv, n * k * patches, b),
            _pointwise("attention_layout", n * k * d, b, reads=2, writes=2),
            *_linear("out_proj", n * k, d, d, b),
            _pointwise("ln_post", n * k * d, b, flops=6),
            _matmul("proj", n * k, d, d, b),
        ]
    return Cost(tuple(ops))


def projector_tokens(config, grid: Grid) -> int:
    """Visual tokens the projector gives one view of ``grid`` patches."""
    patches = grid[0] * grid[1]
    return patches if config.tokens_per_slice is None else min(config.tokens_per_slice, patches)


def compression(config, grids: Sequence[Grid], itemsize: int) -> Cost:
    """Everything between the vision tower and the LLM for the projector ``config.projector`` names
    (a ``meteor.model.configuration.CompressorConfig``): Top-Down Compression is FGF + VNS + the MLP on K tokens."""
    kept = sum(projector_tokens(config, g) for g in grids)
    name = config.projector
    if name == "meteor":
        return (flash_global_fusion(config, grids, itemsize) + visual_native_selection(config, grids, itemsize)
                + _mlp(config, kept, itemsize))
    if name == "mlp":
        return _mlp(config, kept, itemsize)
    if name == "resampler":
        return resampler(config, grids, itemsize)
    if name in ("cls_topk", "random_topk", "avgpool"):
        c = config.vision_width
        first = []
        for (rows, cols), n in _groups(grids):
            patches = rows * cols
            if name == "avgpool":
                first.append(_pointwise("avg_pool", n * patches * c, itemsize, reads=2, writes=1, new=1))
            else:
                first += [_pointwise("top_k_sort", n * patches, 8, reads=2, writes=2, flops=math.log2(max(patches, 2))),
                          _pointwise("gather_kept", n * projector_tokens(config, (rows, cols)) * c, itemsize)]
        return Cost(tuple(first)) + _mlp(config, kept, itemsize)
    raise ValueError(f"no cost model for projector {name!r}")


# --- whole pipelines -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageCosts:
    """The cost of each stage of answering one image (inference)."""

    vision: Cost
    compression: Cost
    prefill: Cost
    decode_token: Cost
    prompt_tokens: int
    kv_cache_bytes: int


def inference(vision: VisionShape, llm: LlmShape, config, grids: Sequence[Grid], text_tokens: int,
              separators: int, itemsize: int, layers: int | None = None, decode_context: int | None = None,
              causal: bool = True) -> StageCosts:
    """Vision, compression, prefill (time to first token) and one decode step for one image whose
    views have ``grids`` patches, with ``text_tokens`` of text and ``separators`` layout tokens.
    ``decode_context`` (default: the prompt) is the cache length at the decode step."""
    prompt = sum(projector_tokens(config, g) for g in grids) + separators + text_tokens
    return StageCosts(
        vision=vision_encoder(vision, grids, itemsize),
        compression=compression(config, grids, itemsize),
        prefill=llm_prefill(llm, prompt, itemsize, layers, causal),
        decode_token=llm_decode_token(llm, prompt if decode_context is None else decode_context, itemsize, layers),
        prompt_tokens=prompt,
        kv_cache_bytes=kv_cache_bytes(llm, prompt, itemsize, layers),
    )


def _backward(forward: Cost, linear: float) -> Cost:
    """A backward pass priced as its forward ops run again: ``linear`` times for products (1 for
    input gradients only, 2 with weight gradients), twice for attention and element-wise ops."""
    return Cost(tuple(op.times(linear if op.kind in ("matmul", "matvec") else 2.0, ".backward")
                      for op in forward.ops))


def llm_training(shape: LlmShape, tokens: int, itemsize: int, stage: Stage, layers: int | None = None,
                 causal: bool = True) -> Cost:
    """Forward and backward of the LLM on one sequence of ``tokens``, the LM head on every position.

    Stage 1 freezes the LLM: its backward computes input gradients only (one product per forward
    product), so they reach the projector. Stage 2 trains it: input and weight gradients (two
    products per forward product). Attention's backward (dQ and dK from the scores, dP and dV) and
    the element-wise ops' ≈ 2× their forward. The loss upcasts the logits to float32."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (pre-training) or 2 (instruction tuning), got {stage!r}")
    layers = shape.layers if layers is None else layers
    forward = (_embed(shape, tokens, itemsize) + llm_layer(shape, tokens, tokens, itemsize, causal).scaled(layers)
               + llm_head(shape, tokens, tokens, itemsize))
    logits = tokens * shape.vocab
    loss = Cost((_pointwise("logits_float32", logits, FP32, reads=0.5, writes=1),
                 _pointwise("log_softmax_nll", logits, FP32, reads=2, writes=1, flops=5, exp=True)))
    return forward + loss + _backward(forward + loss, 1.0 if stage == 1 else 2.0)


def training_step(vision: VisionShape, llm: LlmShape, config, grids: Sequence[Grid], text_tokens: int,
                  separators: int, itemsize: int, stage: Stage, cached_features: bool,
                  layers: int | None = None, causal: bool = True) -> Cost:
    """Forward and backward of one sample, no optimizer step (it runs once per global batch).

    The frozen vision tower runs forward only, or not at all with ``cached_features`` (the cached
    features are copied in); the projector trains in both stages (its backward ≈ 2× its forward);
    the LLM as ``llm_training``."""
    tokens = sum(projector_tokens(config, g) for g in grids) + separators + text_tokens
    projector = compression(config, grids, itemsize)
    if cached_features:
        patches = sum(r * c for r, c in grids)
        encoder = Cost((_pointwise("cached_features", patches * vision.hidden, itemsize, flops=0),))
    else:
        encoder = vision_encoder(vision, grids, itemsize)
    return encoder + projector + _backward(projector, 2.0) + llm_training(llm, tokens, itemsize, stage, layers, causal)


def decode_crossover(per_token_fixed: float, per_token_per_context: float, fraction: float = 0.1) -> float:
    """The context length at which the context-dependent part of a decode step is ``fraction`` of its
    fixed part (weights, overheads): below it, a shorter prompt barely speeds decoding."""
    if per_token_per_context <= 0:
        return math.inf
    return fraction * per_token_fixed / per_token_per_context


__all__ = ["CLIP_VIT_L_336", "Cost", "LlmShape", "Op", "Rates", "StageCosts", "VICUNA_13B", "VICUNA_7B",
           "VisionShape", "causal_pairs", "compression", "decode_crossover", "flash_global_fusion", "inference",
           "kv_cache_bytes", "llm_decode_token", "llm_head", "llm_layer", "llm_prefill", "llm_training",
           "llm_weight_bytes", "projector_tokens", "resampler", "total", "training_step", "vision_encoder",
           "visual_native_selection"]
