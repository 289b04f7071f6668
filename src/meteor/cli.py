"""The `meteor` command: a thin table from subcommand to an importable function."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

PAPER_PARAMETERS = {"LLaVA-Meteor (Top-Down Compression)": 37.08e6, "LLaVA-UHD projector": 137.84e6}


def parameter_report(vision_width: int = 1024, text_width: int = 5120, **compressor_options) -> str:
    """A markdown table of the compressor's parameters at the given widths, beside the paper's."""
    from .compressor import count_parameters
    from .config import CompressorConfig

    config = CompressorConfig(vision_width=vision_width, text_width=text_width, **compressor_options)
    counts = count_parameters(config)
    lines = [f"Top-Down Compression at C={vision_width}, D={text_width} "
             f"(scan={config.scan_mode}, fgf_layers={config.fgf_layers}, d_state={config.d_state}, "
             f"expand={config.expand}, direction_merge={config.direction_merge}); counted on the meta device",
             "", "| part | parameters |", "|---|---:|"]
    lines += [f"| {name} | {count:,} ({count / 1e6:.2f}M) |" for name, count in counts.items()]
    lines += ["", "| paper (Table 4) | parameters |", "|---|---:|"]
    lines += [f"| {name} | {count / 1e6:.2f}M |" for name, count in PAPER_PARAMETERS.items()]
    return "\n".join(lines)


def _params(args: argparse.Namespace) -> int:
    print(parameter_report(args.vision_width, args.text_width, scan_mode=args.scan_mode,
                           fgf_layers=args.fgf_layers, direction_merge=args.direction_merge))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=args.out, seed=args.seed)
    return 0


def _train(args: argparse.Namespace) -> int:
    import signal

    from .train import train
    from .train.args import from_namespace

    result = train(from_namespace(args))
    if result.interrupted:
        # The conventional exit status of a process ended by a signal, so schedulers requeue it.
        return 128 + getattr(signal, result.signal_name or "SIGTERM")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meteor", description="LLaVA-Meteor: Top-Down Compression "
                                     "of visual tokens for LLaVA-style vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the whole pipeline on the embedded tiny default")
    demo.add_argument("--out", default="meteor-demo", help="folder for the demo's outputs")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    from .train.args import add_arguments

    train = commands.add_parser("train", help="train stage 1 or 2 on LLaVA-format data",
                                description="Train LLaVA-Meteor (stage presets: 1 = pre-training, "
                                "2 = instruction tuning; every value can be overridden).")
    add_arguments(train)
    train.set_defaults(run=_train)

    params = commands.add_parser("params", help="count the compressor's parameters (meta device)")
    params.add_argument("--vision-width", type=int, default=1024, help="C (CLIP ViT-L/14: 1024)")
    params.add_argument("--text-width", type=int, default=5120, help="D (Vicuna-13B: 5120)")
    params.add_argument("--scan-mode", default="l2s", choices=["single", "l2s", "both"])
    params.add_argument("--fgf-layers", type=int, default=1)
    params.add_argument("--direction-merge", default="mean", choices=["mean", "concat"])
    params.set_defaults(run=_params)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"meteor {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
