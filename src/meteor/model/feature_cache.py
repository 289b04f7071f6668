"""A cache of the frozen vision tower's outputs, so each view is encoded once per run (or ever).

The vision tower is frozen in both training stages (docs/design.md, "Training"), so its output for a
view depends only on the view's pixels and the tower's weights. ``FeatureCache`` keys each view on a
hash of its normalised pixels and keeps the patch tokens and the CLS-attention row:

- in memory, least recently used first out, up to ``max_memory_bytes``;
- and, given a ``folder``, on disk as one safetensors file per view under a sub-folder named by the
  tower's fingerprint (a hash of its configuration, layer choice, dtype and every weight), so a
  different or retrained tower never reads another tower's features.

Cached outputs are the tower's outputs bit for bit (tested), so training with the cache is the
same computation as without it, only faster.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from meteor.model.vision import VisionOutput, VisionTower

DEFAULT_MEMORY_BYTES = 1 << 30


def view_key(pixels: Tensor) -> str:
    """A hash of one view (3, h, w): its shape, dtype and pixel bytes (read as bytes, so dtypes numpy
    lacks, bfloat16 among them, hash too)."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{tuple(pixels.shape)}|{pixels.dtype}".encode())
    digest.update(pixels.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


UNRELATED_CONFIG_FIELDS = ("_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype")
"""Config fields that say where a tower was loaded from or saved with, not what it computes: left
out of the fingerprint, so a tower saved into every trained model's folder still shares its cache."""


def tower_fingerprint(tower: VisionTower) -> str:
    """A hash of everything the tower's outputs depend on: config, layers, the visual expert, dtype
    and weights (not the folder it came from)."""
    digest = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in tower.clip.config.to_dict().items() if k not in UNRELATED_CONFIG_FIELDS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(f"{tower.feature_layer}|{tower.attention_layer}|{tower.visual_expert}|"
                  f"{tower.dtype}".encode())
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Vision-tower outputs per view, in memory and optionally in ``folder`` (see the module doc)."""

    def __init__(self, folder: str | os.PathLike | None = None, max_memory_bytes: int = DEFAULT_MEMORY_BYTES):
        if max_memory_bytes < 0:
            raise ValueError(f"max_memory_bytes must be ≥ 0, got {max_memory_bytes}")
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None and self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"feature cache {self.folder} is a file, not a folder: give a folder path "
                             f"(it is created if missing) or 'memory'")
        self.max_memory_bytes = max_memory_bytes
        self._memory: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self._memory_bytes = 0
        self._fingerprints: weakref.WeakKeyDictionary[VisionTower, str] = weakref.WeakKeyDictionary()
        self.hits = self.misses = 0

    def encode(self, tower: VisionTower, pixels: Tensor) -> VisionOutput:
        """``tower(pixels)`` for (n, 3, h, w) views of one size, computing only the views not cached."""
        fingerprint = self._fingerprint(tower)
        keys = [f"{fingerprint}/{view_key(view)}" for view in pixels]
        found = [self._lookup(key) for key in keys]
        missing = [row for row, item in enumerate(found) if item is None]
        grid = (pixels.shape[-2] // tower.patch_size, pixels.shape[-1] // tower.patch_size)
        if missing:
            with torch.no_grad():
                computed = tower(pixels[missing])
            for index, row in enumerate(missing):
                item = (computed.patch_tokens[index].detach().cpu().clone(),
                        computed.cls_attention[index].detach().cpu().clone())
                found[row] = item
                self._store(keys[row], item)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        device = pixels.device
        return VisionOutput(patch_tokens=torch.stack([item[0] for item in found]).to(device),
                            cls_attention=torch.stack([item[1] for item in found]).to(device), grid=grid)

    def encode_views(self, model, pixel_values: Tensor, view_grids: Tensor) -> list[tuple[list[int], VisionOutput]]:
        """``model.encode_views(pixel_values, view_grids)`` (a ``LlavaMeteorModel``: its tower's
        outputs for a batch's views, grouped by size), computing only the views not cached: what its
        ``forward`` takes as ``tower_outputs``."""
        from meteor.model.modeling import view_batches

        tower = model.tower
        device = next(tower.encoder.parameters()).device
        return [(positions, self.encode(tower, views.to(device, tower.dtype)))
                for positions, views in view_batches(pixel_values, view_grids, tower.patch_size)]

    # --- storage ------------------------------------------------------------------------------------
    def _fingerprint(self, tower: VisionTower) -> str:
        # Weights of a tower never change (it is frozen), so one hash per tower object suffices;
        # weak keys, so a freed tower's entry cannot be mistaken for a new tower's.
        if tower not in self._fingerprints:
            self._fingerprints[tower] = tower_fingerprint(tower)
        return self._fingerprints[tower]

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        fingerprint, view = key.split("/")
        return self.folder / fingerprint / view[:2] / f"{view}.safetensors"

    def _lookup(self, key: str) -> tuple[Tensor, Tensor] | None:
        item = self._memory.get(key)
        if item is not None:
            self._memory.move_to_end(key)
            return item
        if self.folder is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            item = (tensors["patch_tokens"], tensors["cls_attention"])
        except Exception:   # a damaged file (e.g. from a full disk): recompute and rewrite it
            return None
        self._remember(key, item)
        return item

    def _store(self, key: str, item: tuple[Tensor, Tensor]) -> None:
        self._remember(key, item)
        if self.folder is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".", suffix=".partial", dir=path.parent)
        os.close(handle)
        try:
            save_file({"patch_tokens": item[0], "cls_attention": item[1]}, temporary)
            os.replace(temporary, path)     # atomic: readers see the old file or the whole new one
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _remember(self, key: str, item: tuple[Tensor, Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in item)
        if size > self.max_memory_bytes:
            return
        previous = self._memory.pop(key, None)
        if previous is not None:
            self._memory_bytes -= sum(t.numel() * t.element_size() for t in previous)
        self._memory[key] = item
        self._memory_bytes += size
        while self._memory_bytes > self.max_memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= sum(t.numel() * t.element_size() for t in old)
