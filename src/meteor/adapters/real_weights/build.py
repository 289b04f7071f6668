"""``meteor weights --real DIR``: the folder of real pretrained parts, its manifest, and the rules
that keep a user's files safe.

DIR holds ``dinov2-small/`` (``Dinov2Model``), ``smollm2-135m-instruct/`` (``LlamaForCausalLM`` +
tokenizer), ``photos/`` (PNG files + ``manifest.json``) and ``MANIFEST.json``: the sources (package,
version, file, SHA-256, licence), the converter's version, the libraries it ran on, the checks'
figures and the SHA-256 of every file written. Everything is built in a sibling staging folder and
moved into place at the end, so an interrupted run leaves DIR as it was. A DIR that is not empty and
holds no manifest of ours, or holds files the manifest does not list, is refused and left untouched.
Run again with the same sources and libraries, the command checks the files against the manifest and
writes nothing; ``--force`` rebuilds (the conversion is deterministic: the files come out identical).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from meteor.adapters.real_weights.sources import (CONVERSION_PACKAGES, DINOV2_ONNX, SMOLLM2_GGUF, check_installed,
                                                installed_version, sha256_file)

CONVERTER_VERSION = 1
"""Raised whenever a change here changes the files written."""
GENERATOR = "meteor weights --real"
MANIFEST = "MANIFEST.json"
DINOV2_DIR, SMOLLM2_DIR, PHOTOS_DIR = "dinov2-small", "smollm2-135m-instruct", "photos"
CHECK_PHOTO = "chelsea"
"""The photograph the DINOv2 conversion is checked on."""


@dataclass(frozen=True)
class RealWeights:
    """A finished ``meteor weights --real`` folder."""

    root: Path
    manifest: dict
    reused: bool
    """True when the folder was already up to date and nothing was written."""

    @property
    def dinov2(self) -> Path:
        return self.root / DINOV2_DIR

    @property
    def smollm2(self) -> Path:
        return self.root / SMOLLM2_DIR

    @property
    def photos(self) -> Path:
        return self.root / PHOTOS_DIR

    def photo(self, name: str) -> Path:
        return self.photos / f"{name}.png"


def build_key() -> dict:
    """What the output is a function of: the converter, the sources' versions and the libraries'."""
    from meteor.adapters.real_weights.photos import PHOTOS

    sources = {source.package: installed_version(source.package)
               for source in (DINOV2_ONNX, SMOLLM2_GGUF, *PHOTOS.values())}
    return {"converter_version": CONVERTER_VERSION, "sources": dict(sorted(sources.items())),
            "libraries": {name: installed_version(name) for name in CONVERSION_PACKAGES}}


def key_digest(key: dict | None = None) -> str:
    text = json.dumps(build_key() if key is None else key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _listing(root: Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


def read_previous(out: Path) -> dict | None:
    """The manifest of a previous run in ``out``; None when ``out`` is absent or empty. Raise
    FileExistsError when ``out`` holds anything this command did not write."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder; choose another path for meteor weights --real")
    if not any(out.iterdir()):
        return None
    manifest_path = out / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        raise FileExistsError(f"{out} is not empty and is not a folder meteor weights --real wrote (no {MANIFEST} of "
                              "its own); nothing in it was changed. Choose a new or empty folder.")
    foreign = [name for name in _listing(out) if name != MANIFEST and name not in manifest.get("files", {})]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{out} holds files meteor weights --real did not write ({shown}); nothing was "
                              "changed. Move them out, or choose another folder.")
    return manifest


def verify_files(root: Path, manifest: dict) -> list[str]:
    """Files of the manifest that are missing or whose SHA-256 differs (empty: all intact)."""
    bad = []
    for name, digest in manifest.get("files", {}).items():
        path = root / name
        if not path.is_file() or sha256_file(path) != digest:
            bad.append(name)
    return bad


