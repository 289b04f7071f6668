"""Checkpoints that lose nothing: written beside their destination, then renamed into place.

A checkpoint is a folder `checkpoint-<step>/` holding the trainable weights (safetensors), the
optimizer and scheduler states, every RNG state and the data position (`state.pt`, loaded with
`weights_only=True`, so no arbitrary pickle), and `meta.json`. It is written as
`.checkpoint-<step>.partial/`, flushed to disk, and renamed; a crash at any moment leaves either the
old set of checkpoints or the new one, never a half-written folder that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
META = "meta.json"


@dataclass
class Checkpoint:
    path: Path
    step: int


def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
        "numpy_gauss": [int(numpy_state[3]), float(numpy_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(output_dir: Path, step: int, weights: dict[str, torch.Tensor],
                    state: dict[str, Any], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint-<step> atomically, then prune all but the newest `keep`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, partial / WEIGHTS)
    torch.save(state, partial / STATE)
    (partial / META).write_text(json.dumps({**meta, "step": step}, indent=2) + "\n")
    _fsync_tree(partial)
    if final.exists():   # the same step saved twice (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(partial, final)
    _fsync_tree(output_dir)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (partial folders are ignored)."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and all((path / name).is_file() for name in (WEIGHTS, STATE, META)):
            found.append(Checkpoint(path, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, state, meta) of a checkpoint folder; a damaged one raises naming the file."""
    try:
        weights = load_file(str(path / WEIGHTS))
        state = torch.load(path / STATE, weights_only=True)
        meta = json.loads((path / META).read_text())
    except Exception as err:  # noqa: BLE001 - any decoding failure means the same thing to the user
        raise RuntimeError(f"checkpoint {path} is damaged ({type(err).__name__}: {err}); delete it "
                           f"to resume from the previous one") from err
    return weights, state, meta


def latest_loadable(output_dir: Path) -> tuple[Checkpoint, tuple] | None:
    """The newest checkpoint that loads, skipping (and reporting) damaged ones."""
    for checkpoint in reversed(list_checkpoints(output_dir)):
        try:
            return checkpoint, load_checkpoint(checkpoint.path)
        except RuntimeError as err:
            print(f"warning: {err}; trying an older checkpoint", flush=True)
    return None
