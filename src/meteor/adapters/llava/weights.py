"""The tensors of a Hugging Face checkpoint folder, read by name without running any pickle.

A folder holds one weights file or shards listed by an index (``*.index.json``'s ``weight_map``).
Safetensors files are read directly (memory-mapped, tensor by tensor). ``.bin`` files are read only
with ``torch.load(weights_only=True)``, which unpickles nothing but tensors and plain containers; a
file that needs arbitrary pickle is refused with the command that converts it, to be run once where
the file is trusted. Safetensors win when a folder has both.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"),
                ("pytorch_model.bin.index.json", "pytorch_model.bin"))
"""(index, single file) names, in the order they are looked for."""


class PickleCheckpointError(ValueError):
    """A ``.bin`` weights file that ``torch.load(weights_only=True)`` refuses: it needs pickle."""


def convert_command(path: Path) -> str:
    """The one-off command that rewrites a pickled ``.bin`` state dict as safetensors."""
    out = path.with_suffix(".safetensors")
    return (f"python -c \"import torch; from safetensors.torch import save_file; "
            f"state = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"save_file({{k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}}, "
            f"'{out}', metadata={{'format': 'pt'}})\"")


class CheckpointWeights:
    """The tensors of ``folder``'s weights (one file or an index of shards), by name.

    ``keys()`` lists every tensor; ``get(name)`` reads one; ``with_prefix(prefix)`` reads all the
    tensors whose names start with it, keyed by the rest of the name.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._bin: dict[Path, dict[str, Tensor]] = {}     # .bin files already loaded (memory-mapped)
        self._location: dict[str, Path] = _locate(self.folder, self._bin)

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._location.values()))

    def keys(self) -> list[str]:
        return list(self._location)

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def get(self, name: str) -> Tensor:
        if name not in self._location:
            raise KeyError(f"{self.folder} has no weight {name!r}")
        path = self._location[name]
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return handle.get_tensor(name)
        return self._load_bin(path)[name]

    def with_prefix(self, prefix: str) -> dict[str, Tensor]:
        """Every tensor named ``prefix + rest``, as ``{rest: tensor}``."""
        names = [name for name in self._location if name.startswith(prefix)]
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._location[name], []).append(name)
        tensors: dict[str, Tensor] = {}
        for path, group in by_file.items():
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    tensors.update({name[len(prefix):]: handle.get_tensor(name) for name in group})
            else:
                state = self._load_bin(path)
                tensors.update({name[len(prefix):]: state[name] for name in group})
        return tensors

    def _load_bin(self, path: Path) -> dict[str, Tensor]:
        if path not in self._bin:
            self._bin[path] = load_bin(path)
        return self._bin[path]


def load_bin(path: Path) -> dict[str, Tensor]:
    """A ``.bin`` state dict through ``torch.load(weights_only=True)`` (memory-mapped where the file
    allows); refused with the conversion command when it needs pickle."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:        # the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise PickleCheckpointError(
            f"{path} can only be loaded with pickle, which can run arbitrary code, so it is refused "
            f"(torch.load(weights_only=True): {reason}). If you trust the file, convert it once to "
            f"safetensors and keep the .safetensors file beside the others (shards: convert each and "
            f"rename the index to model.safetensors.index.json with .safetensors names):\n  "
            f"{convert_command(path)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors (got "
                         f"{type(state).__name__}); save the model's state_dict() as safetensors")
    return state


def _locate(folder: Path, loaded: dict[Path, dict[str, Tensor]]) -> dict[str, Path]:
    """Weight name → the file holding it (a single .bin file is loaded to list it: kept in ``loaded``)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist (only local folders are read)")
    for index_name, single_name in WEIGHT_FILES:
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map: is it a Hugging Face weights index?")
            location = {name: folder / file for name, file in weight_map.items()}
            missing = sorted({str(p.name) for p in location.values() if not p.is_file()})
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {missing[:3]}")
            return location
        single = folder / single_name
        if single.is_file():
            if single.suffix == ".safetensors":
                with safe_open(str(single), framework="pt", device="cpu") as handle:
                    return {name: single for name in handle.keys()}
            loaded[single] = load_bin(single)
            return {name: single for name in loaded[single]}
    raise FileNotFoundError(
        f"no weights in {folder}: looked for {', '.join(name for pair in WEIGHT_FILES for name in pair)}")
