"""`meteor ablate`: the paper's Tables 1-4 as named variants, trained and evaluated in the demo's world.

A variant is a few overrides of the demo's compressor configuration; everything else (the world,
the tiny CLIP, the tiny LLaMA, the two-stage recipe, the seeds) is the demo's, so the rows of a
table differ only by what the variant names. The demo's pipeline caches each run in
``out/runs/<name>/`` by name and configuration, so a variant listed in several tables (the
default ``meteor``) is trained once, and a re-run reuses everything that did not change.

    from meteor.demo.ablate import run_ablation
    results = run_ablation("meteor-ablate", tables=["table2"], quick=True)

Writes ``out/ablation/results.json`` and ``out/ablation/tables.md``. Modules: ``variants`` (the
registry), ``run`` (training, evaluation, summaries over seeds), ``tables`` (the Markdown).
"""

from meteor.demo.ablate.run import (ELASTIC, correctness, measure, run_ablation, run_log, run_name, seed_counts, summarise_seeds,
                  visual_tokens)
from meteor.demo.ablate.tables import claim_verdicts, markdown
from meteor.demo.ablate.variants import (CLAIMS, DEFAULT_VARIANT, PAPER_BUDGETS, PAPER_WIDTHS, TABLES, VARIANTS, PaperRow, Table,
                       Variant, compressed_budgets, describe_variants, paper_width_config, select, variant_config,
                       variant_stages)

__all__ = ["CLAIMS", "DEFAULT_VARIANT", "ELASTIC", "PAPER_BUDGETS", "PAPER_WIDTHS", "TABLES", "VARIANTS", "PaperRow",
           "Table", "Variant", "claim_verdicts", "compressed_budgets", "correctness", "describe_variants", "markdown",
           "measure", "paper_width_config", "run_ablation", "run_log", "run_name", "seed_counts", "select",
           "summarise_seeds", "variant_config", "variant_stages", "visual_tokens"]
