"""The ablation's tables in Markdown, from ``results.json``: accuracy per question type (mean ± sd
over seeds), each row's paired difference to the row it is compared with, the paper's figures
beside ours, the claims stated as confirmed, contradicted or not resolved, Table 4's costs and the
elastic budgets."""

from __future__ import annotations

import math
from typing import Any, Sequence

from meteor.demo.ablate.variants import CLAIMS, IMPROVEMENTS, PAPER_BUDGETS, PAPER_WIDTHS, Table

def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _cell(entry: dict[str, Any] | None) -> str:
    """An accuracy cell: the mean over seeds ± their standard deviation (the mean alone for one seed)."""
    if not entry:
        return "–"
    sd = entry.get("sd")
    return _number(entry["accuracy"]) + ("" if sd is None else f" ± {sd:.3f}")


def _difference(row: dict[str, Any], group: str = "all") -> str:
    found = row.get("comparison", {}).get(group)
    if not found:
        return "–"
    return f"{found['difference']:+.3f} [{found['low']:+.3f}, {found['high']:+.3f}]"


def _millions(value: float | None) -> str:
    return "–" if value is None else f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value / 1e3:.1f}K"


def _types(results: dict[str, Any]) -> list[str]:
    types = [t for t in results["baselines"] if t != "all"]
    for row in results["variants"].values():
        types += [t for t in row["accuracy"] if t != "all" and t not in types]
    return types


def _mean(accuracy: dict[str, Any], types: Sequence[str], key: str = "accuracy") -> float | None:
    values = [accuracy[t][key] for t in types if t in accuracy and key in accuracy[t]]
    return sum(values) / len(values) if values else None


def markdown(results: dict[str, Any], tables: Sequence[Table]) -> str:
    """One markdown table per paper table from ``results`` (as written to results.json)."""
    types, baselines = _types(results), results["baselines"]
    config = results["config"]
    lines = ["# Ablations on the demo world", "",
             f"World: {config['world']['n_train_images']} train / {config['world']['n_test_images']} test "
             f"images, seed {config['seed']}; every variant has the same tiny CLIP, tiny LLaMA, recipe "
             f"and seed. Accuracy: exact match per question type; `all` pools the questions, `mean` "
             f"averages the types (like the paper's Avg over benchmarks). Tokens: visual tokens per view "
             f"and per image, mean over the test images' views. Parameters: the projector at the demo's "
             f"widths, and at the paper's (C={PAPER_WIDTHS['vision_width']}, D={PAPER_WIDTHS['text_width']}, "
             f"K={PAPER_BUDGETS[0]}/{PAPER_BUDGETS[1]}/{PAPER_BUDGETS[2]}, library defaults elsewhere) "
             f"beside the paper's figure. Train s: training-loop seconds, stage 1 + stage 2 (log.jsonl); "
             f"tokens/s: mean over stage-2 steps. Paper numbers are on its 12 benchmarks with Vicuna-13B: "
             f"compare directions, not values."]
    for table in tables:
        names = results["tables"][table.name]["variants"]
        rows = [results["variants"][n] for n in names]
        lines += ["", f"## {table.name}: {table.title}", ""]
        if table.name == "elastic":
            lines += _elastic(results.get("elastic", {}), [r for r in rows if r["name"] != "mlp"], types)
            continue
        if table.name == "training_free":
            lines += _training_free(results.get("training_free", {}), rows, types)
            continue
        lines += _efficiency(rows, table, types) if table.efficiency else _accuracy(rows, table, types, baselines)
        if table.per_type_differences:
            lines += _per_type_differences(rows, types)
        lines += _claims(results, table)
    return "\n".join(lines)


