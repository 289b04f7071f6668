"""From (text, images) to model inputs: slicing, the spatial-schema prompt, tokenisation, padding.

Each `<image>` in a prompt is replaced by its image's layout (LLaVA-UHD's spatial schema): one
image token per kept visual token, slices row by row with "," between slices and a newline after
each row, the global view last. The model then writes the compressed tokens into exactly those
positions, so text-only samples, one-slice and six-slice images batch together with plain padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import MeteorConfig
from .conversation import IGNORE_INDEX, Turn, encode_segments, parse_turns, segments
from .images import load_image
from .slicing import SlicedImage, count_image_tokens, layout_tokens, slice_image


@dataclass
class Batch:
    input_ids: torch.Tensor          # (B, T)
    attention_mask: torch.Tensor     # (B, T)
    images: list[SlicedImage]        # in order of their <image> tokens across the batch
    labels: torch.Tensor | None = None  # (B, T), IGNORE_INDEX where unsupervised

    def to_model_kwargs(self) -> dict[str, Any]:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "images": self.images}
        if self.labels is not None:
            kwargs["labels"] = self.labels
        return kwargs


class MeteorProcessor:
    """Holds the tokenizer and the image geometry; turns conversations into padded batches."""

    def __init__(self, tokenizer, config: MeteorConfig, patch_size: int = 14, base_size: int = 336,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.patch_size = patch_size
        self.base_size = base_size
        self.image_mean = tuple(image_mean) if image_mean is not None else None
        self.image_std = tuple(image_std) if image_std is not None else None
        self.image_token_id = ensure_image_token(tokenizer, config.image_token)
        if tokenizer.pad_token_id is None:
            # LLaMA/Vicuna ship no pad token; LLaVA pads with unk. Padded positions are masked anyway.
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token

    # --- images ---------------------------------------------------------------------------------
    def prepare_image(self, image: Any) -> SlicedImage:
        """Anything `meteor.images.load_image` accepts → the normalised global view and slices."""
        kwargs = {"max_slices": self.config.max_slices, "patch_size": self.patch_size,
                  "base_size": self.base_size}
        if self.image_mean is not None:
            kwargs.update(image_mean=self.image_mean, image_std=self.image_std)
        return slice_image(load_image(image), **kwargs)

    def image_layout(self, image: SlicedImage) -> str:
        return layout_tokens(image.plan, self._per_view(image), image_token=self.config.image_token,
                             slice_sep=self.config.slice_separator, row_sep=self.config.row_separator)

    def num_image_tokens(self, image: SlicedImage) -> int:
        return count_image_tokens(image.plan, self._per_view(image))

    def _per_view(self, image: SlicedImage):
        k = self.config.compressor.tokens_per_slice
        if k is not None:
            return k
        # Keep-all mode: each view contributes its own patch count.
        return [rows * cols for rows, cols in image.plan.view_patches]

    # --- text -----------------------------------------------------------------------------------
    def encode(self, conversations: Sequence[dict] | str, images: Sequence[SlicedImage] = (),
               template: str = "vicuna_v1", for_generation: bool = False) -> tuple[list[int], list[int]]:
        """One sample → (input_ids, labels). `conversations` is LLaVA's list of turns, or a plain
        question string (for generation). Each <image> tag consumes the next image in order."""
        if isinstance(conversations, str):
            turns = [Turn("human", conversations)]
        else:
            turns = parse_turns(conversations)
            if for_generation and turns[-1].role == "gpt":
                turns = turns[:-1]
        tag = self.config.image_token
        tags = sum(turn.text.count(tag) for turn in turns)
        if template == "plain" and images:
            tags = 1  # the plain template keeps only the image of the human turn
        if tags != len(images):
            raise ValueError(f"the conversation has {tags} {tag} tag(s) but {len(images)} image(s) were "
                             f"given: put one {tag} in the human turn per image")
        queue = list(images)

        def expand(text: str) -> str:
            parts = text.split(tag)
            out = parts[0]
            for part in parts[1:]:
                out += self.image_layout(queue.pop(0)) + part
            return out

        return encode_segments(self.tokenizer, segments(turns, template), expand)

    def collate(self, samples: Sequence[tuple[list[int], list[int]]], images: Sequence[SlicedImage],
                padding_side: str = "right") -> Batch:
        """Pad encoded samples into a batch (right padding for training, left for generation)."""
        input_ids, mask, labels = pad_batch(samples, self.tokenizer.pad_token_id, padding_side)
        return Batch(input_ids, mask, list(images), labels)

    def __call__(self, questions: Sequence[str] | str, images: Sequence[Any] | None = None,
                 template: str = "vicuna_v1") -> Batch:
        """Generation prompts: one question per sample, each with zero or one image (any format
        `load_image` accepts, or an already prepared SlicedImage). Left-padded."""
        if isinstance(questions, str):
            questions = [questions]
        images = list(images) if images is not None else [None] * len(questions)
        if len(images) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(images)} images: give one image "
                             f"(or None) per question")
        samples, prepared = [], []
        for question, image in zip(questions, images):
            if image is None:
                samples.append(self.encode(question, (), template))
                continue
            sliced = image if isinstance(image, SlicedImage) else self.prepare_image(image)
            if self.config.image_token not in question:
                question = f"{self.config.image_token}\n{question}"
            samples.append(self.encode(question, [sliced], template))
            prepared.append(sliced)
        return self.collate(samples, prepared, padding_side="left")


def pad_batch(samples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
              padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels) pairs → (input_ids, attention_mask, labels), each (B, T) int64, padded to
    the longest with ``pad_id`` (labels with IGNORE_INDEX) on the right (training) or the left
    (generation)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(ids) for ids, _ in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(samples):
        span = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
        input_ids[row, span] = torch.tensor(ids)
        labels[row, span] = torch.tensor(labs)
        mask[row, span] = 1
    return input_ids, mask, labels


def ensure_image_token(tokenizer, image_token: str) -> int:
    """Add the image placeholder as a special token if the tokenizer lacks it; return its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"could not register {image_token!r} as a token of {type(tokenizer).__name__}")
    return token_id
