"""End to end at the paper's widths: its Table 4 (tokens, TPS, training time), measured, with a cost model.

One image of 1008×672 px (LLaVA-UHD: 6 slices of 24×24 patches + a 19×29 global view) through
CLIP ViT-L/14-336 at its real widths and depth, each row's projector, and an LLM at Vicuna-13B's
widths (hidden 5120, 40 heads, FFN 13824, vocabulary 32000; --llm 7b for Vicuna-7B's) built at
reduced depth (--layers, 2 by default). Every decoder layer is timed by hooks, and the per-layer
figures are extrapolated to the real depth (40 layers; 32 for 7b): real = measured − Σ layers +
depth × mean layer. Random weights; every row runs in the same process against the same models.

Rows: LLaVA-1.5's MLP on every token; LLaVA-UHD's resampler at 144 per view; Meteor at 144, 64 and
32; CLS Top-K at 64 (training-free); a plain downsample (every view resized to about 112² px, 8×8
patches, then the MLP on every token: 64 per slice, 60 for the global view). Columns: visual tokens,
vision encode, compression, LLM prefill (time to first token = all three), decode tokens/s at that
context, KV cache, extra peak memory; in fp32 and bf16. The prefill speed-up of each row over
UHD-144 is printed beside its bound, the ratio of the prompts' token counts.

The cost model (meteor.bench.cost) gives each stage's FLOPs and bytes; its prediction is a roofline per
op (compute-, memory- or exp-bound, plus a CPU product's weight-packing pass and the page faults of
large new tensors) with the machine's ceilings per dtype, each from one micro-benchmark at a fixed
shape measured in the same run (before the rows and between the rounds, the median used). It is
printed beside the measured time with the FLOP/s each stage achieved, and beside the plain
two-number roofline (matmul rate and copy bandwidth). With --peak-tflops and --bandwidth-gbs it is
projected to a GPU (labelled as such).

Training: one stage-1 and one stage-2 step per sample (forward and backward, no optimizer step) for
the resampler and Meteor at 144 / 64 / 32, with and without the feature cache, as ratios beside the
paper's 17.2 / 13.7 / 12.9 / 12.1 h.

    python benchmarks/bench_e2e.py                       # every row, fp32 and bf16, training in bf16
                                                         # (fp32 only where bf16 is the slower dtype)
    python benchmarks/bench_e2e.py --dtypes bf16 --rows meteor-32,uhd-resampler-144 --no-train
    python benchmarks/bench_e2e.py --quick               # small widths: CI's test of the script
    python benchmarks/bench_e2e.py --device cuda --dtypes bf16 --layers 40 --train-dtype bf16
    meteor bench [the same options]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    projector: str
    tokens_per_slice: int | None
    view_base: int = 336
    """Each view is resized to about view_base² px (336: CLIP's own size; 112: the plain downsample)."""


ROWS = (
    Row("llava15-mlp", "LLaVA-1.5 MLP, every token", "mlp", None),
    Row("uhd-resampler-144", "LLaVA-UHD resampler, 144", "resampler", 144),
    Row("meteor-144", "Meteor, 144", "meteor", 144),
    Row("meteor-64", "Meteor, 64", "meteor", 64),
    Row("meteor-32", "Meteor, 32", "meteor", 32),
    Row("cls-topk-64", "CLS Top-K, 64 (training-free)", "cls_topk", 64),
    Row("downsample-64", "views at 112 px (8×8 patches), MLP", "mlp", None, view_base=112),
)
ROW_NAMES = tuple(row.name for row in ROWS)
REFERENCE = "uhd-resampler-144"
TRAIN_ROWS = ("uhd-resampler-144", "meteor-144", "meteor-64", "meteor-32")
PAPER = {"uhd-resampler-144": (17.2, 28.4), "meteor-144": (13.7, 29.1), "meteor-64": (12.9, 31.3),
         "meteor-32": (12.1, 32.9)}
"""Table 4 of the paper: training hours (8 H800s) and TPS, per row."""
STAGE_SAMPLES = {1: 558_000, 2: 665_000}
"""Samples of one epoch: LLaVA-Pretrain-558K (stage 1), the 665K mixture (stage 2)."""

VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, projection_dim=768)
LLMS = {"13b": dict(hidden_size=5120, num_attention_heads=40, num_key_value_heads=40, intermediate_size=13824,
                    vocab_size=32000, depth=40),
        "7b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                   vocab_size=32000, depth=32)}
QUICK_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 image_size=336, patch_size=14, projection_dim=64)
QUICK_LLM = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                 vocab_size=512, depth=4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
IMAGE_SIZE = (1008, 672)
"""(width, height): the paper's largest image, 6 slices (2 rows × 3 columns) + the global view."""


# --- measuring -------------------------------------------------------------------------------------------


