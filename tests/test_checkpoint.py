"""Checkpoints (meteor/train/checkpoint.py): round trips, pruning, partial writes, RNG state."""

import json
import random

import numpy as np
import pytest
import torch

from meteor.train.checkpoint import (META, STATE, WEIGHTS, latest_loadable, list_checkpoints, load_checkpoint,
                                     rng_state, save_checkpoint, set_rng_state)


def _weights(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"compressor.fc1.weight": torch.randn(3, 4, generator=generator),
            "compressor.fc1.bias": torch.randn(3, generator=generator).to(torch.bfloat16),
            "lm.embed": torch.arange(6, dtype=torch.int64)}


def _save(folder, step, keep=2, seed=None):
    return save_checkpoint(folder, step, _weights(step if seed is None else seed), {"scheduler": {"step": step}},
                           {"stage": 2}, keep=keep)


def test_save_then_load_returns_the_same_weights_state_and_meta(tmp_path):
    weights = _weights()
    weights["transposed"] = torch.randn(4, 3).t()                            # not contiguous
    weights["trainable"] = torch.nn.Parameter(torch.randn(2))              # requires grad
    optimizer_state = {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(3, 4)}},
                       "param_groups": [{"lr": 2e-5, "params": [0]}]}
    state = {"optimizer": optimizer_state, "scheduler": {"last_epoch": 7}, "data": {"epoch": 0, "position": 56}}
    path = save_checkpoint(tmp_path, 7, weights, state, {"stage": 2, "global_batch_size": 8})
    assert path == tmp_path / "checkpoint-7"
    assert sorted(p.name for p in path.iterdir()) == sorted([WEIGHTS, STATE, META])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-7"]          # no .partial left behind

    loaded, loaded_state, meta = load_checkpoint(path)
    assert loaded.keys() == weights.keys()
    for name, tensor in weights.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor.detach()), name
    assert meta == {"stage": 2, "global_batch_size": 8, "step": 7}        # the step is recorded too
    assert loaded_state["scheduler"] == {"last_epoch": 7} and loaded_state["data"] == {"epoch": 0, "position": 56}
    assert torch.equal(loaded_state["optimizer"]["state"][0]["exp_avg"], optimizer_state["state"][0]["exp_avg"])
    assert loaded_state["optimizer"]["param_groups"] == optimizer_state["param_groups"]


class _Opaque:
    """An object only a full (unsafe) unpickling could rebuild."""


def test_state_refuses_objects_a_weights_only_load_cannot_read(tmp_path):
    """state.pt is loaded with weights_only=True: something that needs arbitrary pickle to load is
    reported as a damaged checkpoint, never executed."""
    path = save_checkpoint(tmp_path, 1, _weights(), {"thing": _Opaque()}, {})
    refusal = r"(?s)checkpoint-1 is damaged \(UnpicklingError.*delete it to resume from the previous"
    with pytest.raises(RuntimeError, match=refusal):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_n_prunes_all_but_the_newest_n(tmp_path, keep):
    for step in (5, 10, 15, 20):
        _save(tmp_path, step, keep=keep)
    assert [c.step for c in list_checkpoints(tmp_path)] == [5, 10, 15, 20][-keep:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"checkpoint-{s}" for s in [5, 10, 15, 20][-keep:])


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    for step in (9, 10, 100):
        _save(tmp_path, step, keep=5)
    assert [c.step for c in list_checkpoints(tmp_path)] == [9, 10, 100]     # "10" < "9" as strings
    checkpoint, _ = latest_loadable(tmp_path)
    assert checkpoint.step == 100


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    _save(tmp_path, 3, seed=0)
    _save(tmp_path, 3, seed=1)
    assert [c.step for c in list_checkpoints(tmp_path)] == [3]
    loaded, _, _ = load_checkpoint(tmp_path / "checkpoint-3")
    assert torch.equal(loaded["compressor.fc1.weight"], _weights(1)["compressor.fc1.weight"])


def test_a_partially_written_checkpoint_is_never_listed_or_loaded(tmp_path):
    _save(tmp_path, 1)
    # A crash before the rename leaves the hidden .partial folder, even with every file in it.
    partial = tmp_path / ".checkpoint-2.partial"
    partial.mkdir()
    for name in (WEIGHTS, STATE, META):
        (partial / name).write_bytes((tmp_path / "checkpoint-1" / name).read_bytes())
    # A folder with the final name but a missing file (written by hand, or a copy cut short).
    incomplete = tmp_path / "checkpoint-3"
    incomplete.mkdir()
    (incomplete / WEIGHTS).write_bytes((tmp_path / "checkpoint-1" / WEIGHTS).read_bytes())
    (incomplete / META).write_text(json.dumps({"step": 3}))
    assert [c.step for c in list_checkpoints(tmp_path)] == [1]
    checkpoint, (weights, state, meta) = latest_loadable(tmp_path)
    assert checkpoint.step == 1 and meta["step"] == 1 and state["scheduler"] == {"step": 1}
    assert torch.equal(weights["lm.embed"], _weights(1)["lm.embed"])
    # The next save at that step clears the stale .partial before writing.
    _save(tmp_path, 2, keep=5)
    assert not partial.exists() and [c.step for c in list_checkpoints(tmp_path)] == [1, 2]


def test_latest_loadable_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys):
    _save(tmp_path, 1, keep=5)
    _save(tmp_path, 2, keep=5)
    (tmp_path / "checkpoint-2" / META).write_text("{ not json")
    with pytest.raises(RuntimeError, match="checkpoint-2 is damaged"):
        load_checkpoint(tmp_path / "checkpoint-2")
    checkpoint, (weights, _, meta) = latest_loadable(tmp_path)
    assert checkpoint.step == 1 and meta["step"] == 1
    assert torch.equal(weights["compressor.fc1.weight"], _weights(1)["compressor.fc1.weight"])
    printed = capsys.readouterr().out
    assert "checkpoint-2 is damaged" in printed and "trying an older checkpoint" in printed


def test_nothing_to_resume_from_is_none(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == [] and latest_loadable(tmp_path / "missing") is None
    _save(tmp_path, 1)
    (tmp_path / "checkpoint-1" / WEIGHTS).write_bytes(b"truncated")
    assert latest_loadable(tmp_path) is None                                 # the only one is damaged


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
            torch.rand(3).tolist(), torch.randn(2).tolist())


def test_rng_state_round_trip_reproduces_every_generator_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    # Leave a cached Gaussian in Python's and NumPy's generators: it is part of the state too.
    random.gauss(0, 1), np.random.standard_normal()
    state = rng_state()
    expected = _draws()
    path = save_checkpoint(tmp_path, 1, _weights(), {"rng": state}, {})
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert _draws() != expected
    _, loaded, _ = load_checkpoint(path)
    set_rng_state(loaded["rng"])
    assert _draws() == expected
