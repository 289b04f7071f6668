"""The model class of LLaVA-Meteor before 0.2, kept as a deprecated alias for one release.

``LlavaMeteor.build`` / ``from_pretrained`` / ``from_llava`` give ``(model, processor)`` of the
transformers-native classes (``LlavaMeteorForConditionalGeneration``, ``LlavaMeteorProcessor``),
with a ``DeprecationWarning`` naming what replaces each. Folders in the format before 0.2 load with
``meteor.pretrained.load_pretrained``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from meteor import pretrained
from meteor.model.configuration import MeteorConfig


class LlavaMeteor:
    """Deprecated: the model class before 0.2. ``LlavaMeteorForConditionalGeneration`` replaces it;
    these class methods still give ``(model, processor)`` of the new classes, with a warning."""

    @staticmethod
    def _warn(replacement: str) -> None:
        warnings.warn(f"LlavaMeteor is deprecated: use {replacement}", DeprecationWarning, stacklevel=3)

    @classmethod
    def build(cls, vision, language_model, tokenizer, config: MeteorConfig | None = None,
              dtype: torch.dtype | None = None):
        cls._warn("meteor.pretrained.build")
        return pretrained.build(vision, language_model, tokenizer, config, dtype)

    @classmethod
    def from_pretrained(cls, folder, dtype: torch.dtype | None = None,
                        compressor_overrides: dict[str, Any] | None = None):
        cls._warn("meteor.pretrained.load_pretrained (or AutoModelForImageTextToText / AutoProcessor)")
        return pretrained.load_pretrained(folder, dtype, compressor_overrides)

    @classmethod
    def from_llava(cls, path, config: MeteorConfig | None = None, vision=None, dtype: torch.dtype | None = None):
        cls._warn("meteor.adapters.llava.from_llava")
        from meteor.adapters.llava import from_llava

        return from_llava(path, config, vision, dtype)



__all__ = ["LlavaMeteor"]
