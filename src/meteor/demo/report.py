"""The demo's report folder: ``report.md``, ``results.json`` and the figures.

Figures: ``accuracy_vs_tokens.png`` (accuracy per question type against the visual tokens kept per
view), ``training_loss.png`` (stage 1 and stage 2 of every budget, from ``log.jsonl``) and
``selection_<image>.png`` (the paper's Figure 4: on each view of a test image, the patches the
visual expert alone, the native expert alone and their aggregate would keep).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from meteor.serve.visualize import selection_figure  # noqa: F401  (the demo's Figure 4; drawn by the library)

PAPER_DROP = (62.4, 59.3)
"""The paper's 12-benchmark average for Meteor at 144 and 32 tokens per slice (25 % → 5.6 %)."""


MIN_MARGIN = 0.05
"""The smallest gap, in accuracy, that the findings call "clearly above" a baseline."""


def two_standard_errors(accuracy: float, questions: int) -> float:
    """Two binomial standard errors of an accuracy measured on ``questions`` questions (about the
    half-width of its 95 % interval)."""
    return 2 * math.sqrt(accuracy * (1 - accuracy) / questions) if questions >= 1 else float("inf")


def margin(accuracy: float, questions: int) -> float:
    """How far above a baseline an accuracy measured on ``questions`` questions must be to count as
    clearly above it: two standard errors of the accuracy, and never less than ``MIN_MARGIN``."""
    return max(MIN_MARGIN, two_standard_errors(accuracy, questions))


def _clearly_above(cell: dict[str, Any], baseline: float) -> bool:
    return cell["accuracy"] > baseline + margin(cell["accuracy"], cell["questions"])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def budget_label(k: int | None, patches: int) -> str:
    kept = patches if k is None else k
    return f"{'all' if k is None else f'K={k}'} ({kept}/{patches}, {100 * kept / patches:.0f}%)"


