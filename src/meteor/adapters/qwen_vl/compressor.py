"""The hooks that compress a Qwen2.5-VL / Qwen3-VL model's prompts: one forward pre-hook and one forward
hook on its inner ``Qwen2_5_VLModel`` / ``Qwen3VLModel`` (``model.model``), nothing else changed.

A prompt with images or videos (the prefill) is rewritten before the inner model sees it:

1. its M-RoPE positions (t, h, w) in the FULL layout: the ones ``generate`` passes, or the model's own
   ``get_rope_index`` on the full ``input_ids`` (which also sets ``rope_deltas``, as the model does);
2. the tower runs through the model's own ``get_image_features`` / ``get_video_features``, and the
   visual expert scores every merged token (``expert``); each frame keeps its Top-K, in raster order;
3. the dropped placeholder tokens leave ``input_ids``, ``mm_token_type_ids``, ``attention_mask`` and
   the position ids (rows of different lengths are padded again, on their padding side), and the kept
   features go in as ``mm_encoder_outputs`` (Qwen3-VL's deepstack features selected alike), so the
   model's own forward places them and each kept token keeps the position it had in the full layout.

Steps after the prefill (decoding with the cache) are given the full layout's ``attention_mask`` by
``generate``; the hook swaps the prompt's part of it for the shortened prompt's, so the mask matches
the cache. The position ids need nothing: ``generate`` continues them from the full layout, which
is what the kept tokens were placed in. The link from a cache to its prompt is kept per cache object
(weakly), and ``keeping``, the report and a call's state per thread, so calls side by side (a server's
threads, each with its own cache) do not mix.
"""

from __future__ import annotations

import copy
import inspect
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from meteor.adapters.qwen_vl.expert import ScoreRecorder, TowerLayout, tower_layout
from meteor.adapters.qwen_vl.prompt import Keep, kept_flags, keep_per_item, select_frames, shorten

HOOKED = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "pixel_values",
          "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_encoder_outputs", "inputs_embeds")
"""The inner forward's parameters the hook reads or rewrites (checked when a model is wrapped)."""


@dataclass(frozen=True)
class FrameSelection:
    """What the visual expert kept of one frame (an image is one frame)."""

    modality: str
    """"image" or "video"."""
    item: int
    """Index of the image among the call's images (of the video among its videos)."""
    frame: int
    """0 for an image; the frame (temporal patch) of a video."""
    row: int
    """The batch row of the prompt holding it, in the batch the model ran (generate repeats each
    prompt per beam or returned sequence)."""
    grid: tuple[int, int]
    """(rows, cols) of merged tokens: one LLM token per 2 × 2 patches."""
    kept: list[int]
    """Raster indices of the kept merged tokens, ascending."""
    scores: list[float]
    """The visual expert's score of every merged token (raster order), summing to 1."""


@dataclass
class _Prompt:
    """A compressed prompt, for the decoding steps that follow it on the same cache."""

    full_length: int
    """Columns of the prompt as the caller laid it out."""
    mask: Tensor
    """(B, L') the shortened prompt's attention mask."""
    padded: bool
    """Whether the shortened prompt has padding (else the model may run without a mask)."""
    full_mask: Tensor | None
    """(B, L) the caller's prompt mask (None: the caller passed none)."""


