"""benchmarks/bench_serve.py's model-alone measurement (``ModelAlone``): the servers' own batching
worker and request preparation on the tiny model, fed OpenAI request bodies with PNG data URLs (what
the benchmark's clients send a real `meteor serve`). What is checked is that it measures what it
says (the batches it formed, every request answered, the same answers at every batch size), not its
speed: the figures are in docs/benchmarks.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from benchmarks.bench_serve import ModelAlone, _flag, alone_rounds, markdown
from talk_helpers import data_url, noise_image, png_bytes, save_talkative_model


def request_body(question: str, seed: int, size: tuple[int, int]) -> bytes:
    image = data_url(png_bytes(noise_image(seed, size)))
    return json.dumps({"model": "bench", "temperature": 0, "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "text", "text": question},
                                     {"type": "image_url", "image_url": {"url": image}}]}]}).encode()


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    model_dir = save_talkative_model(tmp_path_factory.mktemp("bench_serve") / "tiny")
    alone = ModelAlone(model_dir, threads=1)
    sizes = [(56, 56), (112, 56), (168, 112), (56, 112), (112, 112)]
    alone.prepare("questions", [request_body(f"What is in image {i}?", i, size) for i, size in enumerate(sizes)])
    return alone


def test_the_model_alone_forms_the_batches_asked_for_and_answers_every_request(alone):
    single = alone.measure("questions", 1)
    batched = alone.measure("questions", 2)
    assert single["batch_sizes"] == {1: 5}
    assert batched["batch_sizes"] == {1: 1, 2: 2}          # 5 requests queued at once: 2 + 2 + 1
    assert single["rps"] > 0 and batched["rps"] > 0 and single["cpu_ms"] > 0
    assert all(single["answers"]) and single["answers"] == batched["answers"]
    assert len(set(single["answers"])) > 1                   # five images, not one answer repeated


def test_alone_rounds_report_the_ratio_and_the_table_names_it(alone):
    results = alone_rounds(alone, ["questions"], 4, rounds=2)
    cell = results["questions"]
    assert cell["batch_size"] == 4 and cell["requests"] == 5 and cell["answers_differing"] == 0
    assert cell["ratio"] == pytest.approx(cell["batched"]["rps"] / cell["single"]["rps"])
    assert len(cell["per_round"]) == 2
    meta = {"model": "tiny", "views": "K=4", "cpu": "cpu", "threads": 1, "batching": ["--max-batch-size", "4"],
            "server_args": [], "rounds": 2, "workers": ["process"]}
    table = markdown({}, meta, results)
    assert "| workload |" not in table                      # no servers ran: no servers' table
    assert f"**{cell['ratio']:.2f}×**" in table and "model alone" in table


def test_server_flags_are_read_in_both_spellings():
    assert _flag(["--max-batch-size", "16", "--batch-window-ms", "15"], "--max-batch-size") == 16
    assert _flag(["--threads=2"], "--threads") == 2
    assert _flag(["--batch-window-ms", "15"], "--max-batch-size") is None
    with pytest.raises(ValueError, match="--max-batch-size must be a whole number ≥ 1, got 'x'"):
        _flag(["--max-batch-size", "x"], "--max-batch-size")


def test_a_malformed_server_flag_is_a_usage_error_naming_it(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_serve.py"
    run = subprocess.run([sys.executable, str(script), "--model", str(tmp_path), "--world",
                          str(tmp_path), "--batching=--max-batch-size 0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--max-batch-size must be a whole number ≥ 1, got '0'" in run.stderr
