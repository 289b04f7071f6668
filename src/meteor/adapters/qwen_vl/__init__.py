"""Training-free Visual-Native Selection for transformers' Qwen2.5-VL and Qwen3-VL: two lines.

    import meteor
    model = meteor.compress(model, keep=0.25)  # a Qwen2_5_VLForConditionalGeneration or Qwen3VLForConditionalGeneration
    inputs = processor(text=..., images=..., return_tensors="pt", padding=True)  # unchanged
    out = model.generate(**inputs, max_new_tokens=64)  # as before, with a quarter of the image tokens

``keep``: a float in (0, 1], the share of each image's merged tokens kept (rounded, at least 1), or
an int K, the tokens kept per image (all of a smaller image). Each video frame (temporal patch) is
selected like an image. Per call: ``with meteor.adapters.qwen_vl.keeping(model, 0.11): ...``, where
``keep`` may also be a list, one value per image (then per video) of the call. Undo:
``meteor.compress(model, keep=1.0)`` or ``uncompress(model)``, which gives back the untouched model.

What it does (the paper's §3.3 with the visual expert only; these models have no native expert to
train): every image's merged tokens (one LLM token per 2 × 2 patches) are scored by the attention
they receive in a full-attention block of the vision tower (``expert``; these towers have no CLS
token), each image keeps its Top-K in raster order, and each kept token keeps the M-RoPE position
(t, h, w) it had in the full prompt, so the language model sees it where it was; the dropped ones
leave the prompt, which gets shorter by their count. Batches (left or right padding), several images
per prompt, images and videos together, ``model(...)`` and ``model.generate(...)`` (greedy, sampling,
beams) all work; the logits of ``model(...)`` cover the shortened prompt (its last column is still
the next token's). The selection of the last call: ``selection_report(model)``.

What it relies on in transformers (checked when wrapping; written against 5.x, where the inner model
takes ``cache``, ``mm_token_type_ids`` and precomputed ``mm_encoder_outputs``): the inner
``Qwen2_5_VLModel`` / ``Qwen3VLModel`` (``model.model``) with ``get_rope_index``,
``get_image_features`` / ``get_video_features`` and a ``forward`` that takes the parameters in
``compressor.HOOKED``; the tower's ``blocks[i].attn`` with a fused ``qkv`` linear, called with
``cu_seqlens`` and ``position_embeddings``; Qwen2.5-VL's ``fullatt_block_indexes`` and window layout.
Only hooks on that one inner module are added; nothing of transformers is patched. Not supported,
and refused with the reason: other model classes, a tower without full-attention blocks, a
windowed block as the scored layer, ``labels`` (this is for inference), ``inputs_embeds`` or
``mm_encoder_outputs`` in place of ``input_ids`` / pixels, adding images to a cache that already
holds a prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from meteor.adapters.qwen_vl.compressor import HOOKED, FrameSelection, QwenVLCompressor, forward_signature
from meteor.adapters.qwen_vl.prompt import Keep, check_keep

__all__ = ["FrameSelection", "compress", "keeping", "selection_report", "uncompress"]

SUPPORTED = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel", "Qwen3VLForConditionalGeneration",
             "Qwen3VLModel")
_ATTRIBUTE = "_meteor_compressor"


def compress(model: nn.Module, keep: Keep = 0.25, layer: int | None = None) -> nn.Module:
    """Make ``model`` keep ``keep`` of each image's tokens, chosen by its vision tower; returns ``model``.

    ``layer``: the vision block whose attention scores the tokens (None: the last full-attention
    one). Calling it again changes ``keep`` / ``layer``; ``keep=1.0`` removes the compression.
    """
    inner = _inner(model)
    compressor: QwenVLCompressor | None = getattr(inner, _ATTRIBUTE, None)
    if isinstance(keep, float) and keep == 1.0:
        uncompress(model)
        return model
    check_keep(keep)
    if compressor is not None:
        if layer is not None:
            compressor.score_with(layer)
        compressor.keep = keep
        return model
    _check_transformers(inner)
    _check_labels_refused(model, inner)
    setattr(inner, _ATTRIBUTE, QwenVLCompressor(inner, keep, layer))
    return model


def uncompress(model: nn.Module) -> nn.Module:
    """Remove ``compress``'s hooks: the model is as transformers built it again. Returns ``model``."""
    inner = _inner(model)
    compressor = getattr(inner, _ATTRIBUTE, None)
    if compressor is not None:
        compressor.remove()
        delattr(inner, _ATTRIBUTE)
    for handle in getattr(model, "_meteor_label_guard", ()):
        handle.remove()
    if hasattr(model, "_meteor_label_guard"):
        delattr(model, "_meteor_label_guard")
    return model


