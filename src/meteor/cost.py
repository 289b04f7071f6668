"""A cost model of LLaVA-Meteor and its baselines: FLOPs and bytes of every stage, from the
configurations and the token counts alone (no tensors, no torch).

Conventions, once:

* A multiply-add is 2 FLOPs: a (M×K)·(K×N) product is 2·M·K·N.
* Attention over query i and key j is one *pair*; a pair costs 4·h·d FLOPs (q·k and p·v, h heads of
  width d), softmax ≈ 5 FLOPs per head and pair (not counted as matmul work). Causal attention counts
  only the pairs a causal kernel computes (the lower triangle, T(T+1)/2 for a prompt of T): half of
  the square. Pass ``causal=False`` for a kernel that computes the whole square (eager attention, or
  SDPA given an explicit mask), as ``torch.utils.flop_counter`` does.
* Bytes are the minimum traffic of each op as PyTorch runs it unfused: every input read once and
  every output written once (a matmul's weights once per call, however many tokens share them).
  Element-wise ops (norms, activations, residual adds, copies) are counted by their passes over memory.
* A stage's time on a machine is Σ over its ops of max(FLOPs / peak, bytes / bandwidth): each op is
  either compute-bound or memory-bound (a roofline per op, not per stage). ``Cost.seconds`` does that.

The counts follow the implementations in this repository and in transformers: CLIP's vision layers
(pre-norm, four projections with bias, quick-GELU MLP), LLaMA's decoder layers (RMSNorm computed in
float32, grouped-query attention, SwiGLU's three matrices, the KV cache grown by concatenation as
``DynamicCache`` does, so each decode step rewrites it), ``meteor.fusion``/``meteor.mamba`` (the
last Mamba layer projects only the kept positions) and ``meteor.projectors``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

Kind = Literal["matmul", "attention", "elementwise", "scan"]
Stage = Literal[1, 2]
Grid = tuple[int, int]

SOFTMAX_FLOPS = 5
"""FLOPs per softmax entry (max, subtract, exp, sum, divide)."""

SCAN_FLOPS = 9
"""FLOPs per (batch, channel, step, state) of the Mamba-1 selective scan (exp(Δ·A), the state update
h = a·h + Δ·B·u, and C·h), as ``benchmarks/bench_scan.py`` counts its floor."""

FP32 = 4


@dataclass(frozen=True)
class Op:
    name: str
    flops: float
    bytes: float
    kind: Kind

    def seconds(self, peak_flops: float, bandwidth: float) -> float:
        """The roofline time of this op: the slower of its compute and its memory traffic."""
        return max(self.flops / peak_flops, self.bytes / bandwidth)


@dataclass(frozen=True)
class Cost:
    """The ops of one stage (or several), each with its FLOPs and bytes."""

    ops: tuple[Op, ...] = ()

    @property
    def flops(self) -> float:
        return sum(op.flops for op in self.ops)

    @property
    def bytes(self) -> float:
        return sum(op.bytes for op in self.ops)

    @property
    def matmul_flops(self) -> float:
        """FLOPs of matrix products and attention (what ``torch.utils.flop_counter`` counts)."""
        return sum(op.flops for op in self.ops if op.kind in ("matmul", "attention"))

    def seconds(self, peak_flops: float, bandwidth: float) -> float:
        """Σ over ops of max(FLOPs / peak_flops, bytes / bandwidth); rates in FLOP/s and byte/s."""
        if peak_flops <= 0 or bandwidth <= 0:
            raise ValueError(f"rates must be positive, got peak {peak_flops} FLOP/s, bandwidth {bandwidth} B/s")
        return sum(op.seconds(peak_flops, bandwidth) for op in self.ops)

    def scaled(self, factor: float, suffix: str = "") -> "Cost":
        """Every op's FLOPs and bytes times ``factor`` (e.g. the layers of a model, a backward pass)."""
        return Cost(tuple(Op(op.name + suffix, op.flops * factor, op.bytes * factor, op.kind) for op in self.ops))

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.ops + other.ops)

    def by_kind(self) -> dict[str, float]:
        """FLOPs per kind of op."""
        totals: Counter = Counter()
        for op in self.ops:
            totals[op.kind] += op.flops
        return dict(totals)