def accuracy_plot(results: dict[str, Any], baselines: dict[str, Any], patches: int, path: Path) -> None:
    plt = _plt()
    budgets = results["budgets"]
    xs = [patches if b["k"] is None else b["k"] for b in budgets]
    types = list(budgets[0]["scores"]["accuracy"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in types:
        cells = [b["scores"]["accuracy"][name] for b in budgets]
        ys = [cell["accuracy"] for cell in cells]
        if name == "all":   # with two binomial standard errors: what the noise alone could move
            errors = [two_standard_errors(cell["accuracy"], cell["questions"]) for cell in cells]
            ax.errorbar(xs, ys, yerr=errors, marker="o", lw=2.5, capsize=4, color="black", label="all (± 2 s.e.)")
        else:
            ax.plot(xs, ys, marker="o", lw=1.2, label=name)
    ax.axhline(baselines["all"]["majority_accuracy"], ls="--", color="grey", label="majority (all)")
    ax.axhline(baselines["all"]["chance_accuracy"], ls=":", color="grey", label="chance (all)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(f"visual tokens kept per view (of {patches})")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Test accuracy vs token budget (one training per budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_plot(runs: dict[str, Path], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, folder in runs.items():
        for stage, ax in zip((1, 2), axes):
            log = folder / f"stage{stage}" / "log.jsonl"
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] \
                if log.is_file() else []
            rows = [r for r in rows if "loss" in r and "step" in r]
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    for stage, ax in zip((1, 2), axes):
        ax.set_title(f"stage {stage} ({'captions, compressor only' if stage == 1 else 'instructions, compressor + LLM'})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (mean over supervised tokens)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stages_using(config: dict[str, Any], field: str) -> str:
    """"stage 1 (weight 2) and stage 2 (weight 1) add" for the stages whose run sets ``field``;
    "" when none does."""
    weights = {stage: config.get(f"stage{stage}", {}).get(field, 0.0) for stage in (1, 2)}
    used = [f"stage {stage} (weight {weight:g})" for stage, weight in weights.items() if weight]
    return f"{' and '.join(used)} add{'s' if len(used) == 1 else ''}" if used else ""


def distillation_note(config: dict[str, Any]) -> str:
    """A sentence naming the stages trained with scene distillation (none: "")."""
    stages = _stages_using(config, "scene_distillation")
    if not stages:
        return ""
    return (f" Not in the paper: {stages} scene distillation, "
            "which pulls the LLM's hidden states on the conversation after the image towards those of a "
            "frozen copy of the starting LLaMA reading the scene written as text. It needs each record's "
            "scene, which only this world has (`meteor.demo.distill`; docs/demo-findings.md measures it).")


def glyph_note(config: dict[str, Any]) -> str:
    """A sentence naming the stages trained with glyph alignment (none: "")."""
    stages = _stages_using(config, "glyph_alignment")
    if not stages:
        return ""
    return (f" Also not in the paper: {stages} glyph alignment, "
            "which teaches the projector the world's texts: its output on each patch a text covers must "
            "be nearest, among the LLM's input embeddings, to the text's token. It needs where each text "
            "is, which only this world records (`meteor.demo.glyphs`; docs/demo-findings.md measures it).")


def text_note(config: dict[str, Any]) -> str:
    """A sentence on how the world's texts are drawn (they decide whether reading can be learnt)."""
    world = config.get("world", {})
    if "text_height_patches" not in world:
        return ""
    low, high = world["text_height_patches"]
    digits = world.get("number_digits", 3)
    stroke = world.get("text_stroke", 0.0)
    numbers = "single digits" if digits == 1 else f"numbers of 1-{digits} digits"
    return (f" The texts are words and {numbers}, "
            f"{low:g}-{high:g} patches tall{f', with a bold outline ({stroke:g} of their height)' if stroke else ''}, "
            "in grey on a grey background: the reading questions are about them.")


def write_markdown(path: Path, results: dict[str, Any], baselines: dict[str, Any], patches: int,
                   figures: list[str], timings: dict[str, float], notes: list[str],
                   cpu_timings: dict[str, float] | None = None) -> None:
    """``timings``: wall seconds per step; ``cpu_timings``: CPU seconds of the steps that have them."""
    budgets = results["budgets"]
    types = list(budgets[0]["scores"]["accuracy"])
    head = ["question type", "n", "± 95%", "chance", "majority", "blind prior"] + [budget_label(b["k"], patches) for b in budgets]
    lines = ["# meteor demo: LLaVA-Meteor trained end to end in the synthetic world", "",
             "Everything here was built by this run (or reused from an earlier run with the same "
             "configuration): the world, the tokenizer, a tiny CLIP trained contrastively on captions "
             "(with hard-negative captions), a tiny LLaMA (in the full demo, the one shipped with the "
             "package, pretrained on the world's scenes written as text), stage 1 and stage 2 of training "
             "once per token budget, and exact-match evaluation on the held-out test split."
             + text_note(results.get("config", {})) + distillation_note(results.get("config", {}))
             + glyph_note(results.get("config", {})), "",
             "## Accuracy per question type and token budget", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for name in types:
        base = baselines.get(name, {})
        questions = budgets[0]["scores"]["accuracy"][name]["questions"]
        row = [name, str(questions), f"{two_standard_errors(0.5, questions):.3f}",
               f"{base.get('chance_accuracy', float('nan')):.3f}", f"{base.get('majority_accuracy', float('nan')):.3f}",
               f"{base.get('form_majority_accuracy', float('nan')):.3f}"]
        row += [f"{b['scores']['accuracy'][name]['accuracy']:.3f}" for b in budgets]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "± 95%: the half-width of the 95 % interval of an accuracy measured on n questions, at its "
              "widest (two binomial standard errors at 0.5); differences between budgets smaller than "
              "this are within noise. "
              "chance: guessing among the answers a question admits; majority: always the most frequent "
              "answer of the type; blind prior: the most frequent answer per question wording (a model "
              "that never looks at the image). Each budget is a separate training (stage 1 + stage 2), "
              "as the paper trains one model per K.", "", "## Findings", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "## Figures", "", "![accuracy vs kept tokens](accuracy_vs_tokens.png)", "",
              "![training loss](training_loss.png)", "",
              "Which patches each expert keeps (the paper's Figure 4; faded = dropped, red outline = kept):", ""]
    lines += [f"![{name}]({name})" for name in figures]
    cpu_timings = cpu_timings or {}
    lines += ["", "## Time (seconds; 0 or missing = reused from an earlier run)", "",
              "Wall time per step, and the CPU time of the process that ran it (all its threads); steps "
              "of different budgets run at the same time.", "",
              "| step | wall s | CPU s |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds} | {cpu_timings.get(name, '')} |" for name, seconds in timings.items()]
    path.write_text("\n".join(lines) + "\n")


def findings(results: dict[str, Any], baselines: dict[str, Any], patches: int) -> list[str]:
    """Plain statements computed from the numbers, including the unflattering ones."""
    budgets = results["budgets"]
    notes = []
    for b in budgets:
        acc = b["scores"]["accuracy"]
        below = [t for t in acc if t != "all"
                 and not _clearly_above(acc[t], baselines.get(t, {}).get("majority_accuracy", 0.0))]
        label = budget_label(b["k"], patches)
        if below:
            notes.append(f"{label}: overall {acc['all']['accuracy']:.3f}; NOT clearly above the majority "
                         f"baseline (by less than two standard errors, or 5 points) on: {', '.join(below)}.")
        else:
            notes.append(f"{label}: overall {acc['all']['accuracy']:.3f}; clearly above the majority baseline "
                         f"(by more than two standard errors and 5 points) on every question type.")
    by_k = {b["k"]: b["scores"]["accuracy"]["all"]["accuracy"] for b in budgets}
    ks = sorted(k for k in by_k if k is not None)
    # Which question types a model answers better than the best image-blind guess (the most frequent
    # answer per question wording): only there does it use the image, and only there can budgets differ.
    types = [t for t in budgets[0]["scores"]["accuracy"] if t != "all"]
    seeing = {t for b in budgets for t in types
              if _clearly_above(b["scores"]["accuracy"][t], baselines.get(t, {}).get("form_majority_accuracy", 1.0))}
    if not seeing:
        prior = baselines.get("all", {}).get("form_majority_accuracy", 0.0)
        notes.append(f"No budget beats the blind prior (overall {prior:.3f}, the best a model that ignores the "
                     "image can do) on any question type by more than two standard errors: the models have not learnt to "
                     "use the image, so the accuracy differences between budgets are noise and say nothing "
                     "about compression. docs/demo-findings.md in the llava-meteor repository records what "
                     "was measured and what to try next.")
        return notes
    blind = sorted(set(types) - seeing)
    notes.append(f"The models use the image on: {', '.join(t for t in types if t in seeing)} (above the blind "
                 f"prior by more than two standard errors at some budget)"
                 + (f"; not on: {', '.join(blind)}, where the accuracy is what the question alone gives, so "
                    "budgets cannot be compared there." if blind else "."))
    if len(ks) >= 2:
        high, low = ks[-1], ks[0]
        drop = 100 * (by_k[high] - by_k[low])
        paper = PAPER_DROP[0] - PAPER_DROP[1]
        verdict = "more than" if drop > paper else "no more than"
        notes.append(f"Compression from K={high} ({100 * high / patches:.0f}%) to K={low} "
                     f"({100 * low / patches:.0f}%) costs {drop:.1f} accuracy points here, {verdict} the "
                     f"{paper:.1f} points the paper reports from 144 to 32 tokens per slice "
                     f"({PAPER_DROP[0]} → {PAPER_DROP[1]}, 12-benchmark average); most of that average "
                     f"is questions answered from the wording alone.")
        by_type = {b["k"]: b["scores"]["accuracy"] for b in budgets}
        notes.append(f"On the question types that use the image, K={high} → K={low}: " + ", ".join(
            f"{t} {by_type[high][t]['accuracy']:.2f} → {by_type[low][t]['accuracy']:.2f}"
            for t in types if t in seeing) + ".")
    if None in by_k and ks:
        notes.append(f"All {patches} tokens per view: {by_k[None]:.3f}; K={ks[-1]}: {by_k[ks[-1]]:.3f}.")
    return notes
