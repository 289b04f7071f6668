"""`meteor ablate`: the registry, the command line, and every variant trained and evaluated in a tiny world."""

import dataclasses
import json
from pathlib import Path
import math
import subprocess
import sys

import pytest

from meteor.demo.ablate import (DEFAULT_VARIANT, PAPER_BUDGETS, PAPER_WIDTHS, TABLES, VARIANTS, markdown,
                           paper_width_config, run_ablation, select, variant_config, variant_stages,
                                 visual_tokens)
from meteor.model.projectors import count_parameters
from meteor.model.configuration import CompressorConfig
from meteor.demo import StageRun, full_config, quick_config
from meteor.demo.world import WorldConfig


def _meteor(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "meteor", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def tiny_config():
    """The quick demo on 24 train / 6 test images, one CLIP epoch, a couple of steps per stage."""
    quick = quick_config()
    return dataclasses.replace(
        quick, world=dataclasses.replace(quick.world, n_train_images=24, n_test_images=6),
        clip=dataclasses.replace(quick.clip, epochs=1),
        stage1=StageRun(epochs=1, global_batch_size=24, learning_rate=1e-3, glyph_alignment=1.0),
        stage2=StageRun(epochs=1, global_batch_size=48, learning_rate=1e-3))


# --- the registry -------------------------------------------------------------------------------------

def test_every_variant_differs_from_the_default_only_where_it_says():
    config = full_config()
    default = dataclasses.asdict(variant_config(VARIANTS[DEFAULT_VARIANT], config))
    for variant in VARIANTS.values():
        built = dataclasses.asdict(variant_config(variant, config))
        assert {k: v for k, v in built.items() if k != "compressor"} == \
               {k: v for k, v in default.items() if k != "compressor"}, variant.name
        changed = {k for k, v in built["compressor"].items() if v != default["compressor"][k]}
        said = set(variant.overrides) | ({"tokens_per_slice"} if variant.budget_index != 0 else set())
        assert changed == said, (variant.name, changed, said)
        assert all(built["compressor"][k] == v for k, v in variant.overrides.items())


def test_no_two_variants_train_the_same_model():
    config = full_config()
    seen = {}
    for variant in VARIANTS.values():
        key = variant_config(variant, config).to_json() + repr(variant_stages(variant, config))
        assert key not in seen, f"{variant.name} duplicates {seen.get(key)}"
        seen[key] = variant.name


def test_the_tables_follow_the_papers_and_the_default_is_run_once():
    assert set(TABLES) == {"table1", "table2", "table3", "table4", "elastic", "training_free", "question"}
    assert {VARIANTS[n].overrides.get("projector", "meteor") for n in TABLES["table1"].variants} == \
           {"meteor", "mlp", "resampler", "avgpool", "cls_topk", "random_topk"}
    assert {VARIANTS[n].overrides.get("scan_mode", "l2s") for n in TABLES["table2"].variants} == \
           {"single", "l2s", "both"}
    assert {VARIANTS[n].overrides.get("window_size", 3) for n in TABLES["table2"].variants} == {3, 5, 7}
    assert {VARIANTS[n].overrides.get("expert_mode", "both") for n in TABLES["table3"].variants} == \
           {"visual", "native", "both"}
    assert CompressorConfig().lam == 0.8 and len({VARIANTS[n].overrides.get("lam", 0.8)
                                                   for n in TABLES["table3"].variants}) >= 4
    assert set(TABLES["table1"].variants) <= set(TABLES["table4"].variants)
    _, variants = select()
    names = [v.name for v in variants]
    assert names.count(DEFAULT_VARIANT) == 1 and set(names) == set(VARIANTS)
    assert [v.name for v in select(["table2", "table3"], ["meteor", "lam0.5"])[1]] == ["meteor", "lam0.5"]


def test_unknown_names_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="valid tables: table1, table2, table3, table4, elastic, training_free, question"):
        select(["table5"])
    with pytest.raises(ValueError, match="valid variants: meteor, mlp"):
        select(None, ["metor"])
    with pytest.raises(ValueError, match="in none of the tables"):
        select(["table1"], ["window7"])