def total(costs: Iterable[Cost]) -> Cost:
    out = Cost()
    for cost in costs:
        out = out + cost
    return out


def _matmul(name: str, m: float, k: float, n: float, itemsize: int) -> Op:
    """(m×k)·(k×n): 2mkn FLOPs; reads both operands once, writes the product once."""
    return Op(name, 2.0 * m * k * n, (m * k + k * n + m * n) * itemsize, "matmul")


def _elementwise(name: str, elements: float, bytes_per_element: float, flops_per_element: float = 1.0) -> Op:
    return Op(name, flops_per_element * elements, bytes_per_element * elements, "elementwise")


def _attention(name: str, heads: int, head_dim: int, kv_heads: int, queries: float, keys: float,
               pairs: float, itemsize: int) -> list[Op]:
    """One attention call as a fused kernel runs it: reads Q (queries), K and V (keys, kv_heads),
    writes O; 4·h·d FLOPs per pair (q·k and p·v), and the softmax's FLOPs as a separate op (it stays
    in registers in a fused kernel, so it moves no bytes)."""
    traffic = (2.0 * queries * heads * head_dim + 2.0 * keys * kv_heads * head_dim) * itemsize
    return [Op(name, 4.0 * head_dim * heads * pairs, traffic, "attention"),
            Op(name + "_softmax", SOFTMAX_FLOPS * heads * pairs, 0.0, "elementwise")]


def causal_pairs(new_tokens: int, context: int) -> int:
    """Query-key pairs of causal attention for ``new_tokens`` queries appended to a cache, ``context``
    keys in all after them: Σ over the new queries of the keys at or before each one. A prompt of T
    (new_tokens = context = T) gives T(T+1)/2; one decode step gives ``context``."""
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
        ``meteor.vision.VisionTower`` runs ``num_layers_run`` of them: 23 of 24 by default)."""
        return cls(hidden=config.hidden_size, heads=config.num_attention_heads, ffn=config.intermediate_size,
                   patch=config.patch_size, channels=config.num_channels,
                   layers_run=config.num_hidden_layers if layers_run is None else layers_run)


CLIP_VIT_L_336 = VisionShape(hidden=1024, heads=16, ffn=4096, patch=14, layers_run=23)
"""CLIP ViT-L/14-336 as the vision tower runs it: features and CLS attention from layer 23 of 24."""


# --- the LLM ---------------------------------------------------------------------------------------------


def _rms_norm_bytes(itemsize: int) -> int:
    """Bytes per element of transformers' LlamaRMSNorm: upcast, square, mean, scale, downcast, weight."""
    return 28 if itemsize == FP32 else 28 + 4 * itemsize


def llm_layer(shape: LlmShape, new_tokens: int, context: int, itemsize: int, causal: bool = True) -> Cost:
    """One decoder layer for ``new_tokens`` tokens appended to a KV cache that holds ``context``
    tokens after them (a prompt: new_tokens = context; a decode step: new_tokens = 1)."""
    t, d, f = new_tokens, shape.hidden, shape.ffn
    a, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    b = itemsize
    pairs = causal_pairs(t, context) if causal else t * context
    ops = [
        _elementwise("rms_norm", 2 * t * d, _rms_norm_bytes(b), 4),
        _matmul("q_proj", t, d, a, b),
        _matmul("k_proj", t, d, kv, b),
        _matmul("v_proj", t, d, kv, b),
        _elementwise("rotary", t * (a + kv), 8 * b, 3),
        # DynamicCache appends by torch.cat: keys and values are read and written whole at every call.
        Op("kv_cache_append", 0.0, 4.0 * context * kv * b, "elementwise"),
        *_attention("attention", shape.heads, shape.head_dim, shape.kv_heads, t, context, pairs, b),
        _matmul("o_proj", t, a, d, b),
        _elementwise("residual_add", 2 * t * d, 3 * b),
        _matmul("gate_proj", t, d, f, b),
        _matmul("up_proj", t, d, f, b),
        _elementwise("silu_mul", t * f, 5 * b, 5),
        _matmul("down_proj", t, f, d, b),
    ]
    return Cost(tuple(ops))


