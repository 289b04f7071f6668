"""The cost of ``meteor.compress`` at Qwen2.5-VL-7B's widths: vision, selection and prefill, all tokens
against K = 25 % and 11 % of each image's merged tokens.

One image of 1008×672 px (Qwen's processor keeps it: 72 × 48 patches of 14 px, 864 merged tokens)
and 40 + 10 text tokens around it, through transformers' own ``Qwen2_5_VLForConditionalGeneration``
built at the 7B's widths: the vision tower whole (32 blocks of width 1280, 16 heads, windows of
112 px, full attention in blocks 7, 15, 23, 31) and the language model at width 3584 (28 heads, 4
KV heads, FFN 18944) at reduced depth (--layers, 2 by default), every decoder layer timed by hooks
and the per-layer figures extrapolated to its 28 layers, as ``meteor.bench.e2e`` does for LLaVA:
real = measured − Σ layers + 28 × mean layer. The vocabulary is 16384, not 152064: only the
embedding lookup and one row of logits depend on it. Random weights.

Stages, as ``generate`` runs them: the tower (``get_image_features``), the selection (the visual
expert's scores, computed in a hook as the tower runs, then the Top-K, the shortened prompt and its
M-RoPE positions in the inner model's pre-hook; for all tokens: the model's own splice and position
layout), and the prefill (the language model on the prompt, first token's logits). The prefill
speed-up is printed beside its token bound, the ratio of the prompts' lengths.

    python -m meteor.bench.qwen_vl                      # fp32, CPU, 2 decoder layers measured
    python -m meteor.bench.qwen_vl --quick              # small widths, a 336×224 image: seconds
    python -m meteor.bench.qwen_vl --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from meteor.bench.e2e import Clock, ModuleTimer, machine

VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, window_size=112,
                 spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584,
                 fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
"""Qwen2.5-VL-7B-Instruct's vision config."""
TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               vocab_size=16384, depth=28, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                            "rope_theta": 1000000.0})
"""Its language model's widths (the vocabulary reduced, see the module docstring)."""
QUICK_VISION = dict(VISION_7B, depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                    fullatt_block_indexes=[1, 3])
QUICK_TEXT = dict(TEXT_7B, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512, depth=4, rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6],
                                                            "rope_theta": 1000000.0})
ROWS = (("all tokens", None), ("K = 25 %", 0.25), ("K = 11 %", 0.11))
IMAGE_SIZE = (1008, 672)
QUICK_IMAGE_SIZE = (336, 224)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SPECIAL = dict(image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)


def build_model(quick: bool, layers: int, dtype: torch.dtype, device: torch.device):
    """transformers' Qwen2_5_VLForConditionalGeneration at the 7B's widths, ``layers`` decoder layers."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(QUICK_TEXT if quick else TEXT_7B)
    depth = text.pop("depth")
    config = Qwen2_5_VLConfig(vision_config=QUICK_VISION if quick else VISION_7B,
                              text_config=dict(text, num_hidden_layers=layers, pad_token_id=0, bos_token_id=None,
                                               eos_token_id=2, max_position_embeddings=4096), **SPECIAL)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, depth


def image_inputs(seed: int, size: tuple[int, int] = IMAGE_SIZE) -> dict:
    """The image through transformers' Qwen image processor (PIL backend): pixel_values, image_grid_thw."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    width, height = size
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    pixels = torch.stack([x, y, (x + y) / 2]) * 200 + torch.rand(3, height, width, generator=generator) * 55
    image = Image.fromarray(pixels.clamp(0, 255).byte().permute(1, 2, 0).numpy())
    return dict(Qwen2VLImageProcessorPil()(images=[image], return_tensors="pt"))


def prompt(grid: torch.Tensor, before: int, after: int, vocab: int, seed: int) -> dict:
    """input_ids and mm_token_type_ids: ``before`` text tokens, the image's placeholders, ``after``."""
    tokens = int(grid.prod()) // 4
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(10, vocab, (before + after,), generator=generator)
    image = torch.tensor([SPECIAL["vision_start_token_id"]] + [SPECIAL["image_token_id"]] * tokens
                         + [SPECIAL["vision_end_token_id"]])
    ids = torch.cat([text[:before], image, text[before:]])[None]
    types = (ids == SPECIAL["image_token_id"]).long()
    return dict(input_ids=ids, mm_token_type_ids=types)


