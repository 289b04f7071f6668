"""The tokenizer vLLM reads a LLaVA-Meteor folder with: the folder's own, with the image placeholder.

A LLaVA-Meteor folder keeps the language model's tokenizer files as they were (a real LLM's
tokenizer, SmolLM2's or Vicuna's, has no ``<image>``); ``LlavaMeteorProcessor`` adds the placeholder
when it loads them (``meteor.processing.tokenizer.prepare_tokenizer``), after the LLM's vocabulary.
vLLM tokenises prompts with its own tokenizer, so the plugin registers this tokenizer mode, which
loads the folder's tokenizer as vLLM's ``hf`` mode does and prepares it the same way; the plugin's
config check selects it for folders it serves (``tokenizer_mode`` "auto" or "hf"). Without it, an
``<image>`` in the prompt would be split into text pieces and the image would have no place.
"""

from __future__ import annotations

from pathlib import Path

from vllm.tokenizers.hf import CachedHfTokenizer, get_cached_tokenizer

from meteor.adapters.vllm.config import CHAT_PLACEHOLDER
from meteor.processing.tokenizer import prepare_tokenizer


class MeteorTokenizer(CachedHfTokenizer):
    """vLLM's ``hf`` tokenizer (transformers' ``AutoTokenizer``, behind vLLM's caching proxy) of the
    folder, with the image placeholder added as the processor adds it."""

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *args, trust_remote_code: bool = False,
                        revision: str | None = None, download_dir: str | None = None, **kwargs):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path_or_repo_id, *args, trust_remote_code=trust_remote_code,
                                                  revision=revision, cache_dir=download_dir, **kwargs)
        prepare_tokenizer(tokenizer, CHAT_PLACEHOLDER)
        return get_cached_tokenizer(tokenizer)
