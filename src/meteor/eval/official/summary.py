"""The paper's Table 1 from several runs' scores.json files, as markdown.

Rows are models (or runs), columns the twelve benchmarks in the paper's order and their average:

    | Model | VQAT | VQAD | QAC | VQAI | GQA | VQAv2 | VizWiz | MMB | MMVet | MMMU | POPE | SEED | Avg |

Each cell is the ``headline`` of that benchmark's scores.json (percent, one decimal); "–" where the
benchmark did not run or could not be scored locally (VQAv2/VizWiz test-dev, MM-Vet without a
grader). The average is over the twelve; a row missing some is averaged over what it has and
marked with "*" and a footnote, so an incomplete row is never mistaken for a full one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

from meteor.eval.base import SCORES_FILE

TABLE1_COLUMNS: tuple[tuple[str, str], ...] = (
    ("VQAT", "textvqa"), ("VQAD", "docvqa"), ("QAC", "chartqa"), ("VQAI", "infovqa"), ("GQA", "gqa"),
    ("VQAv2", "vqav2"), ("VizWiz", "vizwiz"), ("MMB", "mmbench"), ("MMVet", "mmvet"), ("MMMU", "mmmu"),
    ("POPE", "pope"), ("SEED", "seed"))
"""(Table-1 header, benchmark name) in the paper's column order."""


def collect_headlines(paths: Sequence[str | Path]) -> dict[str, float | None]:
    """Benchmark name → headline, from scores.json files or folders holding them (searched
    recursively). Two files for the same benchmark are refused: which one is meant is unclear."""
    headlines: dict[str, float | None] = {}
    origin: dict[str, Path] = {}
    for path in map(Path, paths):
        files = sorted(path.rglob(SCORES_FILE)) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"{path} holds no {SCORES_FILE}")
        for file in files:
            scores = json.loads(file.read_text())
            benchmark = scores.get("benchmark")
            if benchmark not in dict((b, h) for h, b in TABLE1_COLUMNS):
                continue   # e.g. the demo world: not a Table-1 column
            if benchmark in headlines:
                raise ValueError(f"{benchmark} is scored twice, in {origin[benchmark]} and {file}: pass one")
            headlines[benchmark], origin[benchmark] = scores.get("headline"), file
    return headlines


def table1(rows: Mapping[str, Mapping[str, float | None]]) -> str:
    """Markdown Table 1 from {row name: {benchmark: headline}}."""
    header = ["Model"] + [name for name, _ in TABLE1_COLUMNS] + ["Avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    incomplete = False
    for model, headlines in rows.items():
        values = [headlines.get(benchmark) for _, benchmark in TABLE1_COLUMNS]
        present = [v for v in values if v is not None]
        average = "–"
        if present:
            average = f"{sum(present) / len(present):.1f}"
            if len(present) < len(values):
                average += "*"
                incomplete = True
        cells = ["–" if v is None else f"{v:.1f}" for v in values]
        lines.append("| " + " | ".join([model, *cells, average]) + " |")
    if incomplete:
        lines.append("")
        lines.append("\\* averaged over the benchmarks present in that row only.")
    return "\n".join(lines) + "\n"


def write_table1(runs: Mapping[str, Sequence[str | Path]], out_path: str | Path) -> str:
    """Write Table 1 for {row name: [scores.json files or folders]} to ``out_path``; return it."""
    text = table1({model: collect_headlines(paths) for model, paths in runs.items()})
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return text