class QwenVLCompressor:
    """Training-free Visual-Native Selection (the visual expert) on one Qwen-VL model.

    Built by ``meteor.compress``; ``keep`` and ``layout`` may be changed while installed.
    """

    def __init__(self, inner: nn.Module, keep: Keep, layer: int | None):
        self.inner = inner
        self.keep: Keep | list[Keep] = keep
        self.recorder = ScoreRecorder(inner.visual, tower_layout(inner.visual, layer))
        self._local = threading.local()  # per thread: a server may run calls side by side
        self._signature = forward_signature(inner)
        self._prompts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._handles = [inner.register_forward_pre_hook(self._before, with_kwargs=True),
                         inner.register_forward_hook(self._after, with_kwargs=True)]

    @property
    def override(self) -> list:
        """This thread's stack of ``keeping`` values (the innermost last)."""
        if not hasattr(self._local, "override"):
            self._local.override = []
        return self._local.override

    @property
    def selections(self) -> list[FrameSelection]:
        """This thread's last prefill's selection, one entry per frame."""
        return getattr(self._local, "selections", [])

    @selections.setter
    def selections(self, value: list[FrameSelection]) -> None:
        self._local.selections = value

    @property
    def _pending(self) -> _Prompt | None:
        return getattr(self._local, "pending", None)

    @_pending.setter
    def _pending(self, value: _Prompt | None) -> None:
        self._local.pending = value

    @property
    def layout(self) -> TowerLayout:
        return self.recorder.layout

    def score_with(self, layer: int | None) -> None:
        """Read the attention of vision block ``layer`` from now on (None: the last full-attention one)."""
        layout = tower_layout(self.inner.visual, layer)
        self.recorder.remove()
        self.recorder = ScoreRecorder(self.inner.visual, layout)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.recorder.remove()

    @contextmanager
    def keeping(self, keep):
        self.override.append(keep)
        try:
            yield
        finally:
            self.override.pop()

    # --------------------------------------------------------------------------------- the hooks

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        self._pending = None
        call = self._signature.bind_partial(*args, **kwargs).arguments
        extra = call.pop("kwargs", {})
        call.update(extra)
        cache = call.get("cache", call.get("past_key_values"))
        cached = 0 if cache is None else cache.get_seq_length()
        has_visual = (call.get("pixel_values") is not None or call.get("pixel_values_videos") is not None
                      or any(v is not None for v in (call.get("mm_encoder_outputs") or {}).values()))
        if has_visual:
            if cached:
                raise ValueError("meteor.compress cannot add images to a cache that already holds a prompt: start "
                                 "from a fresh cache (or call meteor.uncompress(model) for this conversation)")
            return (), self._compress(call)
        prompt = self._prompts.get(cache) if cache is not None else None
        if prompt is None:
            return None  # text only, or a cache we did not compress: the model's own path
        return (), self._continue(call, prompt, cached)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        pending, self._pending = self._pending, None
        cache = getattr(output, "cache", None)
        if pending is not None and cache is not None:
            self._prompts[cache] = pending
        return None

    # ----------------------------------------------------------------------------- the prefill

    def _compress(self, call: dict) -> dict:
        inner = self.inner
        input_ids = call.get("input_ids")
        if input_ids is None or call.get("inputs_embeds") is not None:
            raise ValueError("meteor.compress needs input_ids (the processor's output) to find the image tokens; "
                             "inputs_embeds cannot be compressed: pass input_ids instead")
        types = call.get("mm_token_type_ids")
        if types is None:
            raise ValueError("meteor.compress needs mm_token_type_ids to lay out the M-RoPE positions: pass the "
                             "processor's output unchanged (Qwen processors return it)")
        mask = call.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"meteor.compress needs a 2-D attention_mask (batch, length), got shape "
                             f"{tuple(mask.shape)}")
        encoded = self._encode(call)
        grids = {modality: grid for modality, (_, grid, _) in encoded.items()}
        positions = call.get("position_ids")
        if positions is None:
            seconds = call.get("second_per_grid_ts")  # Qwen2.5-VL's video timing
            rope_kwargs = {} if seconds is None else {"second_per_grid_ts": seconds}
            positions, deltas = inner.get_rope_index(input_ids, mm_token_type_ids=types,
                                                     image_grid_thw=grids.get("image"),
                                                     video_grid_thw=grids.get("video"),
                                                     attention_mask=mask, **rope_kwargs)
            inner.rope_deltas = deltas  # as the model's compute_3d_position_ids does: decoding continues from it
        elif positions.dim() != 3 or positions.shape[-1] != input_ids.shape[-1]:
            raise ValueError(f"position_ids of shape {tuple(positions.shape)} do not lay out the "
                             f"{input_ids.shape[-1]} prompt tokens in M-RoPE's (3 or 4, batch, length) form")

        keep_columns = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool().clone()
        encoder_outputs, selections = self._select(encoded, input_ids, keep_columns)

        right_padded = mask is not None and bool((mask[:, -1] == 0).any())
        columns = shorten(keep_columns, right_padded)
        pad = getattr(inner.config.text_config, "pad_token_id", None) or 0
        new = {name: value for name, value in call.items()
               if name not in ("pixel_values", "pixel_values_videos", "past_key_values", "cache")}
        new["cache"] = call.get("cache", call.get("past_key_values"))
        new["input_ids"] = columns.take(input_ids, pad)
        new["mm_token_type_ids"] = columns.take(types, 0)
        new_mask = columns.valid.to(mask.dtype if mask is not None else torch.long)
        has_padding = not bool(columns.valid.all())
        new["attention_mask"] = new_mask if (mask is not None or has_padding) else None
        shortened = columns.take(positions, 0)
        if shortened.shape[0] == 4:  # generate's text row: token counts in the shortened prompt
            shortened[0] = (new_mask.cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
        new["position_ids"] = shortened
        new["mm_encoder_outputs"] = encoder_outputs
        self.selections = selections
        self._pending = _Prompt(full_length=input_ids.shape[-1], mask=new_mask, padded=has_padding, full_mask=mask)
        return new

    def preview(self, inputs: dict) -> list[FrameSelection]:
        """The selection the model would make on ``inputs`` (the processor's output), without running
        the language model."""
        call = dict(inputs)
        input_ids = call.get("input_ids")
        if input_ids is None:
            raise ValueError("selection_report needs the processor's input_ids with the images' tokens in them")
        with torch.no_grad():
            encoded = self._encode(call)
            _, selections = self._select(encoded, input_ids, torch.ones_like(input_ids, dtype=torch.bool))
        return selections

    def _select(self, encoded: dict, input_ids: Tensor,
                keep_columns: Tensor) -> tuple[dict, list[FrameSelection]]:
        """Each frame's Top-K; clears the dropped placeholders in ``keep_columns`` (B, L) in place.
        Returns (the encoder outputs with the kept tokens only, one FrameSelection per frame)."""
        keep = self.override[-1] if self.override else self.keep
        keeps = keep_per_item(keep, sum(len(grid) for _, grid, _ in encoded.values()))
        encoder_outputs, selections = {}, []
        for modality, (output, grid, scores) in encoded.items():
            token = self.inner.config.image_token_id if modality == "image" else self.inner.config.video_token_id
            item_keeps, keeps = keeps[:len(grid)], keeps[len(grid):]
            placeholders = input_ids == token  # (B, L)
            indices = [select_frames(item_scores, k) for item_scores, k in zip(scores, item_keeps)]
            flags = torch.cat([kept_flags(i, s.shape[-1]) for i, s in zip(indices, scores)])
            if int(placeholders.sum()) != flags.numel():
                raise ValueError(f"the prompt has {int(placeholders.sum())} {modality} tokens but the {modality}s give "
                                 f"{flags.numel()} merged tokens (grid_thw): pass the processor's output unchanged")
            keep_columns[placeholders] &= flags.to(keep_columns.device)  # row-major: the order features fill them
            encoder_outputs[modality] = _selected(output, indices, scores)
            selections += _describe(modality, grid, indices, scores, placeholders, self.layout.merge)
        return encoder_outputs, selections

    def _encode(self, call: dict) -> dict[str, tuple]:
        """modality → (the tower's output, grid_thw, per-item scores): from the pixels, or from the
        encoder outputs ``generate`` computed before the prefill (scored as the tower ran)."""
        given = dict(call.get("mm_encoder_outputs") or {})
        encoded = {}
        for modality, pixels_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            pixels, grid = call.get(pixels_key), call.get(f"{modality}_grid_thw")
            output = given.get(modality)
            if pixels is not None:
                if output is not None:
                    raise ValueError(f"pass either {pixels_key} or mm_encoder_outputs['{modality}'], not both")
                if grid is None:
                    raise ValueError(f"{pixels_key} came without {modality}_grid_thw: pass the processor's output "
                                     "unchanged")
                encode = self.inner.get_image_features if modality == "image" else self.inner.get_video_features
                output = encode(pixels, grid, return_dict=True)
            if output is None:
                continue
            scored = self.recorder.claim(output)
            if scored is None:
                raise ValueError(f"mm_encoder_outputs['{modality}'] was not encoded while meteor.compress was on, or "
                                 f"was used before (each encoding's scores are used once): pass {pixels_key}")
            token = self.inner.config.image_token_id if modality == "image" else self.inner.config.video_token_id
            encoded[modality] = (output, *_expanded(len(output.pooler_output), *scored, call["input_ids"] == token))
        return encoded

    # ------------------------------------------------------------------------- the decoding steps

    def _continue(self, call: dict, prompt: _Prompt, cached: int) -> dict:
        """A step on a cache that holds a compressed prompt: the mask (and, when not given, the
        positions) made to match the cache."""
        ids = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
        rows, steps = ids.shape[0], ids.shape[1]
        since = cached + steps - prompt.mask.shape[-1]  # tokens after the prompt, this step's included
        mask = call.get("attention_mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
            raise ValueError("meteor.compress needs 2-D attention masks (batch, length) while decoding from a "
                             "compressed prompt")
        if mask is not None and mask.shape[-1] != prompt.full_length + since:
            raise ValueError(f"attention_mask has {mask.shape[-1]} columns; after the {prompt.full_length}-token "
                             f"prompt this cache holds, {since} tokens were added, so it needs "
                             f"{prompt.full_length + since}: pass the mask of the whole prompt and every token since")
        new = dict(call)
        tail = (mask[:, prompt.full_length:] if mask is not None
                else torch.ones(rows, since, dtype=prompt.mask.dtype, device=ids.device))
        new_mask = torch.cat([prompt.mask.to(tail.device, tail.dtype), tail], dim=-1)  # (B, cached + steps)
        new["attention_mask"] = new_mask if (mask is not None or prompt.padded) else None
        positions = call.get("position_ids")
        if positions is None:
            full = mask if mask is not None else torch.cat([
                prompt.full_mask.to(ids.device) if prompt.full_mask is not None
                else torch.ones(rows, prompt.full_length, dtype=torch.long, device=ids.device),
                torch.ones(rows, since, dtype=torch.long, device=ids.device)], dim=-1)
            text = (full.long().cumsum(-1) - 1)[:, -steps:]  # (B, steps): real tokens before, caller's layout
            deltas = self.inner.rope_deltas
            if deltas is not None:
                text = text + deltas.to(text.device).repeat_interleave(rows // deltas.shape[0], dim=0)
            new["position_ids"] = text[None].expand(3, -1, -1)
        elif positions.dim() == 3 and positions.shape[0] == 4:
            positions = positions.clone()  # generate's text row counts tokens of the shortened prompt
            positions[0] = (new_mask.long().cumsum(-1) - 1)[:, -steps:]
            new["position_ids"] = positions
        return new


def forward_signature(inner: nn.Module) -> inspect.Signature:
    """The parameters of the class's ``forward`` without ``self``: an instance's forward may be wrapped
    (accelerate's device hooks replace it with a ``*args, **kwargs`` function)."""
    signature = inspect.signature(type(inner).forward)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def _expanded(items: int, grid: Tensor, scores: list[Tensor], placeholders: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The scores of the items as ``generate`` repeats them for beams or several sequences per prompt.

    It repeats each prompt's row ``factor`` times (``input_ids.repeat_interleave``) and each prompt's
    group of encoded items ``factor`` times in a row (``_expand_multimodal_outputs``), so the same is
    done here to the scores recorded when the tower ran. placeholders: (B · factor, L) bool.
    """
    if items == len(scores):
        return grid, scores
    factor = items // len(scores)
    if factor * len(scores) != items or placeholders.shape[0] % factor:
        raise ValueError(f"{items} encoded images or videos reached the prompt, {len(scores)} went through the "
                         "vision tower: meteor.compress only follows generate's own repetition (beams, "
                         "num_return_sequences)")
    counts = placeholders.sum(dim=-1).tolist()[::factor]  # placeholders of each original prompt
    order, item = [], 0
    for count in counts:
        group = []
        while count > 0:
            group.append(item)
            count -= scores[item].numel()
            item += 1
        order += group * factor
    return grid[torch.tensor(order, device=grid.device)], [scores[i] for i in order]


def _selected(output, indices: list[Tensor], scores: list[Tensor]):
    """The encoder output with only the kept merged tokens of each item (raster order within each frame)."""
    flat = []
    for item_indices, item_scores in zip(indices, scores):
        frames, per_frame = item_scores.shape
        offsets = torch.arange(frames, device=item_indices.device)[:, None] * per_frame
        flat.append((item_indices + offsets).view(-1))  # (t · K,) into the item's t · n tokens
    chosen = copy.copy(output)  # the same ModelOutput class, so the model reads it as its own
    chosen.pooler_output = tuple(f[i.to(f.device)] for f, i in zip(output.pooler_output, flat))
    if getattr(output, "deepstack_features", None) is not None:  # Qwen3-VL: per layer, per item
        chosen.deepstack_features = [tuple(f[i.to(f.device)] for f, i in zip(layer, flat))
                                     for layer in output.deepstack_features]
    return chosen


def _describe(modality: str, grid: Tensor, indices: list[Tensor], scores: list[Tensor], placeholders: Tensor,
              merge: int) -> list[FrameSelection]:
    """One FrameSelection per frame; the row of each item is where its first placeholder lies."""
    rows_of_tokens = placeholders.nonzero()[:, 0].tolist()  # row of every placeholder, in fill order
    described, start = [], 0
    for item, ((t, h, w), item_indices, item_scores) in enumerate(zip(grid.tolist(), indices, scores)):
        row = rows_of_tokens[start] if start < len(rows_of_tokens) else 0
        start += item_scores.numel()
        for frame in range(int(t)):
            described.append(FrameSelection(modality, item, frame, row, (int(h) // merge, int(w) // merge),
                                            item_indices[frame].tolist(), item_scores[frame].tolist()))
    return described