def _elastic(elastic: dict[str, Any], trained: list[dict[str, Any]], types: list[str]) -> list[str]:
    head = ["model", "trained at K", "run at K", "seeds", *types, "all", "Δ all [95 %]", "vs"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for row in trained:
        k = row["k"]
        lines.append("| " + " | ".join([f"`{row['name']}`", str(k), str(k), str(len(row.get("seeds", [0]))),
                                        *[_cell(row["accuracy"].get(t)) for t in [*types, "all"]], "", ""]) + " |")
    for row in elastic.values():
        lines.append("| " + " | ".join([f"`{row['trained']}`", str(row["trained_k"]), str(row["k"]),
                                        str(len(row["seeds"])), *[_cell(row["accuracy"].get(t)) for t in [*types, "all"]],
                                        _difference(row), f"`{row['compared_to']}`" if row.get("compared_to") else ""])
                     + " |")
    return lines


def _training_free(free: dict[str, Any], trained: list[dict[str, Any]], types: list[str]) -> list[str]:
    head = ["model", "K", "seeds", *types, "all", "Δ all [95 %]", "vs"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    by_k = {row["k"]: row for row in trained}
    for row in free.values():
        reference = by_k.get(row["k"])
        if reference is not None:
            lines.append("| " + " | ".join([f"`{reference['name']}` (trained)", str(row["k"]),
                                            str(len(reference.get("seeds", [0]))),
                                            *[_cell(reference["accuracy"].get(t)) for t in [*types, "all"]], "", ""])
                         + " |")
        lines.append("| " + " | ".join([f"`{row['trained']}` as CLS Top-K (no training)", str(row["k"]),
                                        str(len(row["seeds"])), *[_cell(row["accuracy"].get(t)) for t in [*types, "all"]],
                                        _difference(row), f"`{row['compared_to']}`" if row.get("compared_to") else ""])
                     + " |")
    return lines


def _per_type_differences(rows: list[dict[str, Any]], types: list[str]) -> list[str]:
    compared = [row for row in rows if row.get("compared_to")]
    if not compared:
        return []
    lines = ["", "Per question type, each row minus the row it is compared with (95 % interval, two-level "
                 "bootstrap over questions and seeds):", "",
             "| variant | vs | " + " | ".join(types) + " | all |", "|---|---|" + "---:|" * (len(types) + 1)]
    for row in compared:
        lines.append(f"| `{row['name']}` | `{row['compared_to']}` | "
                     + " | ".join(_difference(row, t) for t in [*types, "all"]) + " |")
    return lines


def claim_verdicts(results: dict[str, Any], table: Table) -> list[tuple[str, str, str]]:
    """(variant, the paper's claim about it, verdict) for every row of ``table`` the paper ranks
    below its default: confirmed when the default's accuracy is above the row's with 95 %
    confidence, contradicted when below, otherwise not resolved."""
    verdicts = []
    for name in results["tables"][table.name]["variants"]:
        claim = CLAIMS.get((table.name, name))
        found = results["variants"][name].get("comparison", {}).get("all")
        if claim is None or found is None:
            continue
        # the comparison is the variant minus its reference: the claim is that it is below 0, or, for
        # an improvement the claim is about (the question-conditioned token), above it
        better = IMPROVEMENTS.get((table.name, name), False)
        low, high = (found["low"], found["high"]) if better else (-found["high"], -found["low"])
        verdict = "confirmed" if low > 0 else "contradicted" if high < 0 else "not resolved at 95 %"
        verdicts.append((name, claim, verdict))
    return verdicts


def _claims(results: dict[str, Any], table: Table) -> list[str]:
    verdicts = claim_verdicts(results, table)
    if not verdicts:
        return []
    lines = ["", "The claims, each row against the row it is compared with (difference of overall accuracy, "
                 "two-level bootstrap over questions and seeds):", ""]
    for name, claim, verdict in verdicts:
        row = results["variants"][name]
        reference = results["variants"].get(row["compared_to"], {})
        lines.append(f"- {claim}: **{verdict}** ({_difference(row)} for `{name}` − `{row['compared_to']}`, "
                     f"{len(row.get('seeds', [0]))} seed(s) against {len(reference.get('seeds', [0]))}).")
    return lines


def _accuracy(rows: list[dict[str, Any]], table: Table, types: list[str],
              baselines: dict[str, Any]) -> list[str]:
    head = ["variant", "seeds", "tokens/view", "tokens/image", *types, "all", "Δ all [95 %]", "vs",
            "mean", "params (demo)", "params (paper widths)", "params (paper)", "train s", "tokens/s", "paper row",
            "paper avg"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 3) + "---|---:|"]
    for row in rows:
        paper = table.paper.get(row["name"])
        accuracy = row["accuracy"]
        cells = [f"`{row['name']}`", str(len(row.get("seeds", [0]))), _number(row["visual_tokens"]["per_view"], 1),
                 _number(row["visual_tokens"]["per_image"], 1),
                 *[_cell(accuracy.get(t)) for t in [*types, "all"]], _difference(row),
                 f"`{row['compared_to']}`" if row.get("compared_to") else "",
                 _number(_mean(accuracy, types)), _millions(row["parameters"]["demo"]),
                 _millions(row["parameters"]["paper_widths"]),
                 _millions(paper.parameters_m * 1e6) if paper and paper.parameters_m else "–",
                 _number(row["train_seconds"]["total"], 1), _number(row["tokens_per_s"], 0),
                 paper.label if paper else "", _number(paper.average, 1) if paper else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    for label, key in (("chance", "chance_accuracy"), ("majority", "majority_accuracy"),
                       ("blind prior", "form_majority_accuracy")):
        cells = [f"*{label}*", "", "", "", *[_number(baselines[t].get(key)) if t in baselines else "–"
                                             for t in [*types, "all"]], "", "",
                 _number(_mean(baselines, types, key)), *[""] * 7]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _efficiency(rows: list[dict[str, Any]], table: Table, types: list[str]) -> list[str]:
    head = ["variant", "tokens/view", "tokens/image", "params (demo)", "params (paper widths)", "params (paper)",
            "train s", "tokens/s", "eval s", "all", "mean", "paper row", "paper tokens", "paper train h",
            "paper TPS", "paper avg"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 10 + "---|" + "---:|" * 4]
    for row in rows:
        paper = table.paper.get(row["name"])
        cells = [f"`{row['name']}`", _number(row["visual_tokens"]["per_view"], 1),
                 _number(row["visual_tokens"]["per_image"], 1), _millions(row["parameters"]["demo"]),
                 _millions(row["parameters"]["paper_widths"]),
                 _millions(paper.parameters_m * 1e6) if paper and paper.parameters_m else "–",
                 _number(row["train_seconds"]["total"], 1), _number(row["tokens_per_s"], 0),
                 _number(row["eval_seconds"], 1), _number(row["accuracy"].get("all", {}).get("accuracy")),
                 _number(_mean(row["accuracy"], types))]
        if paper:
            cells += [paper.label, paper.tokens or "–", _number(paper.train_hours, 1),
                      _number(paper.tokens_per_s, 1), _number(paper.average, 1)]
        else:
            cells += ["", "–", "–", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