class Clock:
    """Wall time that waits for the GPU first, so a CUDA stage ends when its kernels do."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class ModuleTimer:
    """Seconds each module spends in forward (and, with ``backward``, in backward), from hooks."""

    def __init__(self, modules, clock: Clock, backward: bool = False):
        self.modules, self.clock = list(modules), clock
        self.forward = [0.0] * len(self.modules)
        self.backward = [0.0] * len(self.modules)
        self._start: dict[tuple[str, int], float] = {}
        self.handles = []
        for index, module in enumerate(self.modules):
            self.handles += [module.register_forward_pre_hook(self._begin("f", index)),
                             module.register_forward_hook(self._end("f", index))]
            if backward:
                self.handles += [module.register_full_backward_pre_hook(self._begin("b", index)),
                                 module.register_full_backward_hook(self._end("b", index))]

    def _begin(self, phase: str, index: int):
        def hook(*_):
            self._start[phase, index] = self.clock()
        return hook

    def _end(self, phase: str, index: int):
        def hook(*_):
            seconds = self.clock() - self._start.pop((phase, index))
            (self.forward if phase == "f" else self.backward)[index] += seconds
        return hook

    def reset(self) -> None:
        self.forward = [0.0] * len(self.modules)
        self.backward = [0.0] * len(self.modules)

    @property
    def seconds(self) -> float:
        return sum(self.forward) + sum(self.backward)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


class PeakMemory:
    """Extra peak memory of a block. CPU: VmHWM after minus VmRSS before, the peak reset through
    /proc/self/clear_refs: every byte the process touched, whoever allocated it (glibc returns big
    freed blocks to the OS, so RSS follows the live tensors). CUDA: torch's peak allocated minus
    the allocated before."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.extra = 0

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = _status_bytes("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.before
        else:
            self.extra = _status_bytes("VmHWM") - self.before


def _best(fn, clock: Clock, repeats: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def measure_rates(device: torch.device, dtype: torch.dtype, quick: bool, clock: Clock):
    """The ceilings of ``meteor.bench.cost.Rates``, each from one micro-benchmark of a kernel class at a
    fixed shape (best of 3): products with a 5120×5120 weight (``product_rates``); a 256 MiB copy;
    SDPA at (4, 16, 1024, 64); a 1×5120 row times a 13824×5120 weight; sigmoid into existing memory; the selective
    scan at one view's shape; and on CPU the extra time of filling a freshly allocated 64 MiB block
    over an existing one. --quick shrinks each."""
    import torch.nn.functional as F

    from meteor.bench.cost import Rates

    scale = 8 if quick else 1
    matmul, pack = product_rates(device, dtype, quick, clock)
    source = torch.ones((256 // scale) << 18, device=device)                   # float32
    target = torch.empty_like(source)
    bandwidth = 2.0 * source.numel() * 4 / _best(lambda: target.copy_(source), clock)
    batch, heads, length, width = (2, 4, 256, 32) if quick else (4, 16, 1024, 64)
    q = torch.randn(batch, heads, length, width, device=device, dtype=dtype)
    attention = 4.0 * batch * heads * width * length ** 2 / _best(lambda: F.scaled_dot_product_attention(q, q, q), clock)
    rows, cols = (1728, 640) if quick else (13824, 5120)
    weight = torch.randn(rows, cols, device=device, dtype=dtype)
    x = torch.randn(1, 1, cols, device=device, dtype=dtype)
    matvec = weight.numel() * weight.element_size() / _best(lambda: F.linear(x, weight), clock, 5)
    values = torch.randn((16 // scale) << 20, device=device, dtype=dtype)
    out = torch.empty_like(values)
    transcendental = values.numel() / _best(lambda: torch.sigmoid(values, out=out), clock)
    scan = scan_rate(device, quick, clock)
    fresh = None
    if device.type == "cpu":
        block = (64 << 20) // (4 * scale)
        reused = torch.empty(block)
        existing = _best(lambda: reused.fill_(1.0), clock)
        first_touch = _best(lambda: torch.empty(block).fill_(1.0), clock)
        fresh = block * 4 / max(first_touch - existing, 1e-9)
    return Rates(matmul=matmul, bandwidth=bandwidth, attention=attention, matvec=matvec,
                 transcendental=transcendental, scan=scan, fresh=fresh, pack=pack)


def product_rates(device: torch.device, dtype: torch.dtype, quick: bool, clock: Clock
                  ) -> tuple[float, float | None]:
    """The arithmetic rate of a matrix product and, on a CPU, the rate at which it packs its weight
    operand: ``nn.Linear``'s product x·Wᵀ with W of 5120×5120 (a 13B projection) for 64 and 2048
    rows of x (best of 3 each). Time = 2·m·k·n / matmul + k·n·itemsize / pack, two equations in the
    two rates. On a GPU the weights stream while the arithmetic runs: one (8192³) product gives the
    rate, and there is no pack term."""
    if device.type == "cuda":
        m = k = n = 8192
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        product = torch.empty(m, n, device=device, dtype=dtype)
        return 2.0 * m * k * n / _best(lambda: torch.mm(a, b, out=product), clock), None
    k = n = 512 if quick else 5120
    weight = torch.randn(n, k, device=device, dtype=dtype)
    seconds = {}
    for m in ((16, 512) if quick else (64, 2048)):
        x = torch.randn(m, k, device=device, dtype=dtype)
        product = torch.empty(m, n, device=device, dtype=dtype)           # no fresh pages in the timing
        seconds[m] = _best(lambda: torch.mm(x, weight.t(), out=product), clock)
    (few, t_few), (many, t_many) = sorted(seconds.items())
    per_flop = (t_many - t_few) / (2.0 * (many - few) * k * n)
    packing = t_few - 2.0 * few * k * n * per_flop
    if per_flop <= 0 or packing <= 0:          # noise swamped the difference: no pack term
        return 2.0 * many * k * n / t_many, None
    return 1.0 / per_flop, k * n * weight.element_size() / packing


def scan_rate(device: torch.device, quick: bool, clock: Clock) -> float:
    """FLOP/s of ``meteor.model.ops.selective_scan`` (float32, as the Mamba block calls it) at one view's
    shape (1, 2048, 1153, 16); 9 FLOPs per state as ``meteor.bench.cost.SCAN_FLOPS`` counts them."""
    from meteor.bench.cost import SCAN_FLOPS
    from meteor.model.ops import selective_scan

    dim, length, state = (128, 257, 8) if quick else (2048, 1153, 16)
    generator = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, dim, length, generator=generator).to(device) for _ in range(3))
    a = -torch.arange(1, state + 1, dtype=torch.float32, device=device).repeat(dim, 1)
    b, c = (torch.randn(1, state, length, generator=generator).to(device) for _ in range(2))
    d, bias = torch.ones(dim, device=device), torch.full((dim,), -4.0, device=device)

    def run():
        with torch.inference_mode():
            selective_scan(u, delta, a, b, c, D=d, z=z, delta_bias=bias, delta_softplus=True)
    return SCAN_FLOPS * dim * length * state / _best(run, clock)


def describe_rates(rates) -> str:
    fresh = f", fresh pages {rates.fresh / 1e9:.1f} GB/s" if rates.fresh else ""
    return (f"matmul {rates.matmul / 1e9:,.0f} GFLOP/s, attention {rates.attention / 1e9:,.0f} GFLOP/s, "
            f"copy {rates.bandwidth / 1e9:.1f} GB/s, matrix-vector {rates.matvec / 1e9:.1f} GB/s, "
            f"sigmoid {rates.transcendental / 1e9:.2f} G/s, scan {rates.scan / 1e9:.1f} GFLOP/s{fresh}"
            + (f", weight packing {rates.pack / 1e9:.1f} GB/s" if rates.pack else ""))


def typical_rates(*measured):
    """Per ceiling, the median of its measurements (before and between the rounds): the machine
    as the rows saw it, when other jobs share it."""
    fields = [f.name for f in dataclasses.fields(measured[0]) if f.name != "fresh_threshold"]
    values = {name: [getattr(r, name) for r in measured if getattr(r, name)] for name in fields}
    return dataclasses.replace(measured[0], **{name: statistics.median(v) if v else None
                                               for name, v in values.items()})


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# --- the models and the inputs ---------------------------------------------------------------------------


@dataclass
class Setup:
    """The shared models and what every row needs to know about them."""

    tower: object
    lm: object
    depth: int
    """The LLM's real depth the per-layer figures are extrapolated to."""
    image_token_id: int
    device: torch.device


def build_setup(args, device: torch.device, dtype: torch.dtype) -> Setup:
    from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM

    from meteor.model.vision import VisionTower

    widths = dict(QUICK_LLM if args.quick else LLMS[args.llm])
    depth = widths.pop("depth") if args.depth is None else args.depth
    vision = CLIPVisionConfig(**(QUICK_VIT if args.quick else VIT_L_336))
    tower = VisionTower.from_config(vision, dtype=dtype, attn_implementation=args.attention).to(device)
    config = LlamaConfig(**widths, num_hidden_layers=args.layers, max_position_embeddings=8192,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = args.attention
    with torch.device(device):
        lm = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    lm.requires_grad_(False)
    return Setup(tower, lm, depth, image_token_id=widths["vocab_size"], device=device)


def synthetic_image(seed: int):
    """A 1008×672 RGB image of smooth random colour (its content does not change any timing)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 12, 18, generator=generator)
    pixels = torch.nn.functional.interpolate(coarse, size=IMAGE_SIZE[::-1], mode="bicubic").clamp(0, 1)
    return Image.fromarray((pixels[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy())


def sliced_views(image, row: Row):
    from meteor.processing.slicing import plan_slices, slice_image

    return slice_image(image, plan=plan_slices(image.width, image.height, 6, 14, row.view_base))


def view_counts(sliced, row: Row) -> list[int]:
    return [rows * cols if row.tokens_per_slice is None else min(row.tokens_per_slice, rows * cols)
            for rows, cols in sliced.plan.view_patches]


def prompt(sliced, counts: list[int], before: int, after: int, setup: Setup, seed: int
           ) -> tuple[torch.Tensor, int]:
    """Token ids (1, T): ``before`` text ids, the image in LLaVA-UHD's spatial schema (image ids,
    a "," between the slices of a row, a newline after each row, the global view last), ``after``
    text ids. Returns the ids and the number of separator ids."""
    vocab = setup.lm.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, vocab, (before + after,), generator=generator).tolist()
    comma, newline = 29892 % vocab, 13
    rows, cols = sliced.plan.grid
    ids, separators = text[:before], 0
    for r in range(rows):
        for c in range(cols):
            ids += [setup.image_token_id] * counts[r * cols + c]
            ids.append(comma if c < cols - 1 else newline)
            separators += 1
    ids += [setup.image_token_id] * counts[-1] + text[before:]
    return torch.tensor([ids]), separators


def row_model(setup: Setup, row: Row, dtype: torch.dtype):
    from meteor.model.configuration import CompressorConfig, MeteorConfig
    from meteor.pretrained import assemble

    config = MeteorConfig(compressor=CompressorConfig(projector=row.projector, tokens_per_slice=row.tokens_per_slice))
    model = assemble(setup.tower, setup.lm, config, setup.image_token_id)
    model.compressor.to(setup.device, dtype).eval()
    return model


def image_inputs(sliced, device) -> dict[str, torch.Tensor]:
    """One prepared image as the model takes it (pixel_values, view_grids, image_grids)."""
    from meteor.processing.image_processor import image_tensors

    inputs = image_tensors([sliced], sliced.plan.patch_size)
    inputs.pop("image_sizes")
    return {name: tensor.to(device) for name, tensor in inputs.items()}


# --- one row, inference ----------------------------------------------------------------------------------


def measure_inference(model, setup: Setup, sliced, ids: torch.Tensor, decode_tokens: int, cache=None) -> dict:
    """One run: vision, compression and prefill (time to first token) of one prompt, then
    ``decode_tokens`` greedy tokens with the KV cache. LLM figures at the real depth. ``cache``: a
    FeatureCache the vision tower's outputs are read from."""
    clock = Clock(setup.device)
    layers = setup.lm.model.layers
    vision = ModuleTimer([model.model.tower], clock)
    compressor = ModuleTimer([model.compressor], clock)
    per_layer = ModuleTimer(layers, clock)
    scale = setup.depth / len(layers)
    try:
        with torch.inference_mode(), PeakMemory(setup.device) as memory:
            start = clock()
            inputs = image_inputs(sliced, setup.device)
            towers = None if cache is None else cache.encode_views(model.model, inputs["pixel_values"],
                                                                     inputs["view_grids"])
            embeds, _ = model.model.embed(ids.to(setup.device), **inputs, tower_outputs=towers)   # (1, T, D)
            embedded = clock()
            # the model's own forward (decoder and head) on the embedded prompt, then per new token
            out = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)                   # (1, 1)
            prefilled = clock()
            prefill_layers = per_layer.seconds
            kv = sum(t.numel() * t.element_size() for layer in out.cache.layers for t in (layer.keys, layer.values))
            per_layer.reset()
            cache = out.cache
            for _ in range(decode_tokens):
                out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
                cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            decoded = clock()
            del out, cache, embeds
    finally:
        for timer in (vision, compressor, per_layer):
            timer.remove()
    decode_layers = per_layer.seconds
    return {
        "vision_s": vision.seconds,
        "compression_s": compressor.seconds,
        "embed_s": embedded - start,
        "prefill_s": (prefilled - embedded) - prefill_layers + scale * prefill_layers,
        "prefill_layer_s": prefill_layers / len(layers),
        "decode_token_s": ((decoded - prefilled) - decode_layers + scale * decode_layers) / decode_tokens,
        "decode_layer_s": decode_layers / len(layers) / decode_tokens,
        "peak_extra_bytes": memory.extra,
        "kv_cache_bytes": int(kv * scale),
        "kv_cache_bytes_measured": int(kv),
    }


def best_of(runs: list[dict]) -> dict:
    """Per figure, the smallest over the runs (the least disturbed on a shared machine). The time to
    first token is the vision tower's time, plus the best of the rest of the embedding (projector,
    splicing; a feature-cache lookup in later rounds), plus the best prefill."""
    best = {key: min(run[key] for run in runs) for key in runs[0]}
    rest = min(run["embed_s"] - (run["vision_s"] if index == 0 else 0.0) for index, run in enumerate(runs))
    best["ttft_s"] = runs[0]["vision_s"] + rest + best["prefill_s"]
    best["peak_extra_bytes"] = runs[0]["peak_extra_bytes"]        # the round that ran the vision tower
    best["runs"] = len(runs)
    return best


# --- one row, training -----------------------------------------------------------------------------------


def measure_training(model, setup: Setup, sliced, ids: torch.Tensor, labels: torch.Tensor, stage: int,
                     cached: bool, repeats: int) -> dict:
    """Forward and backward of one sample (no optimizer step): stage 1 trains the projector, stage 2
    the projector and the LLM; ``cached``: the vision tower's outputs come from a FeatureCache."""
    from meteor.model.feature_cache import FeatureCache

    clock = Clock(setup.device)
    layers = setup.lm.model.layers
    per_layer = ModuleTimer(layers, clock, backward=True)
    vision = ModuleTimer([model.model.tower], clock)
    scale = setup.depth / len(layers)
    model.train()
    setup.lm.requires_grad_(stage == 2)
    model.compressor.requires_grad_(True)
    cache = FeatureCache() if cached else None
    ids, labels = ids.to(setup.device), labels.to(setup.device)
    inputs = image_inputs(sliced, setup.device)
    best: dict = {}
    try:
        if cached:
            cache.encode_views(model.model, inputs["pixel_values"], inputs["view_grids"])   # fills the cache
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            per_layer.reset()
            vision.reset()
            with PeakMemory(setup.device) as memory:
                start = clock()
                towers = None if cache is None else cache.encode_views(model.model, inputs["pixel_values"],
                                                                         inputs["view_grids"])
                loss = model(input_ids=ids, **inputs, labels=labels, tower_outputs=towers).loss
                loss.backward()
                done = clock()
            if not torch.isfinite(loss):
                raise RuntimeError(f"the training step's loss is {loss.item()}: the random weights overflowed")
            run = {"step_s": (done - start) - per_layer.seconds + scale * per_layer.seconds,
                   "layer_s": per_layer.seconds / len(layers), "vision_s": vision.seconds,
                   "peak_extra_bytes": memory.extra}
            best = run if not best else {k: min(best[k], v) for k, v in run.items()}
    finally:
        per_layer.remove()
        vision.remove()
        model.zero_grad(set_to_none=True)
        model.eval()
        setup.lm.requires_grad_(False)
    return best


def training_inputs(sliced, row: Row, stage: int, setup: Setup, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Stage 1 (template plain): the image, then a 24-token caption, all supervised. Stage 2
    (vicuna_v1): 40 tokens of system prompt and question before the image, 120 after it, the last
    100 (the answers) supervised."""
    before, after, supervised = (0, 24, 24) if stage == 1 else (40, 120, 100)
    ids, separators = prompt(sliced, view_counts(sliced, row), before, after, setup, seed)
    labels = torch.full_like(ids, -100)
    labels[:, -supervised:] = ids[:, -supervised:]
    return ids, labels, before + after, separators


# --- the cost model beside the measurements --------------------------------------------------------------

STAGES = (("vision", "vision_s"), ("compression", "compression_s"), ("prefill", "prefill_s"),
          ("decode_token", "decode_token_s"))


def shapes(model, setup: Setup):
    from meteor.bench import cost

    vision = cost.VisionShape.from_config(setup.tower.config, setup.tower.num_layers_run)
    llm = dataclasses.replace(cost.LlmShape.from_config(setup.lm.config), layers=setup.depth)
    return vision, llm


def inference_costs(model, setup: Setup, sliced, text: int, separators: int, itemsize: int, decode_context: int):
    from meteor.bench import cost

    vision, llm = shapes(model, setup)
    return cost.inference(vision, llm, model.meteor_config.compressor, sliced.plan.view_patches, text, separators,
                          itemsize, decode_context=decode_context)


# --- running everything ----------------------------------------------------------------------------------


def run(args) -> int:
    from meteor.bench.cost import Rates

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    resolve_dtypes(args, device)
    rows = [row for row in ROWS if row.name in args.rows]
    dtypes = list(dict.fromkeys(args.dtypes))
    train_rows = [row for row in ROWS if row.name in args.train_rows] if args.train else []
    clock = Clock(device)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results: dict = {"settings": {k: v for k, v in vars(args).items() if k != "run"}, "machine": machine(device),
                     "rates": {}, "inference": {}, "cost": {}, "training": {}, "rows": [r.name for r in rows]}
    image = synthetic_image(args.seed)
    print(f"machine: {results['machine']}; load average before: {load_before}", flush=True)
    needed = dtypes + ([args.train_dtype] if train_rows and args.train_dtype not in dtypes else [])
    setup = build_setup(args, device, DTYPES[needed[0]])
    print(f"built: CLIP {setup.tower.config.hidden_size}-wide, {setup.tower.num_layers_run} layers run; LLM "
          f"{setup.lm.config.hidden_size}-wide at {args.layers} of {setup.depth} layers "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    for dtype_name in needed:
        dtype = DTYPES[dtype_name]
        setup.tower.to(dtype)
        setup.lm.to(dtype)
        measured_rates = [measure_rates(device, dtype, args.quick, clock)]
        print(f"[{dtype_name}] {describe_rates(measured_rates[0])}", flush=True)

        def remeasure():
            measured_rates.append(measure_rates(device, dtype, args.quick, clock))

        inference_costs = training_costs = None
        if dtype_name in dtypes:
            results["inference"][dtype_name], inference_costs = run_inference(args, setup, image, rows, dtype,
                                                                              remeasure)
        if train_rows and dtype_name == args.train_dtype:
            results["training"], training_costs = run_training(args, setup, image, train_rows, dtype)
            remeasure()
        rates = typical_rates(*measured_rates)
        results["rates"][dtype_name] = {"used": dataclasses.asdict(rates),
                                        "measured": [dataclasses.asdict(r) for r in measured_rates]}
        print(f"[{dtype_name}] median of {len(measured_rates)}: {describe_rates(rates)}", flush=True)
        if inference_costs:
            results["cost"][dtype_name] = compare(results["inference"][dtype_name], inference_costs, rates, args)
        if training_costs:
            for name, steps in training_costs.items():
                for key, modelled in steps.items():
                    step = results["training"][name][key]
                    step.update(flops=modelled.flops, predicted_s=modelled.seconds(rates),
                                roofline_s=modelled.seconds(Rates.roofline(rates.matmul, rates.bandwidth)))
    results["decode_fit"] = {name: decode_fit(rows_out, setup.depth)
                             for name, rows_out in results["inference"].items()}
    results["load_average"] = {"before": load_before, "after": os.getloadavg() if load_before else None}
    results["wall_s"] = time.perf_counter() - started
    report = tables(results, args)
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(report + "\n")
    return 0


def run_inference(args, setup: Setup, image, rows, dtype, between_rounds=None) -> tuple[dict, dict]:
    """Every row's measurements, best of ``args.repeats`` rounds over all the rows (so a burst of
    load elsewhere hits one round of a row, not all of them; the vision tower runs in the first
    round only), and its stages' costs."""
    from meteor.model.feature_cache import FeatureCache

    itemsize = torch.finfo(dtype).bits // 8
    prepared, costs = {}, {}
    for row in rows:
        sliced = sliced_views(image, row)
        ids, separators = prompt(sliced, view_counts(sliced, row), args.text_tokens - 10, 10, setup, args.seed)
        model = row_model(setup, row, dtype)
        context = ids.shape[1] + (args.decode_tokens - 1) // 2   # the mean cache length while decoding
        costs[row.name] = inference_costs(model, setup, sliced, args.text_tokens, separators, itemsize, context)
        if costs[row.name].prompt_tokens != ids.shape[1]:
            raise RuntimeError(f"the cost model counts {costs[row.name].prompt_tokens} prompt tokens, the "
                               f"prompt has {ids.shape[1]}")
        prepared[row.name] = (model, sliced, ids, context)
    warm = min(rows, key=lambda r: prepared[r.name][2].shape[1])
    model, sliced, ids, _ = prepared[warm.name]
    measure_inference(model, setup, sliced, ids, 2)                     # warm-up: kernels, threads, the scan build
    runs: dict[str, list[dict]] = {row.name: [] for row in rows}
    cache = FeatureCache()
    for round_ in range(args.repeats):
        for row in rows:
            model, sliced, ids, _ = prepared[row.name]
            # The vision tower does the same work in every round: after the first, its outputs come
            # from a cache and only the projector and the LLM are timed again.
            run = measure_inference(model, setup, sliced, ids, args.decode_tokens, cache if round_ else None)
            if round_ == 0:
                with torch.no_grad():
                    inputs = image_inputs(sliced, setup.device)
                    cache.encode_views(model.model, inputs["pixel_values"], inputs["view_grids"])
            else:
                run["vision_s"] = runs[row.name][0]["vision_s"]
            runs[row.name].append(run)
            print(f"  [{DTYPE_NAMES[dtype]} {round_ + 1}/{args.repeats}] {row.name}: prompt {ids.shape[1]}, vision "
                  f"{run['vision_s']:.2f} s, compression {run['compression_s']:.2f} s, prefill {run['prefill_s']:.2f} s "
                  f"({run['prefill_layer_s']:.2f} s/layer), decode {1 / run['decode_token_s']:.2f} tok/s", flush=True)
        if between_rounds:
            between_rounds()
    measured = {}
    for row in rows:
        model, sliced, ids, context = prepared[row.name]
        out = best_of(runs[row.name])
        out.update(visual_tokens=sum(view_counts(sliced, row)), prompt_tokens=ids.shape[1], decode_context=context,
                   views=[list(g) for g in sliced.plan.view_patches])
        if costs[row.name].kv_cache_bytes != out["kv_cache_bytes"]:
            raise RuntimeError(f"KV cache: model {costs[row.name].kv_cache_bytes} B, measured {out['kv_cache_bytes']} B")
        measured[row.name] = out
    prepared.clear()
    return measured, costs


def compare(measured: dict, costs: dict, rates, args) -> dict:
    """Per row and stage: the cost model's FLOPs, bytes and predicted time beside the measured one,
    with every ceiling (``rates``) and with the plain two-number roofline."""
    from meteor.bench.cost import Rates

    plain = Rates.roofline(rates.matmul, rates.bandwidth)
    gpu = Rates.roofline(args.peak_tflops * 1e12, args.bandwidth_gbs * 1e9) if args.peak_tflops else None
    table = {}
    for name, stage_costs in costs.items():
        table[name] = {}
        for stage, key in STAGES:
            c, seconds = getattr(stage_costs, stage), measured[name][key]
            predicted, roofline = c.seconds(rates), c.seconds(plain)
            table[name][stage] = {
                "flops": c.flops, "matmul_flops": c.matmul_flops, "bytes": c.bytes, "measured_s": seconds,
                "predicted_s": predicted, "error": predicted / seconds - 1,
                "roofline_s": roofline, "roofline_error": roofline / seconds - 1,
                "achieved_flops": c.flops / seconds, "projected_s": c.seconds(gpu) if gpu else None}
    return table


def run_training(args, setup: Setup, image, rows, dtype) -> tuple[dict, dict]:
    """Every training row's steps, and their costs (``meteor.bench.cost.training_step``)."""
    from meteor.bench import cost

    itemsize = torch.finfo(dtype).bits // 8
    out: dict = {}
    costs: dict = {}
    warm = rows[-1]
    model = row_model(setup, warm, dtype)
    sliced = sliced_views(image, warm)
    ids, labels, _, _ = training_inputs(sliced, warm, 1, setup, args.seed)
    measure_training(model, setup, sliced, ids, labels, 1, True, 1)             # warm-up
    del model
    for row in rows:
        model = row_model(setup, row, dtype)
        sliced = sliced_views(image, row)
        vision, llm = shapes(model, setup)
        out[row.name], costs[row.name] = {}, {}
        for stage in (1, 2):
            ids, labels, text, separators = training_inputs(sliced, row, stage, setup, args.seed)
            for cached in (False, True):
                key = f"stage{stage}_{'cached' if cached else 'uncached'}"
                step = measure_training(model, setup, sliced, ids, labels, stage, cached, args.train_repeats)
                step["tokens"] = ids.shape[1]
                out[row.name][key] = step
                costs[row.name][key] = cost.training_step(vision, llm, model.meteor_config.compressor,
                                                          sliced.plan.view_patches, text, separators, itemsize,
                                                          stage, cached)
                print(f"  train {row.name} stage {stage} {'cached' if cached else 'uncached'}: "
                      f"{step['step_s']:.2f} s/sample ({step['layer_s']:.2f} s/layer)", flush=True)
        del model
    return out, costs


def decode_fit(rows_out: dict, depth: int) -> dict:
    """Decode time per layer and token against context, a + b·context (least squares over the rows),
    at the real depth; and the context at which the context part is 10 % of the fixed part."""
    from meteor.bench.cost import decode_crossover

    points = [(r["decode_context"], r["decode_layer_s"]) for r in rows_out.values()]
    if len(points) < 2 or len({x for x, _ in points}) < 2:
        return {}
    xs, ys = zip(*points)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)
    fixed = mean_y - slope * mean_x
    rest = statistics.fmean(r["decode_token_s"] - depth * r["decode_layer_s"] for r in rows_out.values())
    fixed_total = rest + depth * fixed
    return {"fixed_s": fixed_total, "per_context_token_s": depth * slope,
            "crossover_10pct": decode_crossover(fixed_total, depth * slope, 0.1)}


# --- the report ------------------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def tables(results: dict, args) -> str:
    depth_note = f"{args.layers} layers measured, extrapolated to the real depth"
    lines = [f"machine: {results['machine']}; {depth_note}; load average before/after "
             f"{results['load_average']['before']} / {results['load_average']['after']}; "
             f"wall {results['wall_s']:.0f} s", ""]
    for dtype, rows_out in results["inference"].items():
        rates = results["rates"][dtype]["used"]
        reference = rows_out.get(REFERENCE)
        lines += [f"### {dtype}: one 1008×672 image, {args.text_tokens} text tokens, {args.decode_tokens} decoded", "",
                  "| row | visual tokens | prompt | vision s | compression s | prefill s | TTFT s | decode tok/s "
                  "| KV cache MB | extra peak MB (measured depth) | prefill speed-up vs UHD-144 | token bound "
                  "| of bound |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in rows_out.items():
            if reference:
                speedup = reference["prefill_s"] / r["prefill_s"]
                bound = reference["prompt_tokens"] / r["prompt_tokens"]
                ratio = f"{speedup:.2f}× | {bound:.2f}× | {100 * speedup / bound:.0f}%"
            else:
                ratio = "– | – | –"
            lines.append(f"| {name} | {r['visual_tokens']} | {r['prompt_tokens']} | {r['vision_s']:.2f} | "
                         f"{r['compression_s']:.3f} | {r['prefill_s']:.2f} | {r['ttft_s']:.2f} | "
                         f"{1 / r['decode_token_s']:.3f} | {_mb(r['kv_cache_bytes'])} | "
                         f"{_mb(r['peak_extra_bytes'])} | {ratio} |")
        lines += [""] + decode_table(results, dtype, args) + [""]
        fresh = f", fresh pages {rates['fresh'] / 1e9:.1f} GB/s" if rates["fresh"] else ""
        pack = rates.get("pack")
        packing = (f", weight packing {pack / 1e9:.1f} GB/s" if pack else "")
        compute = "FLOPs / compute rate + weights / packing rate" if pack else "FLOPs / compute rate"
        lines += [f"cost model, {dtype}: predicted = Σ over ops of max({compute}, bytes / stream rate, "
                  f"exp-like / sigmoid rate) + fresh-page time, with the ceilings measured in this run (median of "
                  f"before and between the rounds): matmul {rates['matmul'] / 1e9:,.0f} GFLOP/s, attention "
                  f"{rates['attention'] / 1e9:,.0f} GFLOP/s, copy {rates['bandwidth'] / 1e9:.1f} GB/s, matrix-vector "
                  f"{rates['matvec'] / 1e9:.1f} GB/s, sigmoid {rates['transcendental'] / 1e9:.2f} G/s, selective scan "
                  f"{rates['scan'] / 1e9:.1f} GFLOP/s{fresh}{packing}. "
                  f"Roofline: matmul rate and copy bandwidth only.", "",
                  "| row | stage | GFLOP | GB moved | measured s | predicted s | error | roofline s | roofline error "
                  "| achieved GFLOP/s | of matmul rate |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, stages in results["cost"][dtype].items():
            for stage, c in stages.items():
                lines.append(f"| {name} | {stage} | {c['flops'] / 1e9:,.2f} | {c['bytes'] / 1e9:,.2f} | "
                             f"{c['measured_s']:.3f} | {c['predicted_s']:.3f} | {100 * c['error']:+.0f}% | "
                             f"{c['roofline_s']:.3f} | {100 * c['roofline_error']:+.0f}% | "
                             f"{c['achieved_flops'] / 1e9:,.1f} | {100 * c['achieved_flops'] / rates['matmul']:.0f}% |")
        errors = {stage: max(abs(stages[stage]["error"]) for stages in results["cost"][dtype].values())
                  for stage, _ in STAGES}
        lines += ["", f"largest cost-model error per stage ({dtype}): " +
                  ", ".join(f"{stage} {100 * e:.0f}%" for stage, e in errors.items()) +
                  f" (target ≤ 25%: {'met' if max(errors.values()) <= 0.25 else 'MISSED'})", ""]
        if args.peak_tflops:
            lines += projection(results, dtype, args)
    if results["training"]:
        lines += training_table(results, args)
    return "\n".join(lines)


def decode_table(results: dict, dtype: str, args) -> list[str]:
    """Decode speed per budget against UHD-144, the paper-like TPS, and where decoding stops mattering."""
    rows_out = results["inference"][dtype]
    reference = rows_out.get(REFERENCE)
    n = args.answer_tokens

    def tps(r: dict) -> float:
        return n / (r["ttft_s"] + n * r["decode_token_s"])

    lines = [f"| row | mean context | decode tok/s | vs UHD-144 | TPS, {n}-token answer incl. TTFT | vs UHD-144 "
             f"| paper TPS (vs UHD) | answer tokens at which decoding = prefill |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows_out.items():
        decode_change = tps_change = "–"
        if reference:
            decode_change = f"{100 * (reference['decode_token_s'] / r['decode_token_s'] - 1):+.1f}%"
            tps_change = f"{100 * (tps(r) / tps(reference) - 1):+.1f}%"
        paper = PAPER.get(name)
        paper_text = f"{paper[1]} ({100 * (paper[1] / PAPER[REFERENCE][1] - 1):+.1f}%)" if paper else "–"
        lines.append(f"| {name} | {r['decode_context']} | {1 / r['decode_token_s']:.3f} | {decode_change} | "
                     f"{tps(r):.3f} | {tps_change} | {paper_text} | {r['prefill_s'] / r['decode_token_s']:,.0f} |")
    fit = results["decode_fit"].get(dtype) or {}
    if fit:
        lines += ["", f"decode step = {fit['fixed_s'] * 1e3:,.0f} ms + {fit['per_context_token_s'] * 1e6:,.1f} µs "
                  f"per token of context (least squares over the rows): the context's share of a step reaches 10% "
                  f"at {fit['crossover_10pct']:,.0f} tokens of context; below that, fewer visual tokens barely "
                  f"change decoding speed."]
    return lines


def projection(results: dict, dtype: str, args) -> list[str]:
    """The cost model at the GPU rates the user gave, at the real depth: a projection, not a measurement."""
    lines = [f"PROJECTION (cost model, not measured) at {args.peak_tflops:g} TFLOP/s and {args.bandwidth_gbs:g} GB/s, "
             f"{dtype}, 100% of both rates (a lower bound):", "",
             f"| row | vision s | compression s | prefill s | TTFT s | decode tok/s | TPS, {args.answer_tokens}-token answer |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, stages in results["cost"][dtype].items():
        seconds = {stage: c["projected_s"] for stage, c in stages.items()}
        ttft = seconds["vision"] + seconds["compression"] + seconds["prefill"]
        tps = args.answer_tokens / (ttft + args.answer_tokens * seconds["decode_token"])
        lines.append(f"| {name} | {seconds['vision']:.4f} | {seconds['compression']:.4f} | {seconds['prefill']:.4f} | "
                     f"{ttft:.4f} | {1 / seconds['decode_token']:.1f} | {tps:.1f} |")
    lines += ["", "(Σ over each stage's ops of max(FLOPs / peak, bytes / bandwidth): no kernel overheads, no "
              "Python; decoding is bandwidth-bound.)", ""]
    return lines


def training_table(results: dict, args) -> list[str]:
    out = results["training"]
    reference = out.get(REFERENCE)
    lines = [f"### training, {args.train_dtype}: one sample per step, forward + backward, no optimizer step "
             f"(LLM at the real depth)", "",
             "| row | stage 1 s | stage 1, cached s | stage 2 s | stage 2, cached s | stage 2 predicted s (error) "
             "| epoch ratio | cached ratio | model ratio | paper h | paper ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def epoch(r: dict, cached: bool, key: str = "step_s") -> float:
        suffix = "cached" if cached else "uncached"
        return sum(STAGE_SAMPLES[s] * r[f"stage{s}_{suffix}"][key] for s in (1, 2))

    for name, r in out.items():
        ratio = cached_ratio = model_ratio = "–"
        if reference:
            ratio = f"{epoch(r, False) / epoch(reference, False):.3f}"
            cached_ratio = f"{epoch(r, True) / epoch(reference, True):.3f}"
            model_ratio = f"{epoch(r, False, 'predicted_s') / epoch(reference, False, 'predicted_s'):.3f}"
        hours, _ = PAPER.get(name, (None, None))
        paper = f"{hours} | {hours / PAPER[REFERENCE][0]:.3f}" if hours else "– | –"
        stage2 = r["stage2_uncached"]
        lines.append(f"| {name} | {r['stage1_uncached']['step_s']:.1f} | {r['stage1_cached']['step_s']:.1f} | "
                     f"{stage2['step_s']:.1f} | {r['stage2_cached']['step_s']:.1f} | {stage2['predicted_s']:.1f} "
                     f"({100 * (stage2['predicted_s'] / stage2['step_s'] - 1):+.0f}%) | {ratio} | {cached_ratio} | "
                     f"{model_ratio} | {paper} |")
    lines += ["", "epoch ratio: (558K × stage-1 step + 665K × stage-2 step) against UHD-144's; model ratio: the "
              "same from the cost model's predicted steps (uncached).", ""]
    return lines


# --- the command line ------------------------------------------------------------------------------------


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {', '.join(allowed)}")
        return names
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--rows", type=_names(ROW_NAMES), default=list(ROW_NAMES),
                        help=f"comma-separated rows (default all: {', '.join(ROW_NAMES)})")
    parser.add_argument("--dtypes", "--dtype", type=_names(tuple(DTYPES)), default=None,
                        help="inference dtypes, comma-separated (default fp32,bf16; fp32 alone where bf16 "
                             "products run slower than fp32's, as on CPUs without bf16 instructions)")
    parser.add_argument("--llm", choices=tuple(LLMS), default="13b", help="Vicuna-13B's widths (default) or 7B's")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers built and measured (default 2)")
    parser.add_argument("--depth", type=int, default=None,
                        help="depth the per-layer figures are extrapolated to (default: the LLM's, 40 / 32)")
    parser.add_argument("--text-tokens", type=int, default=50,
                        help="text tokens around the image at inference: 40 before, the rest after (default 50)")
    parser.add_argument("--decode-tokens", type=int, default=8, help="tokens generated after the prefill")
    parser.add_argument("--answer-tokens", type=int, default=128,
                        help="answer length of the TPS column: tokens / (TTFT + tokens × decode step)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds over the rows, the best kept per figure, after a warm-up (default 2; "
                             "1 with --quick)")
    parser.add_argument("--train-repeats", type=int, default=1, help="steps per training case, best kept")
    parser.add_argument("--no-train", dest="train", action="store_false", help="skip the training steps")
    parser.add_argument("--train-rows", type=_names(TRAIN_ROWS), default=list(TRAIN_ROWS))
    parser.add_argument("--train-dtype", choices=tuple(DTYPES), default=None,
                        help="dtype of the training steps (default bf16; fp32 where bf16 is slower)")
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's; 1 with --quick)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="project the cost model to a GPU of this matmul rate (needs --bandwidth-gbs)")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="the GPU's memory bandwidth, GB/s")
    parser.add_argument("--quick", action="store_true",
                        help="small widths (CLIP 64, LLM 128 of depth 4), same geometry and rows: seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    parser.add_argument("--markdown", default=None, help="write the tables to this file")
    return parser


def check(args) -> None:
    if (args.peak_tflops is None) != (args.bandwidth_gbs is None):
        raise ValueError("a GPU projection needs both --peak-tflops and --bandwidth-gbs")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if min(args.layers, args.decode_tokens, args.repeats, args.train_repeats) < 1:
        raise ValueError("--layers, --decode-tokens, --repeats and --train-repeats must be ≥ 1")
    if args.text_tokens < 10:
        raise ValueError(f"--text-tokens must be ≥ 10 (10 follow the image), got {args.text_tokens}")
    if args.quick:
        args.decode_tokens = min(args.decode_tokens, 4)
        # small ops on a shared machine: one thread avoids waiting at every parallel region
        args.threads = args.threads or 1


def bf16_speed_up(device: torch.device) -> float:
    """How much faster a bf16 product is than a float32 one here, from one (512×1024)·(1024×1024)
    product of each (best of 3). Below 1 on CPUs without bf16 instructions (AVX2 only, say), where
    PyTorch converts every element and bf16 runs several times slower than float32."""
    clock = Clock(device)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(512, 1024, device=device, dtype=dtype)
        b = torch.randn(1024, 1024, device=device, dtype=dtype)
        seconds[dtype] = _best(lambda: torch.matmul(a, b), clock)
    return seconds[torch.float32] / seconds[torch.bfloat16]


def resolve_dtypes(args, device: torch.device) -> None:
    """The default dtypes: fp32 and bf16, training in bf16; fp32 alone where bf16 is the slower one
    (at real widths bf16 would then take hours and says nothing about a machine built for it).
    Dtypes asked for by name are run whatever their speed."""
    if args.dtypes is not None and args.train_dtype is not None:
        return
    fast = args.quick or bf16_speed_up(device) >= 1.0
    if not fast:
        print("bf16 products run slower than fp32 ones on this machine (no bf16 instructions): measuring "
              "fp32 only; --dtypes bf16 / --train-dtype bf16 measure bf16 anyway", flush=True)
    if args.dtypes is None:
        args.dtypes = ["fp32", "bf16"] if fast else ["fp32"]
    if args.train_dtype is None:
        args.train_dtype = "bf16" if fast else "fp32"


def main(argv=None, prog: str | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    check(args)
    return run(args)