def llm_head(shape: LlmShape, rows: int, itemsize: int) -> Cost:
    """The final norm and the LM head on ``rows`` positions (1 at inference, every position in training)."""
    return Cost((
        _elementwise("final_norm", rows * shape.hidden, _rms_norm_bytes(itemsize), 4),
        _matmul("lm_head", rows, shape.hidden, shape.vocab, itemsize),
    ))


def llm_prefill(shape: LlmShape, tokens: int, itemsize: int, layers: int | None = None,
                causal: bool = True) -> Cost:
    """The prompt of ``tokens`` through ``layers`` (default: all) decoder layers, the logits of its
    last position (what generation needs: transformers' ``logits_to_keep=1``)."""
    layers = shape.layers if layers is None else layers
    embed = Cost((_elementwise("embed_lookup", tokens * shape.hidden, 2 * itemsize, 0),))
    return embed + llm_layer(shape, tokens, tokens, itemsize, causal).scaled(layers) + llm_head(shape, 1, itemsize)


def llm_decode_token(shape: LlmShape, context: int, itemsize: int, layers: int | None = None) -> Cost:
    """One generated token when the cache already holds ``context`` tokens: every weight is read
    once for one token, so decoding is memory-bound; the KV cache adds 2·context·kv·d per layer."""
    layers = shape.layers if layers is None else layers
    embed = Cost((_elementwise("embed_lookup", shape.hidden, 2 * itemsize, 0),))
    return embed + llm_layer(shape, 1, context + 1, itemsize).scaled(layers) + llm_head(shape, 1, itemsize)


def kv_cache_bytes(shape: LlmShape, tokens: int, itemsize: int, layers: int | None = None) -> int:
    """Keys and values of ``tokens`` positions in every layer: 2 · layers · tokens · kv_heads · d."""
    layers = shape.layers if layers is None else layers
    return 2 * layers * tokens * shape.kv_heads * shape.head_dim * itemsize


def llm_weight_bytes(shape: LlmShape, itemsize: int, layers: int | None = None) -> int:
    layers = shape.layers if layers is None else layers
    return (shape.params - shape.layers * shape.params_per_layer + layers * shape.params_per_layer) * itemsize


# --- the vision tower ------------------------------------------------------------------------------------


def _groups(grids: Sequence[Grid]) -> list[tuple[Grid, int]]:
    """Views of one size run as one batch (as ``LlavaMeteor.encode_images`` batches them)."""
    return list(Counter(tuple(g) for g in grids).items())


def vision_encoder(shape: VisionShape, grids: Sequence[Grid], itemsize: int, cls_row: bool = True) -> Cost:
    """CLIP's patch embedding and ``layers_run`` encoder layers over every view (grid = its patch
    rows, cols; CLS token added), and the CLS attention row of the visual expert (Eq. 3)."""
    c, f, b = shape.hidden, shape.ffn, itemsize
    head_dim = c // shape.heads
    ops: list[Op] = []
    for (rows, cols), n in _groups(grids):
        patches = rows * cols
        tokens = n * (patches + 1)
        ops += [
            _matmul("patch_embed", n * patches, shape.channels * shape.patch ** 2, c, b),
            _elementwise("pos_embed_pre_norm", tokens * c, 5 * b, 6),
        ]
        layer = [
            _elementwise("layer_norm", 2 * tokens * c, 2 * b, 6),
            _matmul("q_proj", tokens, c, c, b), _matmul("k_proj", tokens, c, c, b),
            _matmul("v_proj", tokens, c, c, b),
            *_attention("attention", shape.heads, head_dim, shape.heads, tokens, tokens,
                       n * (patches + 1) ** 2, b),
            _matmul("out_proj", tokens, c, c, b),
            _elementwise("residual_add", 2 * tokens * c, 3 * b),
            _matmul("fc1", tokens, c, f, b),
            _elementwise("quick_gelu", tokens * f, 7 * b, 4),
            _matmul("fc2", tokens, f, c, b),
        ]
        ops += list(Cost(tuple(layer)).scaled(shape.layers_run).ops)
        if cls_row:
            # Eq. 3's scores: the CLS query against every key (q·k only, no values), then softmax.
            ops += [Op("cls_attention_row", 2.0 * c * tokens, (n * c + tokens * c) * FP32, "attention"),
                    _elementwise("cls_attention_softmax", shape.heads * tokens, 3 * FP32, SOFTMAX_FLOPS)]
    return Cost(tuple(ops))


