"""Distributed training on PyTorch's own engines, run for real: `torchrun` with 2 CPU processes on
the gloo backend, DDP and FSDP2, against a single process with the same global batch.

The data are chosen so that the awkward cases all happen (see `_text_only`): a step where one rank
has only text-only records (the compressor gets no gradient there), a rank that runs the
compressor in its first micro-batch but not in its last (the one that synchronises), steps where a
rank has no record at all (the loop's zero-weight filler batch), and steps where no rank runs the
compressor (its gradients must stay None, as in one process, not become zeros for AdamW).

Tolerance. Both sides compute the same sums in a different order: one process accumulates the
four micro-batch gradients one after the other, two processes add two partial sums with an
all-reduce (FSDP: a reduce-scatter), so results differ by float32 rounding only. Measured over 20
steps: ≤ 1e-7 relative on the losses and ≤ 7e-7 absolute on the weights. The bounds below
(1e-5 relative, 1e-5 absolute) leave two orders of magnitude for other CPUs, and stay well under
real mistakes seen while writing this: zero instead of None gradients under FSDP moved the
losses by 1e-4–3e-4 relative and the compressor weights by 2e-3; a different clipping threshold
(0.05 instead of 1.0) by 2e-5.

Every subprocess has a timeout and is started in its own session, so a hang fails the test (and
the whole process group is killed) instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from meteor.pretrained import save_pretrained

STEPS = 20
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
TIMEOUT = 240          # seconds for one training run (they take 5-10 s here)


# --- helpers -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def _command(data: dict, output_dir: Path, processes: int, mode: str, *extra: str) -> list[str]:
    train = ["train", "--stage", "2", "--data", str(data["json"]), "--image-folder", str(data["folder"]),
             "--model", str(data["model"]), "--output-dir", str(output_dir),
             "--global-batch-size", "8", "--per-device-batch-size", "2", "--max-steps", str(STEPS),
             "--learning-rate", "1e-3", "--save-every", "8", "--seed", str(data["seed"]),
             "--distributed", mode, *extra]
    if processes == 1:
        return [sys.executable, "-m", "meteor", *train]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "meteor", *train]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    try:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
    finally:
        handle.close()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first found first."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(), [])
        found += children
        queue += children
    return found


def _kill_group(proc: subprocess.Popen) -> None:
    # torchrun may put its workers in sessions of their own: kill them by ancestry too, or a hung
    # worker outlives the test.
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)      # the session we started
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _wait(proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        pytest.fail(f"run did not finish within {timeout} s (hang?); its output:\n{_tail(log)}")


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no output)"


def _run(command: list[str], log: Path) -> None:
    code = _wait(_start(command, log), log)
    assert code == 0, f"exit status {code}:\n{_tail(log)}"


def _losses(output_dir: Path) -> dict[int, float]:
    entries = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines() if line]
    steps = [entry["step"] for entry in entries]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {entry["step"]: entry["loss"] for entry in entries}


def _saved_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = output_dir / "model"
    tensors = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            tensors[f"{path.relative_to(folder)}:{name}"] = tensor
    return tensors


def _assert_same_training(reference: Path, run: Path) -> None:
    expected, got = _losses(reference), _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=LOSS_RTOL), f"step {step}"
    want, have = _saved_tensors(reference), _saved_tensors(run)
    assert set(have) == set(want), set(have) ^ set(want)
    assert any(".multi_modal_projector." in name for name in want)
    for name, tensor in want.items():
        assert have[name].shape == tensor.shape and have[name].dtype == tensor.dtype, name
        assert torch.allclose(have[name].float(), tensor.float(), rtol=0, atol=WEIGHT_ATOL), \
            f"{name}: max |Δ| = {float((have[name].float() - tensor.float()).abs().max()):.3g}"


def _text_only(size: int, seed: int) -> set[int] | None:
    """Records to strip of their image so that the cases of the module docstring occur, given
    the loop's data order (global batch 8 of 9 records: steps alternate 8 records and 1;
    each rank takes every other record, in micro-batches of 2); None if this seed cannot."""
    from meteor.train.loop import DataOrder

    order = DataOrder(size, 8, seed)
    first = order.step_records(0)
    rank0, rank1 = first[0::2], first[1::2]
    text = set(rank1) | set(rank0[2:])          # rank 1: all text; rank 0: images, then text
    lone = [order.step_records(step)[0] for step in range(3, STEPS, 2)]   # the 1-record steps
    if order.step_records(1)[0] in text or not any(index in text for index in lone):
        return None
    return text


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from meteor.testing import tiny_llava_data, tiny_model

    root = tmp_path_factory.mktemp("distributed")
    model, processor = tiny_model(seed=0)
    save_pretrained(root / "base", model, processor)
    path = tiny_llava_data(root / "data", count=9, seed=0)
    seed = next(s for s in range(42, 142) if _text_only(9, s) is not None)
    text = _text_only(9, seed)
    records = json.loads(path.read_text())
    for index in text:
        record = records[index]
        del record["image"]
        record["conversations"][0]["value"] = "What colour is the square?"
    path.write_text(json.dumps(records, indent=1))
    return {"json": path, "folder": root / "data", "model": root / "base", "seed": seed, "root": root}


@pytest.fixture(scope="module")
def distill_data(data):
    """The same records and images, each record with an image carrying its scene (for
    --scene-distillation); the text-only records stay text-only."""
    from meteor.testing import tiny_llava_data

    records = json.loads(data["json"].read_text())
    scenes = json.loads(tiny_llava_data(data["folder"], count=9, seed=0, meta=True).read_text())
    for record, scene in zip(records, scenes):
        if "image" in record:
            assert record["image"] == scene["image"]
            record["meta"] = scene["meta"]
    path = data["root"] / "distill.json"
    path.write_text(json.dumps(records, indent=1))
    return {**data, "json": path}


@pytest.fixture(scope="module")
def glyph_data(distill_data):
    """The scene records with the square's colour written over it as a text (for --glyph-alignment,
    which reads only where each text is and what it says)."""
    records = json.loads(distill_data["json"].read_text())
    for record in records:
        if "meta" in record:
            square = record["meta"]["objects"][0]
            record["meta"]["texts"] = [{"kind": "word", "text": square["colour"].upper(), "bbox": square["bbox"]}]
    path = distill_data["root"] / "glyphs.json"
    path.write_text(json.dumps(records, indent=1))
    return {**distill_data, "json": path}


@pytest.fixture(scope="module")
def reference(data):
    output_dir = data["root"] / "single"
    _run(_command(data, output_dir, 1, "none"), data["root"] / "single.log")
    return output_dir


# --- fast checks -------------------------------------------------------------------------------

def test_torch_moves_sliced_images_through_wrapper_input_handling():
    """On CUDA, DDP and FSDP move forward kwargs with `_to_kwargs`: our frozen SlicedImage
    dataclasses must come out whole (CPU runs skip the move, so check it directly)."""
    from PIL import Image
    from torch.distributed.utils import _to_kwargs

    from meteor.processing.slicing import slice_image

    image = slice_image(Image.new("RGB", (112, 56)), max_slices=6, patch_size=14, base_size=56)
    _, kwargs = _to_kwargs((), {"images": [image], "input_ids": torch.ones(1, 3)}, torch.device("cpu"), False)
    moved = kwargs[0]["images"][0]
    assert type(moved) is type(image) and moved.plan == image.plan
    assert torch.equal(moved.global_view, image.global_view) and torch.equal(moved.slices, image.slices)


def test_fsdp_units_are_the_decoder_layers():
    from meteor.testing import tiny_model
    from meteor.train.fsdp import decoder_layers

    model, _ = tiny_model(seed=0)
    layers = decoder_layers(model.language_model)
    assert [type(layer).__name__ for layer in layers] == ["LlamaDecoderLayer"] * 2


def test_distributed_mode_without_a_launcher_is_refused(monkeypatch):
    from meteor.train.args import TrainConfig, TrainConfigError
    from meteor.train.distributed import DistributedRun

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for mode in ("ddp", "fsdp"):
        with pytest.raises(TrainConfigError, match="torchrun"):
            DistributedRun.setup(TrainConfig(stage=2, distributed=mode))
    assert DistributedRun.setup(TrainConfig(stage=2, distributed="auto")).mode == "none"


# --- 2-process runs ----------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_two_processes_match_one_process(data, reference):
    output_dir = data["root"] / "ddp"
    # `auto` under torchrun with 2 processes is DDP
    _run(_command(data, output_dir, 2, "auto"), data["root"] / "ddp.log")
    assert "2 process(es)" in (data["root"] / "ddp.log").read_text()
    _assert_same_training(reference, output_dir)


@pytest.mark.slow
def test_ddp_with_scene_distillation_matches_one_process(distill_data):
    root = distill_data["root"]
    single, ddp = root / "distill-single", root / "distill-ddp"
    _run(_command(distill_data, single, 1, "none", "--scene-distillation", "2"), root / "distill-single.log")
    _run(_command(distill_data, ddp, 2, "auto", "--scene-distillation", "2"), root / "distill-ddp.log")
    _assert_same_training(single, ddp)
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (single, ddp)]
    assert sum(entry["distill_count"] for entry in logs[0]) > 0
    for one, two in zip(*logs):
        assert two["distill_count"] == one["distill_count"]
        assert two["distill"] == pytest.approx(one["distill"], rel=LOSS_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_glyph_alignment_on_two_processes_matches_one_process(glyph_data, mode):
    root = glyph_data["root"]
    single, two = root / "glyph-single", root / f"glyph-{mode}"
    if not (single / "DONE.json").exists():
        _run(_command(glyph_data, single, 1, "none", "--glyph-alignment", "1"), root / "glyph-single.log")
    _run(_command(glyph_data, two, 2, mode, "--glyph-alignment", "1"), root / f"glyph-{mode}.log")
    _assert_same_training(single, two)
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (single, two)]
    assert sum(entry["glyph_count"] for entry in logs[0]) > 0
    for one, other in zip(*logs):
        assert other["glyph_count"] == one["glyph_count"]
        assert other["glyph"] == pytest.approx(one["glyph"], rel=LOSS_RTOL)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(data, reference):
    output_dir = data["root"] / "fsdp"
    _run(_command(data, output_dir, 2, "fsdp"), data["root"] / "fsdp.log")
    _assert_same_training(reference, output_dir)
    # the checkpoints hold full (unsharded) trainable tensors
    from meteor.train.checkpoint import list_checkpoints, load_checkpoint

    weights, state, meta = load_checkpoint(list_checkpoints(output_dir)[-1].path)
    assert meta["world_size"] == 2 and meta["step"] == STEPS
    assert weights["lm_head.weight"].shape == _saved_tensors(reference)["model.safetensors:lm_head.weight"].shape


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sigterm_to_torchrun_checkpoints_and_resume_finishes_the_same_run(data, reference, mode):
    output_dir, log = data["root"] / f"{mode}-stopped", data["root"] / f"{mode}-stopped.log"
    proc = _start(_command(data, output_dir, 2, mode), log)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((output_dir / "log.jsonl").is_file() and (output_dir / "log.jsonl").read_text().strip()):
            assert proc.poll() is None, f"the run ended before the signal:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"no step logged within {TIMEOUT} s:\n{_tail(log)}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)     # to torchrun only: it forwards SIGTERM to the workers
        code = _wait(proc, log, timeout=120)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    assert code != 0, "torchrun reports the stop as a failure"
    output = log.read_text(errors="replace")
    stopped = max(_losses(output_dir))
    assert stopped < STEPS, f"the run was not interrupted:\n{_tail(log)}"
    assert f"received SIGTERM: checkpoint-{stopped} saved" in output
    assert (output_dir / f"checkpoint-{stopped}").is_dir() and not (output_dir / "DONE.json").exists()

    _run(_command(data, output_dir, 2, mode, "--resume"), data["root"] / f"{mode}-resumed.log")
    assert f"resuming from {output_dir / f'checkpoint-{stopped}'}" in \
        (data["root"] / f"{mode}-resumed.log").read_text()
    assert (output_dir / "DONE.json").is_file()
    _assert_same_training(reference, output_dir)