def test_paper_width_counts_use_the_papers_widths_and_k():
    meteor = paper_width_config(VARIANTS["meteor"])
    assert (meteor.vision_width, meteor.text_width, meteor.tokens_per_slice) == (1024, 5120, 144)
    assert count_parameters(meteor)["total"] == 38_511_616              # `meteor params` prints the same
    resampler = paper_width_config(VARIANTS["resampler"])
    assert count_parameters(resampler)["total"] == count_parameters(
        CompressorConfig(projector="resampler", tokens_per_slice=144, **PAPER_WIDTHS))["total"]
    assert paper_width_config(VARIANTS["meteor_5pct"]).tokens_per_slice == PAPER_BUDGETS[2]
    assert paper_width_config(VARIANTS["mlp"]).tokens_per_slice is None


def test_visual_tokens_count_every_view():
    world = WorldConfig(base_size=112, patch_size=14, max_slices=6)
    unsliced = visual_tokens([(112, 112)], 16, world)
    assert unsliced == {"per_view": 16.0, "per_image": 16.0}
    assert visual_tokens([(112, 112)], None, world) == {"per_view": 64.0, "per_image": 64.0}
    # 224² at base 112 is 4 slices (2×2) and the global view: 5 views, against the unsliced image's 1.
    sliced = visual_tokens([(112, 112), (224, 224)], 16, world)
    assert sliced == {"per_view": 16.0, "per_image": (16 + 5 * 16) / 2}
    assert visual_tokens([(112, 112), (224, 224)], None, world) == {"per_view": 64.0, "per_image": (64 + 5 * 64) / 2}


# --- the command line ---------------------------------------------------------------------------------

def test_cli_list_prints_every_table_and_override():
    done = _meteor("ablate", "--list")
    assert done.returncode == 0, done.stderr
    for name, table in TABLES.items():
        assert f"\n{name}: " in done.stdout
    for variant in VARIANTS.values():
        assert variant.name in done.stdout
        for key, value in variant.overrides.items():
            assert f"{key}={value}" in done.stdout
    one = _meteor("ablate", "--list", "--table", "table2")
    assert "table2" in one.stdout and "table1" not in one.stdout and "scan_single" in one.stdout


def test_cli_refuses_unknown_names_listing_the_valid_ones(tmp_path):
    done = _meteor("ablate", "--table", "table7", "--out", "x", cwd=tmp_path)
    assert done.returncode == 2 and "valid tables: table1, table2, table3, table4, elastic, training_free, question" in done.stderr
    done = _meteor("ablate", "--variant", "nope", "--out", "x", cwd=tmp_path)
    assert done.returncode == 2 and "valid variants:" in done.stderr and "scan_single" in done.stderr
    assert not (tmp_path / "x").exists()                 # refused before anything is built


# --- every variant, end to end -------------------------------------------------------------------------