# --- the projectors --------------------------------------------------------------------------------------


def _mlp(config, tokens: float, itemsize: int) -> Cost:
    """LLaVA-1.5's 2-layer GELU MLP (C → hidden → D) on ``tokens`` tokens."""
    hidden = config.resolved_projector_hidden
    return Cost((
        _matmul("mlp_fc1", tokens, config.vision_width, hidden, itemsize),
        _elementwise("mlp_gelu", tokens * hidden, 2 * itemsize, 8),
        _matmul("mlp_fc2", tokens, hidden, config.text_width, itemsize),
    ))


def _fusion_lengths(config, patches: int) -> list[tuple[int, int]]:
    """(sequence length, positions the last layer projects) of each sequence FGF runs per view."""
    single, l2s = (patches + 1, patches + 1), (2 * patches + 1, patches + 1)
    return {"single": [single], "l2s": [l2s], "both": [single, l2s]}[config.scan_mode]


def flash_global_fusion(config, grids: Sequence[Grid], itemsize: int) -> Cost:
    """Flash Global Fusion (Eq. 1-2) on every view: local-to-single pooling and interleaving, the
    instruction token at the centre, ``fgf_layers`` bidirectional Mamba blocks; the last block
    projects only the Tⁱ and INS' positions. The scan reads and writes float32 (bf16 operands are
    converted on the way in and out)."""
    c, di, n_state = config.vision_width, config.d_inner, config.d_state
    rank, b = config.resolved_dt_rank, itemsize
    convert = 0 if b == FP32 else b + FP32            # bytes per element of a dtype conversion
    ops: list[Op] = []
    for (rows, cols), n in _groups(grids):
        patches = rows * cols
        for length, kept in _fusion_lengths(config, patches):
            elems = n * length
            if length > patches + 1:
                window = config.window_size ** 2
                ops += [_elementwise("l2s_pool", n * patches * c, 2 * b, window),
                        _elementwise("interleave", 2 * n * patches * c, 2 * b, 0)]
            ops.append(_elementwise("insert_ins", elems * c, 2 * b, 0))
            for index in range(config.fgf_layers):
                out_positions = n * (kept if index == config.fgf_layers - 1 else length)
                ops += [
                    _elementwise("layer_norm", elems * c, 2 * b, 6),
                    _matmul("in_proj", elems, c, 2 * di, b),
                    _elementwise("flip", elems * 2 * di, 2 * b, 0),
                ]
                direction = [
                    _elementwise("causal_conv_silu", elems * di, (3 * config.d_conv + 2) * b,
                                 2 * config.d_conv + 4),
                    _matmul("x_proj", elems, di, rank + 2 * n_state, b),
                    _matmul("dt_proj", elems, rank, di, b),
                    _elementwise("bc_transpose", elems * 2 * n_state, 2 * b, 0),
                    _elementwise("scan_convert", 4 * elems * di, convert, 0),
                    Op("selective_scan", SCAN_FLOPS * elems * di * n_state, 4.0 * elems * di * FP32, "scan"),
                ]
                ops += list(Cost(tuple(direction)).scaled(2).ops)
                merged = 2 * di if config.direction_merge == "concat" else di
                ops += [
                    _elementwise("merge_directions", elems * di, 3 * b, 1),
                    _elementwise("keep_positions", out_positions * merged, 2 * b, 0),
                    _matmul("out_proj", out_positions, merged, c, b),
                    _elementwise("residual_add", out_positions * c, 3 * b),
                ]
        if config.scan_mode == "both":
            ops.append(_elementwise("average_scans", n * patches * c, 3 * b))
    return Cost(tuple(ops))