def measure(model, depth: int, inputs: dict, keep, device: torch.device) -> dict:
    """One run of a row: the tower, then the prefill with the encoded image, as ``generate`` runs them."""
    from meteor.adapters.qwen_vl import compress, uncompress

    clock = Clock(device)
    inner = model.model
    layers = inner.language_model.layers
    # Timers first: their hooks run before compress()'s, so the tower's time excludes the scoring.
    vision = ModuleTimer([inner.visual], clock)
    whole = ModuleTimer([inner], clock)
    language = ModuleTimer([inner.language_model], clock)
    per_layer = ModuleTimer(layers, clock)
    if keep is not None:
        compress(model, keep=keep)
    try:
        with torch.inference_mode():
            start = clock()
            encoded = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
            encoded_at = clock()
            out = model(input_ids=inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                        image_grid_thw=inputs["image_grid_thw"], mm_encoder_outputs={"image": encoded},
                        use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1)
            done = clock()
            prompt_tokens = out.cache.get_seq_length()
    finally:
        uncompress(model)
        for timer in (vision, whole, language, per_layer):
            timer.remove()
    measured_layers = per_layer.seconds
    scale = depth / len(layers)
    prefill = language.seconds - measured_layers + scale * measured_layers
    selection = (encoded_at - start - vision.seconds) + (whole.seconds - language.seconds)
    return {"vision_s": vision.seconds, "selection_s": selection, "prefill_s": prefill,
            "layer_s": measured_layers / len(layers), "ttft_s": vision.seconds + selection + prefill,
            "wall_s": done - start, "prompt_tokens": prompt_tokens,
            "visual_tokens": prompt_tokens - inputs["input_ids"].shape[1] + int(inputs["image_grid_thw"].prod()) // 4}


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    model, depth = build_model(args.quick, args.layers, dtype, device)
    vocab = model.config.text_config.vocab_size
    size = QUICK_IMAGE_SIZE if args.quick else IMAGE_SIZE
    small, inputs = image_inputs(args.seed, (224, 224)), image_inputs(args.seed, size)
    for prepared in (small, inputs):
        prepared.update(prompt(prepared["image_grid_thw"], 40, 10, vocab, args.seed))
        for name, value in prepared.items():
            prepared[name] = value.to(device, dtype) if name == "pixel_values" else value.to(device)
    load_before = os.getloadavg()
    began = time.perf_counter()
    measure(model, depth, small, 0.25, device)  # warm-up: every code path once, on a small image
    best: dict = {}
    for _ in range(args.repeats):
        for name, keep in ROWS:
            run_ = measure(model, depth, inputs, keep, device)
            best[name] = run_ if name not in best else {k: min(best[name][k], v) for k, v in run_.items()}
    return {"machine": machine(device), "dtype": args.dtype, "layers": args.layers, "depth": depth,
            "quick": args.quick, "repeats": args.repeats, "image": list(size),
            "grid_thw": inputs["image_grid_thw"][0].tolist(), "rows": best,
            "load_average": {"before": [round(v, 2) for v in load_before],
                             "after": [round(v, 2) for v in os.getloadavg()]},
            "wall_s": time.perf_counter() - began}


def table(results: dict) -> str:
    rows = results["rows"]
    reference = rows[ROWS[0][0]]
    t, h, w = results["grid_thw"]
    lines = [f"machine: {results['machine']}; {results['dtype']}; {results['layers']} of {results['depth']} "
             f"decoder layers measured, extrapolated; best of {results['repeats']}; load average before/after "
             f"{results['load_average']['before']} / {results['load_average']['after']}", "",
             f"one {results['image'][0]}×{results['image'][1]} image ({h}×{w} patches, {h * w // 4} merged tokens), "
             "50 text tokens", "",
             "| row | visual tokens | prompt | vision s | selection s | prefill s | TTFT s | prefill speed-up | "
             "token bound | of bound | TTFT speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        speedup = reference["prefill_s"] / r["prefill_s"]
        bound = reference["prompt_tokens"] / r["prompt_tokens"]
        lines.append(f"| {name} | {r['visual_tokens']} | {r['prompt_tokens']} | {r['vision_s']:.2f} | "
                     f"{r['selection_s']:.3f} | {r['prefill_s']:.2f} | {r['ttft_s']:.2f} | {speedup:.2f}× | "
                     f"{bound:.2f}× | {100 * speedup / bound:.0f}% | {reference['ttft_s'] / r['ttft_s']:.2f}× |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers built and measured (default 2)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the rows after a warm-up, best kept")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="small widths and a 336×224 image, the same rows: seconds (the tests run it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    return parser


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m meteor.bench.qwen_vl", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    if args.layers < 1 or args.repeats < 1:
        parser.error("--layers and --repeats must be ≥ 1")
    results = run(args)
    print(table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
