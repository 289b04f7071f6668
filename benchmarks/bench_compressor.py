"""The whole Top-Down Compression module against the CLIP ViT-L/14-336 encoder, same run.

Paper widths (C = 1024, D = 5120, K = 144), 7 views of 336×336 (6 slices + global), fp32, random
init (timing does not depend on the weights' values), inference. The encoder is transformers'
`CLIPVisionModel` with SDPA attention run over all 24 layers (the reference); the compressor is
Flash Global Fusion + Visual-Native Selection (the target: at most 6% of the encoder's time), and
separately the projector MLP to D that follows it.

    python benchmarks/bench_compressor.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up: first-call allocations, kernel build
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--views", type=int, default=7)
    parser.add_argument("--tokens-per-slice", type=int, default=144)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import CLIPVisionConfig, CLIPVisionModel

    from meteor.model.projectors import TopDownCompression
    from meteor.model.configuration import CompressorConfig
    from meteor.model.ops import scan_backend

    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, attn_implementation="sdpa")).eval()
    compressor = TopDownCompression(CompressorConfig(
        vision_width=1024, text_width=5120, tokens_per_slice=args.tokens_per_slice)).eval()

    pixels = torch.randn(args.views, 3, 336, 336)
    tokens = torch.randn(args.views, 576, 1024)
    cls_attention = torch.softmax(torch.randn(args.views, 576), dim=-1)

    def encoder():
        with torch.inference_mode():
            clip(pixel_values=pixels)

    def fusion_and_selection():
        with torch.inference_mode():
            fused = compressor.fusion(tokens, (24, 24))
            compressor.selection(fused.fused, fused.instruction, cls_attention)

    def projector():
        with torch.inference_mode():
            compressor.mlp(tokens[:, :args.tokens_per_slice])

    rows = []
    timings = {}
    for name, fn in [("CLIP ViT-L/14-336 encoder (24 layers, SDPA)", encoder),
                     ("Flash Global Fusion + Visual-Native Selection", fusion_and_selection),
                     (f"projector MLP on the kept {args.tokens_per_slice} tokens/view", projector)]:
        seconds = _time(fn, args.repeats)
        timings[name] = statistics.median(seconds)
        rows.append((name, statistics.median(seconds), min(seconds)))
        print(f"  measured {name}: median {statistics.median(seconds) * 1e3:.0f} ms", flush=True)

    encoder_s = rows[0][1]
    print()
    print(f"machine: {_cpu_name()}, {args.threads} threads, torch {torch.__version__}; "
          f"selective scan: {scan_backend(torch.device('cpu'))}; {args.views} views, fp32, "
          f"median of {args.repeats} after a warm-up")
    print()
    print("| part | median ms | min ms | share of the encoder |")
    print("|---|---:|---:|---:|")
    for name, median, best in rows:
        print(f"| {name} | {median * 1e3:.0f} | {best * 1e3:.0f} | {100 * median / encoder_s:.1f}% |")
    share = rows[1][1] / encoder_s
    print()
    print(f"compressor (FGF + VNS) / encoder = {100 * share:.1f}% (target ≤ 6%): "
          f"{'met' if share <= 0.06 else 'MISSED'}")


if __name__ == "__main__":
    main()