def visual_native_selection(config, grids: Sequence[Grid], itemsize: int) -> Cost:
    """Visual-Native Selection (Eq. 3-6): the native scores ⟨Fⁱ, INS'⟩ in float32, the softmaxes,
    the aggregate, a sort and the gather of K tokens per view."""
    c, k = config.vision_width, config.tokens_per_slice
    ops: list[Op] = []
    for (rows, cols), n in _groups(grids):
        patches = rows * cols
        keep = patches if k is None else min(k, patches)
        ops += [
            _elementwise("to_float32", n * patches * c, itemsize + FP32, 0),
            Op("native_scores", 2.0 * n * patches * c, n * patches * c * FP32, "matmul"),
            _elementwise("softmax_aggregate", n * patches, 8 * FP32, SOFTMAX_FLOPS + 4),
            _elementwise("top_k_sort", n * patches, 4 * 8, math.log2(max(patches, 2))),
            _elementwise("gather_kept", n * keep * c, 2 * itemsize, 0),
        ]
    return Cost(tuple(ops))


def resampler(config, grids: Sequence[Grid], itemsize: int) -> Cost:
    """LLaVA-UHD's compression layer as ``meteor.projectors.Resampler`` computes it: a projection of
    the view's tokens to D, K queries attending once (multi-head, in/out projections at D), a linear map."""
    c, d, k, b = config.vision_width, config.text_width, config.tokens_per_slice, itemsize
    heads = config.resolved_resampler_heads
    ops: list[Op] = []
    for (rows, cols), n in _groups(grids):
        patches = rows * cols
        ops += [
            _matmul("kv_proj", n * patches, c, d, b),
            _elementwise("ln_kv_pos", 2 * n * patches * d, 3 * b, 8),
            _matmul("q_in_proj", n * k, d, d, b),
            _matmul("k_in_proj", n * patches, d, d, b),
            _matmul("v_in_proj", n * patches, d, d, b),
            *_attention("cross_attention", heads, d // heads, heads, n * k, n * patches, n * k * patches, b),
            _matmul("out_proj", n * k, d, d, b),
            _elementwise("ln_post", n * k * d, 3 * b, 8),
            _matmul("proj", n * k, d, d, b),
        ]
    return Cost(tuple(ops))


def projector_tokens(config, grid: Grid) -> int:
    """Visual tokens the projector gives one view of ``grid`` patches."""
    patches = grid[0] * grid[1]
    return patches if config.tokens_per_slice is None else min(config.tokens_per_slice, patches)


def compression(config, grids: Sequence[Grid], itemsize: int) -> Cost:
    """Everything between the vision tower and the LLM for the projector ``config.projector`` names
    (a ``meteor.config.CompressorConfig``): Top-Down Compression is FGF + VNS + the MLP on K tokens."""
    kept = sum(projector_tokens(config, g) for g in grids)
    name = config.projector
    if name == "meteor":
        return (flash_global_fusion(config, grids, itemsize) + visual_native_selection(config, grids, itemsize)
                + _mlp(config, kept, itemsize))
    if name == "mlp":
        return _mlp(config, kept, itemsize)
    if name == "resampler":
        return resampler(config, grids, itemsize)
    if name in ("cls_topk", "random_topk"):
        sort = []
        for (rows, cols), n in _groups(grids):
            sort.append(_elementwise("top_k_sort", n * rows * cols, 4 * 8, math.log2(max(rows * cols, 2))))
        return Cost(tuple(sort)) + _mlp(config, kept, itemsize)
    if name == "avgpool":
        pool = [_elementwise("avg_pool", n * r * c * config.vision_width, itemsize, 1) for (r, c), n in _groups(grids)]
        return Cost(tuple(pool)) + _mlp(config, kept, itemsize)
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
    visual = sum(projector_tokens(config, g) for g in grids)
    prompt = visual + separators + text_tokens
    context = prompt if decode_context is None else decode_context
    return StageCosts(
        vision=vision_encoder(vision, grids, itemsize),
        compression=compression(config, grids, itemsize),
        prefill=llm_prefill(llm, prompt, itemsize, layers, causal),
        decode_token=llm_decode_token(llm, context, itemsize, layers),
        prompt_tokens=prompt,
        kv_cache_bytes=kv_cache_bytes(llm, prompt, itemsize, layers),
    )


def llm_training(shape: LlmShape, tokens: int, itemsize: int, stage: Stage, layers: int | None = None,
                 causal: bool = True) -> Cost:
    """Forward and backward of the LLM on one sequence of ``tokens``, the LM head on every position.

    Stage 1 freezes the LLM: its backward computes input gradients only (one product per forward
    product), so they reach the projector. Stage 2 trains it: input and weight gradients (two
    products per forward product). Attention's backward (dQ, dK from the scores, dP, dV) and the
    element-wise ops' ≈ 2× their forward. The loss reads the float32 logits."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (pre-training) or 2 (instruction tuning), got {stage!r}")
    layers = shape.layers if layers is None else layers
    forward = llm_layer(shape, tokens, tokens, itemsize, causal).scaled(layers) + llm_head(shape, tokens, itemsize)
    linear = 1.0 if stage == 1 else 2.0
    backward = Cost(tuple(
        Op(op.name + ".backward", op.flops * (linear if op.kind == "matmul" else 2.0),
           op.bytes * (linear if op.kind == "matmul" else 2.0), op.kind) for op in forward.ops))
    loss = Cost((_elementwise("cross_entropy", tokens * shape.vocab, 4 * FP32 + itemsize, 6),))
    return forward + backward + loss


def training_step(vision: VisionShape, llm: LlmShape, config, grids: Sequence[Grid], text_tokens: int,
                  separators: int, itemsize: int, stage: Stage, cached_features: bool,
                  layers: int | None = None, causal: bool = True) -> Cost:
    """Forward and backward of one sample, no optimizer step (it runs once per global batch).

    The frozen vision tower runs forward only, or not at all with ``cached_features`` (the cached
    features are copied in); the projector trains in both stages (backward ≈ 2× its forward); the
    LLM as ``llm_training``."""
    visual = sum(projector_tokens(config, g) for g in grids)
    tokens = visual + separators + text_tokens
    projector = compression(config, grids, itemsize)
    projector = projector + projector.scaled(2.0, ".backward")
    if cached_features:
        patches = sum(r * c for r, c in grids)
        encoder = Cost((_elementwise("cached_features", patches * vision.hidden, 2 * itemsize, 0),))
    else:
        encoder = vision_encoder(vision, grids, itemsize)
    return encoder + projector + llm_training(llm, tokens, itemsize, stage, layers, causal)


def decode_crossover(per_token_fixed: float, per_token_per_context: float, fraction: float = 0.1) -> float:
    """The context length at which the context-dependent part of a decode step is ``fraction`` of
    its fixed part (weights, overheads): below it, shrinking the prompt barely speeds decoding."""
    if per_token_per_context <= 0:
        return math.inf
    return fraction * per_token_fixed / per_token_per_context


__all__ = ["CLIP_VIT_L_336", "Cost", "LlmShape", "Op", "StageCosts", "VICUNA_13B", "VICUNA_7B", "VisionShape",
           "causal_pairs", "compression", "decode_crossover", "flash_global_fusion", "inference", "kv_cache_bytes",
           "llm_decode_token", "llm_head", "llm_layer", "llm_prefill", "llm_training", "llm_weight_bytes", "projector_tokens",
           "resampler", "training_step", "vision_encoder", "visual_native_selection", "total"]