def build_real_weights(out: str | os.PathLike, force: bool = False,
                       log: Callable[[str], None] = lambda message: None) -> RealWeights:
    """Write (or confirm) the real-weights folder ``out``; see the module's docstring."""
    from meteor.adapters.real_weights.photos import PHOTOS

    out = Path(out).expanduser().absolute()
    check_installed((DINOV2_ONNX, SMOLLM2_GGUF, *PHOTOS.values()))
    previous = read_previous(out)
    key = build_key()
    if previous is not None and not force and previous.get("key") == key:
        damaged = verify_files(out, previous)
        if not damaged:
            log(f"{out} is up to date ({len(previous['files'])} files match {MANIFEST}); nothing written")
            return RealWeights(out, previous, reused=True)
        log(f"{out}: {len(damaged)} files differ from {MANIFEST} ({', '.join(damaged[:3])}); rebuilding")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        manifest = _build(staging, key, log)
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {out}: {DINOV2_DIR}/, {SMOLLM2_DIR}/, {PHOTOS_DIR}/ and {MANIFEST}")
    return RealWeights(out, manifest, reused=False)


def _build(root: Path, key: dict, log: Callable[[str], None]) -> dict:
    from meteor.adapters.real_weights.dinov2 import convert_dinov2
    from meteor.adapters.real_weights.photos import write_photos
    from meteor.adapters.real_weights.smollm2 import convert_smollm2

    log("photos: scikit-image's shipped photographs → PNG")
    photos = write_photos(root / PHOTOS_DIR)
    _write_json(root / PHOTOS_DIR / "manifest.json", photos)
    log(f"{DINOV2_DIR}: {DINOV2_ONNX.package} {DINOV2_ONNX.version} ONNX → Dinov2Model, checked against onnxruntime")
    dinov2 = convert_dinov2(DINOV2_ONNX.locate(), root / DINOV2_DIR, root / PHOTOS_DIR / f"{CHECK_PHOTO}.png")
    log("  max |converted − ONNX| on the last hidden state: "
        + ", ".join(f"{size} {value:.2e}" for size, value in dinov2["max_abs_difference"].items()))
    # Rounded in the manifest, so that a rebuild writes the same bytes however the last digits fall.
    dinov2["max_abs_difference"] = {size: float(f"{value:.1e}") for size, value in dinov2["max_abs_difference"].items()}
    log(f"{SMOLLM2_DIR}: {SMOLLM2_GGUF.package} {SMOLLM2_GGUF.version} GGUF → LlamaForCausalLM (float32) + tokenizer")
    smollm2 = convert_smollm2(SMOLLM2_GGUF.locate(), root / SMOLLM2_DIR)
    manifest = {
        "generator": GENERATOR,
        "converter_version": CONVERTER_VERSION,
        "key": key,
        "sources": {DINOV2_DIR: DINOV2_ONNX.record(), SMOLLM2_DIR: SMOLLM2_GGUF.record(),
                    PHOTOS_DIR: f"{PHOTOS_DIR}/manifest.json (scikit-image {key['sources']['scikit-image']})"},
        "checks": {DINOV2_DIR: dinov2, SMOLLM2_DIR: smollm2},
        "files": {name: sha256_file(root / name) for name in _listing(root)},
    }
    _write_json(root / MANIFEST, manifest)
    return manifest


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _replace(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder to ``out`` (absent, empty, or a previous output)."""
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        staging.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old)


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/llava-meteor/real`` (``~/.cache/llava-meteor/real``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llava-meteor" / "real"


def cached_real_weights(cache: str | os.PathLike | None = None,
                        log: Callable[[str], None] = lambda message: None) -> RealWeights:
    """The real-weights folder for this machine's packages under ``cache/<key>`` (built on first use,
    checked against its manifest afterwards): made once per machine and set of versions."""
    root = Path(cache) if cache is not None else default_cache()
    return build_real_weights(root / key_digest(), log=log)
