"""meteor.bench.e2e (benchmarks/bench_e2e.py, meteor bench) at small widths (--quick): the table's structure and that every row ran,
not its speed. The real-width figures are in docs/benchmarks.md."""

import argparse
import json

import pytest

from meteor import cli
from meteor.bench import e2e


@pytest.fixture(scope="module")
def bench():
    return e2e


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    assert bench.main(["--quick", "--json", str(folder / "out.json"), "--markdown", str(folder / "out.md"),
                       "--peak-tflops", "990", "--bandwidth-gbs", "3350"]) == 0
    return json.loads((folder / "out.json").read_text()), (folder / "out.md").read_text()


@pytest.mark.slow
def test_every_row_ran_in_both_dtypes(bench, quick):
    results, _ = quick
    assert set(results["inference"]) == {"fp32", "bf16"}
    for dtype, rows in results["inference"].items():
        assert list(rows) == list(bench.ROW_NAMES)
        for name, row in rows.items():
            for key in ("vision_s", "compression_s", "prefill_s", "ttft_s", "decode_token_s"):
                assert row[key] > 0, (dtype, name, key)
            assert row["kv_cache_bytes"] == row["kv_cache_bytes_measured"] * 2   # 2 of 4 layers built
    tokens = {name: row["visual_tokens"] for name, row in results["inference"]["fp32"].items()}
    assert tokens == {"llava15-mlp": 6 * 576 + 19 * 29, "uhd-resampler-144": 7 * 144, "meteor-144": 7 * 144,
                      "meteor-64": 7 * 64, "meteor-32": 7 * 32, "cls-topk-64": 7 * 64,
                      "downsample-64": 6 * 64 + 6 * 10}


@pytest.mark.slow
def test_the_cost_model_sits_beside_every_stage(bench, quick):
    results, _ = quick
    for dtype, rows in results["cost"].items():
        assert list(rows) == list(bench.ROW_NAMES)
        for stages in rows.values():
            assert list(stages) == ["vision", "compression", "prefill", "decode_token"]
            for stage in stages.values():
                assert stage["flops"] > 0 and stage["bytes"] > 0 and stage["predicted_s"] > 0
                assert stage["projected_s"] > 0
    assert set(results["rates"]) == {"fp32", "bf16"}


@pytest.mark.slow
def test_training_steps_for_every_budget(bench, quick):
    results, _ = quick
    assert list(results["training"]) == list(bench.TRAIN_ROWS)
    for row in results["training"].values():
        assert set(row) == {"stage1_uncached", "stage1_cached", "stage2_uncached", "stage2_cached"}
        assert all(step["step_s"] > 0 and step["predicted_s"] > 0 for step in row.values())
        assert row["stage2_uncached"]["tokens"] > row["stage1_uncached"]["tokens"]


@pytest.mark.slow
def test_the_tables(quick):
    _, markdown = quick
    for heading in ("### fp32", "### bf16", "### training, bf16", "PROJECTION (cost model, not measured)",
                    "| row | visual tokens | prompt | vision s |", "| row | stage | GFLOP |",
                    "| row | mean context | decode tok/s |", "largest cost-model error per stage (fp32)"):
        assert heading in markdown
    assert markdown.count("| meteor-32 |") >= 6


def test_the_command_line_runs_it(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert cli.main(["bench", "--quick", "--rows", "uhd-resampler-144,meteor-32", "--dtypes", "fp32",
                     "--no-train", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert list(results["inference"]["fp32"]) == ["uhd-resampler-144", "meteor-32"]
    assert results["training"] == {}
    assert "| meteor-32 |" in capsys.readouterr().out


def test_bad_options_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--rows", "meteor-33"])
    with pytest.raises(ValueError, match="both --peak-tflops and --bandwidth-gbs"):
        bench.main(["--quick", "--peak-tflops", "900"])


def test_bf16_is_left_out_by_default_where_it_is_the_slower_dtype(bench, monkeypatch, capsys):
    # An AVX2-only CPU (no bf16 instructions) runs bf16 products several times slower than fp32's.
    monkeypatch.setattr(bench, "bf16_speed_up", lambda device: 0.15)
    args = bench.add_arguments(argparse.ArgumentParser()).parse_args([])
    bench.resolve_dtypes(args, bench.torch.device("cpu"))
    assert (args.dtypes, args.train_dtype) == (["fp32"], "fp32")
    assert "bf16 products run slower than fp32" in capsys.readouterr().out
    asked = bench.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--dtypes", "bf16", "--train-dtype", "bf16"])
    bench.resolve_dtypes(asked, bench.torch.device("cpu"))
    assert (asked.dtypes, asked.train_dtype) == (["bf16"], "bf16")
    monkeypatch.setattr(bench, "bf16_speed_up", lambda device: 3.8)
    fast = bench.add_arguments(argparse.ArgumentParser()).parse_args([])
    bench.resolve_dtypes(fast, bench.torch.device("cpu"))
    assert (fast.dtypes, fast.train_dtype) == (["fp32", "bf16"], "bf16")


def test_the_bf16_speed_up_is_measured(bench):
    assert bench.bf16_speed_up(bench.torch.device("cpu")) > 0