@contextmanager
def keeping(model: nn.Module, keep: Keep | Sequence[Keep]) -> Iterator[None]:
    """Within the block, calls of the compressed ``model`` keep ``keep``: one value, or one per image
    (then per video) of each call. ``keeping(model, 1.0)`` keeps every token (still through the hooks)."""
    compressor = _compressor(model)
    if isinstance(keep, (int, float)):
        check_keep(keep)
    with compressor.keeping(keep if isinstance(keep, (int, float)) else list(keep)):
        yield


def selection_report(model: nn.Module, inputs: dict | None = None) -> list[FrameSelection]:
    """What the compressed ``model`` keeps: one ``FrameSelection`` per image (per video frame), in the
    order of ``image_grid_thw`` (then ``video_grid_thw``): merged grid, kept raster indices, scores.

    ``inputs`` None: the selection of its last call with images. ``inputs`` (the processor's output):
    the selection it would make on them, without running the language model.
    """
    compressor = _compressor(model)
    return list(compressor.selections if inputs is None else compressor.preview(inputs))


# --------------------------------------------------------------------------------------- checks


def _inner(model: nn.Module) -> nn.Module:
    name = type(model).__name__
    if name not in SUPPORTED:
        raise TypeError(f"meteor.compress supports transformers' {', '.join(SUPPORTED)}; got {name}. LLaVA-Meteor "
                        "models compress already (MeteorConfig); other VLMs are not supported yet")
    return model.model if name.endswith("ForConditionalGeneration") else model


def _compressor(model: nn.Module) -> QwenVLCompressor:
    compressor = getattr(_inner(model), _ATTRIBUTE, None)
    if compressor is None:
        raise ValueError("this model is not compressed: call meteor.compress(model, keep=...) first")
    return compressor


def _check_transformers(inner: nn.Module) -> None:
    """Refuse a transformers whose Qwen-VL code lacks what the hooks rely on, naming what is missing."""
    import transformers

    missing = []
    parameters = forward_signature(inner).parameters
    missing += [f"{type(inner).__name__}.forward({name}=...)" for name in HOOKED if name not in parameters]
    if "cache" not in parameters and "past_key_values" not in parameters:
        missing.append(f"{type(inner).__name__}.forward(cache=...)")
    missing += [f"{type(inner).__name__}.{name}" for name in ("get_rope_index", "get_image_features",
                                                               "get_video_features", "visual")
                if not hasattr(inner, name)]
    blocks = getattr(getattr(inner, "visual", None), "blocks", None)
    if blocks is None or not all(hasattr(b, "attn") and hasattr(b.attn, "qkv") for b in blocks):
        missing.append("visual.blocks[i].attn.qkv (a fused q/k/v projection in every vision block)")
    if missing:
        raise RuntimeError(f"meteor.compress relies on transformers' Qwen-VL code as of 5.x, and this transformers "
                           f"{transformers.__version__} lacks: {'; '.join(missing)}. Install transformers>=5")


def _check_labels_refused(model: nn.Module, inner: nn.Module) -> None:
    """Training through the compression is not supported: refuse labels with images, loudly."""
    if model is inner:
        return

    def guard(module, args, kwargs):
        if kwargs.get("labels") is not None and (kwargs.get("pixel_values") is not None
                                                 or kwargs.get("pixel_values_videos") is not None):
            raise ValueError("meteor.compress is for inference: the shortened prompt no longer lines up with "
                             "labels. Train without it (meteor.uncompress(model)), or drop labels")

    model._meteor_label_guard = [model.register_forward_pre_hook(guard, with_kwargs=True)]