@pytest.mark.slow
def test_every_variant_trains_and_evaluates(tmp_path, capfd):
    results = run_ablation(tmp_path / "out", config=tiny_config())
    printed = capfd.readouterr().out       # the variants run in worker processes: their output too
    assert set(results["variants"]) == set(VARIANTS)
    assert printed.count(f"{DEFAULT_VARIANT}, stage 1: training") == 1      # shared by four tables
    # glyph alignment trains every token-wise projector; the resampler, which has none, goes without
    assert "resampler: no glyph alignment (the 'resampler' projector has no token-wise MLP)" in printed
    for name in VARIANTS:
        log = (tmp_path / "out" / "runs" / name / "stage1" / "log.jsonl").read_text()
        assert ('"glyph"' in log) == (name != "resampler"), name
    written = json.loads((tmp_path / "out" / "ablation" / "results.json").read_text())
    assert set(written["variants"]) == set(VARIANTS)
    for name, row in written["variants"].items():
        assert row["accuracy"] and all(math.isfinite(v["accuracy"]) for v in row["accuracy"].values()), name
        assert row["visual_tokens"]["per_image"] >= row["visual_tokens"]["per_view"] > 0
        assert row["train_seconds"]["total"] > 0 and row["tokens_per_s"] > 0 and row["eval_seconds"] >= 0
        # paper-width counts are count_parameters of the variant at C=1024, D=5120
        assert row["parameters"]["paper_widths"] == count_parameters(paper_width_config(VARIANTS[name]))["total"]
        assert row["parameters"]["demo_widths"] == {"C": 32, "D": 32}
    assert written["variants"]["meteor"]["visual_tokens"]["per_view"] == 16
    assert 16 < written["variants"]["mlp"]["visual_tokens"]["per_view"] <= 64    # slices may be smaller
    assert written["variants"]["meteor"]["tables"] == ["table1", "table2", "table3", "table4", "elastic", "training_free"]
    text = (tmp_path / "out" / "ablation" / "tables.md").read_text()
    assert text == markdown(written, list(TABLES.values())) + "\n"
    for name in TABLES:
        assert f"## {name}: " in text
    for name in VARIANTS:
        assert f"| `{name}` |" in text
    meteor_row = next(line for line in text.splitlines() if line.startswith("| `meteor` |"))
    assert "38.51M" in meteor_row and "37.08M" in meteor_row                 # ours beside the paper's
    resampler_row = next(line for line in text.splitlines() if line.startswith("| `resampler` |"))
    assert "137.84M" in resampler_row
    assert text.count("| *chance* |") == 4 and text.count("| *majority* |") == 4
    # the single-question variants trained on one record per question, over the same number of steps
    single = json.loads((tmp_path / "out" / "runs" / "single_turn" / "stage2" / "train_config.json").read_text())
    usual = json.loads((tmp_path / "out" / "runs" / "meteor" / "stage2" / "train_config.json").read_text())
    assert single["data"].endswith("single_turn.json") and single["epochs"] == usual["epochs"] / 4
    assert len(json.loads(Path(single["data"]).read_text())) == 4 * len(json.loads(Path(usual["data"]).read_text()))
    assert written["variants"]["question_5pct"]["compared_to"] == "single_turn_5pct"
    # elastic budgets: the K=16 model run at K′ = 7 and 3, each against the model trained there
    elastic = written["elastic"]
    assert set(elastic) == {"meteor@k7", "meteor@k3", "meteor_11pct@k3"}
    assert elastic["meteor@k3"]["compared_to"] == "meteor_5pct" and elastic["meteor@k3"]["k"] == 3
    rows = [json.loads(line) for line in
            (tmp_path / "out" / "eval" / "meteor@k3" / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(row["tokens_per_slice"] == 3 for row in rows)
    assert "| `meteor` | 16 | 3 |" in text
    # training-free: the all-tokens LLaVA-1.5 model loaded as CLS Top-K at each K, against Meteor trained at K
    free = written["training_free"]
    assert set(free) == {"mlp+cls_topk@k16", "mlp+cls_topk@k7", "mlp+cls_topk@k3"}
    assert [free[f"mlp+cls_topk@k{k}"]["compared_to"] for k in (16, 7, 3)] == ["meteor", "meteor_11pct", "meteor_5pct"]
    assert "| `mlp` as CLS Top-K (no training) | 3 |" in text

    again = run_ablation(tmp_path / "out", tables=["table2"], variants=["meteor"], config=tiny_config())
    assert {"meteor/stage1", "meteor/stage2", "eval/meteor"} <= set(again["reused"])
    assert again["variants"]["meteor"]["accuracy"] == written["variants"]["meteor"]["accuracy"]

    # a second training seed for the default: only its run trains; cells become mean ± sd
    seeded = run_ablation(tmp_path / "out", tables=["table1"], variants=["meteor", "cls_topk"],
                          config=tiny_config(), seeds={"*": 1, "meteor": 2})
    assert {"meteor/stage1", "cls_topk/stage1", "eval/cls_topk"} <= set(seeded["reused"])
    assert "meteor-seed1/stage1" not in seeded["reused"]
    meteor = seeded["variants"]["meteor"]
    assert meteor["seeds"] == [0, 1] and len(meteor["accuracy"]["all"]["per_seed"]) == 2
    assert meteor["accuracy"]["all"]["per_seed"][0] == written["variants"]["meteor"]["accuracy"]["all"]["accuracy"]
    assert meteor["accuracy"]["all"]["sd"] is not None
    found = seeded["variants"]["cls_topk"]["comparison"]["all"]
    assert found["low"] <= found["difference"] <= found["high"] and tuple(found["seeds"]) == (1, 2)
