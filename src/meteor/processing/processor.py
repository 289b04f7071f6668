"""From (text, images) to model inputs: slicing, the spatial-schema prompt, tokenisation, padding.

The conversation's text is tokenised as one string in the LLM's own format
(``meteor.processing.conversation``), each image a single `<image>` placeholder there; then each placeholder is
replaced by its image's layout, built as ids (LLaVA-UHD's spatial schema): one image id per kept
visual token, slices row by row with the "," ids between slices and the newline ids after each row,
the global view last. The separator ids are found once per tokenizer, as the separators tokenise
inside running text; tokenising text around special tokens would give stray pieces instead (a
sentencepiece tokenizer reads "," after `<image>` as a new word, "▁ ,"). The model then writes the
compressed tokens into exactly the image positions, so text-only samples, one-slice and six-slice
images batch together with plain padding.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from meteor.model.configuration import MeteorConfig
from meteor.processing.conversation import IGNORE_INDEX, VICUNA_SYSTEM, Turn, parse_turns, render, resolve_template, tokenize
from meteor.processing.images import load_image
from meteor.processing.slicing import SlicedImage, count_image_tokens, slice_image, view_token_counts


@dataclass
class Batch:
    input_ids: torch.Tensor          # (B, T)
    attention_mask: torch.Tensor     # (B, T)
    images: list[SlicedImage]        # in order of their <image> tokens across the batch
    labels: torch.Tensor | None = None  # (B, T), IGNORE_INDEX where unsupervised
    tokens_per_slice: int | None = None  # K′ the images were laid out with, when not the model's K

    def to_model_kwargs(self) -> dict[str, Any]:
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "images": self.images}
        if self.labels is not None:
            kwargs["labels"] = self.labels
        if self.tokens_per_slice is not None:
            kwargs["tokens_per_slice"] = self.tokens_per_slice
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
        self.image_token_id = prepare_tokenizer(tokenizer, config.image_token)
        self.slice_separator_ids = separator_ids(tokenizer, config.slice_separator)
        self.row_separator_ids = separator_ids(tokenizer, config.row_separator)

    # --- images ---------------------------------------------------------------------------------
    def prepare_image(self, image: Any) -> SlicedImage:
        """Anything `meteor.processing.images.load_image` accepts → the normalised global view and slices."""
        kwargs = {"max_slices": self.config.max_slices, "patch_size": self.patch_size,
                  "base_size": self.base_size}
        if self.image_mean is not None:
            kwargs.update(image_mean=self.image_mean, image_std=self.image_std)
        return slice_image(load_image(image), **kwargs)

    def image_layout(self, image: SlicedImage, tokens_per_slice: int | None = None) -> list[int]:
        """The image's ids in the prompt: for a 2×2 grid and K = 2, ``I I , I I \\n I I , I I \\n I I``
        (I the image id, "," and "\\n" the separator ids); K′ = ``tokens_per_slice`` if given."""
        counts = view_token_counts(image.plan, self._per_view(image, tokens_per_slice))
        rows, cols = image.plan.grid
        ids: list[int] = []
        for row in range(rows):
            for col in range(cols):
                if col:
                    ids += self.slice_separator_ids
                ids += [self.image_token_id] * counts[row * cols + col]
            ids += self.row_separator_ids
        return ids + [self.image_token_id] * counts[-1]

    def num_image_tokens(self, image: SlicedImage, tokens_per_slice: int | None = None) -> int:
        return count_image_tokens(image.plan, self._per_view(image, tokens_per_slice))

    def _per_view(self, image: SlicedImage, tokens_per_slice: int | None = None):
        k = self.config.compressor.tokens_per_slice if tokens_per_slice is None else tokens_per_slice
        if k is not None:
            return k
        # Keep-all mode: each view contributes its own patch count.
        return [rows * cols for rows, cols in image.plan.view_patches]

    # --- text -----------------------------------------------------------------------------------
    def encode(self, conversations: Sequence[dict] | str, images: Sequence[SlicedImage] = (),
               template: str | None = None, for_generation: bool = False,
               tokens_per_slice: int | None = None) -> tuple[list[int], list[int]]:
        """One sample → (input_ids, labels). `conversations` is LLaVA's list of turns, or a plain
        question string (for generation). Each <image> tag consumes the next image in order.
        Raises `TokenizationMismatch` when an answer cannot be aligned with the ids. ``template``
        defaults to the model's (``MeteorConfig.template``)."""
        template = resolve_template(self.config.template if template is None else template, self.tokenizer)
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
        text_ids, text_labels = tokenize(self.tokenizer, render(turns, template, self.tokenizer, tag))
        placeholders = text_ids.count(self.image_token_id)
        if placeholders != len(images):
            raise ValueError(f"the {template} prompt holds {placeholders} {tag} token(s) for {len(images)} "
                             f"image(s): does the template drop or repeat the user's text?")
        queue = iter(images)
        input_ids: list[int] = []
        labels: list[int] = []
        for token, label in zip(text_ids, text_labels):
            if token == self.image_token_id:
                layout = self.image_layout(next(queue), tokens_per_slice)
                input_ids += layout
                labels += [IGNORE_INDEX] * len(layout)
            else:
                input_ids.append(token)
                labels.append(label)
        return input_ids, labels

    def collate(self, samples: Sequence[tuple[list[int], list[int]]], images: Sequence[SlicedImage],
                padding_side: str = "right") -> Batch:
        """Pad encoded samples into a batch (right padding for training, left for generation)."""
        input_ids, mask, labels = pad_batch(samples, self.tokenizer.pad_token_id, padding_side)
        return Batch(input_ids, mask, list(images), labels)

    def __call__(self, questions: Sequence[str] | str, images: Sequence[Any] | None = None,
                 template: str | None = None, tokens_per_slice: int | None = None) -> Batch:
        """Generation prompts in the model's template (or ``template``): one question per sample,
        each with zero or one image (any format `load_image` accepts, or an already prepared
        SlicedImage). Left-padded. ``tokens_per_slice``: lay the images out with K′ tokens per view
        instead of the model's K (the batch carries it to the model)."""
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
            samples.append(self.encode(question, [sliced], template, tokens_per_slice=tokens_per_slice))
            prepared.append(sliced)
        batch = self.collate(samples, prepared, padding_side="left")
        batch.tokens_per_slice = tokens_per_slice
        return batch

    # --- persistence ----------------------------------------------------------------------------
    def save_tokenizer(self, folder: str | Path) -> None:
        """Write the tokenizer into ``folder`` so that loading it back (``AutoTokenizer`` plus this
        processor's own additions, the `<image>` placeholder named in MeteorConfig and the pad token)
        tokenises exactly as this one, checked by reloading.

        A tokenizer loaded from a folder is saved as the files it came from, copied as they are:
        re-serialising can change it (transformers 5 writes a sentencepiece LLaMA tokenizer back as
        another tokenizer.json, without ``legacy``, which splits text differently). One built in
        memory is saved with its own ``save_pretrained``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        source = _tokenizer_source(self.tokenizer)
        names = TOKENIZER_FILES + tuple(getattr(self.tokenizer, "vocab_files_names", {}).values())
        attempts = ([("its original files", lambda out: _copy_tokenizer_files(source, out, names))] if source else [])
        attempts.append(("save_pretrained", self.tokenizer.save_pretrained))
        problems = []
        for how, write in attempts:
            with tempfile.TemporaryDirectory() as scratch:
                write(scratch)
                problem = self._reload_difference(scratch)
                if problem is None:
                    _copy_tokenizer_files(Path(scratch), folder, names=[p.name for p in Path(scratch).iterdir()])
                    return
            problems.append(f"saved with {how}, it {problem}")
        raise ValueError(f"the tokenizer {self.tokenizer.name_or_path or type(self.tokenizer).__name__} "
                         f"cannot be saved so that it tokenises as it does now ({'; '.join(problems)}): "
                         f"build the model from the tokenizer's folder (tokenizer=PATH) instead of a "
                         f"modified tokenizer object")

    def _reload_difference(self, folder: str | Path) -> str | None:
        """How the tokenizer saved in ``folder``, once loaded and prepared, differs from ours; None
        if it does not."""
        from transformers import AutoTokenizer

        try:
            loaded = AutoTokenizer.from_pretrained(folder)
            prepare_tokenizer(loaded, self.config.image_token)
        except (OSError, ValueError, TypeError) as err:
            return f"does not load ({err})"
        return tokenizer_difference(self.tokenizer, loaded)


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


def prepare_tokenizer(tokenizer, image_token: str) -> int:
    """What the processor adds to a tokenizer, the same when it is built and when it is loaded: the
    image placeholder (`ensure_image_token`) and, where the tokenizer has none, a pad token (LLaMA
    and Vicuna ship none; LLaVA pads with unk, and padded positions are masked anyway). Returns the
    placeholder's id. Also checks that the placeholder and EOS each read as one id inside text."""
    token_id = ensure_image_token(tokenizer, image_token)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} {tokenizer.name_or_path!r} has no end-of-sequence token, "
                         f"which ends every answer: give it one (eos_token in tokenizer_config.json)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    for name, text, expected in (("image placeholder", image_token, token_id),
                                 ("end-of-sequence token", tokenizer.eos_token, tokenizer.eos_token_id)):
        ids = tokenizer(f"a{text}b", add_special_tokens=False)["input_ids"]
        if ids.count(expected) != 1:
            raise ValueError(f"the {name} {text!r} does not tokenise as its one id {expected} inside "
                             f"text with {type(tokenizer).__name__} {tokenizer.name_or_path!r} (got "
                             f"{tokenizer.convert_ids_to_tokens(ids)}): it must be a special token")
    return token_id


def separator_ids(tokenizer, separator: str) -> list[int]:
    """The ids ``separator`` has inside running text: the ids that ``context + separator`` has
    beyond ``context``'s, for several contexts, which must agree. (Tokenised alone or after a
    special token, a sentencepiece tokenizer would prefix it with "▁".)"""
    if not separator:
        return []
    found: Counter = Counter()
    for context in ("a", "image", "The answer is x"):
        base = tokenizer(context, add_special_tokens=False)["input_ids"]
        full = tokenizer(context + separator, add_special_tokens=False)["input_ids"]
        if len(full) > len(base) and full[:len(base)] == base:
            found[tuple(full[len(base):])] += 1
    if not found or found.most_common(1)[0][1] < 2:
        raise ValueError(f"{type(tokenizer).__name__} {tokenizer.name_or_path!r} gives the separator "
                         f"{separator!r} no stable ids inside text (it merges with the text before it): "
                         f"choose another slice_separator / row_separator in MeteorConfig")
    return list(found.most_common(1)[0][0])


def ensure_image_token(tokenizer, image_token: str) -> int:
    """Add the image placeholder as a special token if the tokenizer lacks it; return its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"could not register {image_token!r} as a token of {type(tokenizer).__name__}")
    return token_id


TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "tekken.json",
                   "chat_template.jinja", "chat_template.json", "additional_chat_templates")
"""File names a Hugging Face tokenizer folder may hold (its class may name more)."""

_PROBES = (
    f"{VICUNA_SYSTEM} USER: <image>\nWhat is in the image? ASSISTANT: a red circle</s>USER: And? ASSISTANT:",
    " leading space,  two spaces\n\nnew lines\ttab <image>, <image>\n<image> 0123456789",
    "Ünïcödé café 中文 ½ → <s>x</s> <unk> ▁marker",
)


def tokenizer_difference(expected, actual) -> str | None:
    """How ``actual`` tokenises differently from ``expected`` (vocabulary, special tokens, chat
    template, ids of a few probe texts), in words; None if it does not."""
    if expected.get_vocab() != actual.get_vocab():
        extra = sorted(set(actual.get_vocab()) ^ set(expected.get_vocab()))[:5]
        return f"has another vocabulary ({len(actual)} vs {len(expected)} tokens; e.g. {extra})"
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        if getattr(expected, name) != getattr(actual, name):
            return f"has {name} {getattr(actual, name)} instead of {getattr(expected, name)}"
    if getattr(expected, "chat_template", None) != getattr(actual, "chat_template", None):
        return "has another chat template"
    for text in _PROBES:
        for special in (True, False):
            want = expected(text, add_special_tokens=special)["input_ids"]
            got = actual(text, add_special_tokens=special)["input_ids"]
            if want != got:
                return (f"tokenises {text!r} as {actual.convert_ids_to_tokens(got)} instead of "
                        f"{expected.convert_ids_to_tokens(want)}")
    return None


def _tokenizer_source(tokenizer) -> Path | None:
    """The local folder the tokenizer was loaded from, if any: its ``name_or_path``, or for one
    loaded by hub name, the cached folder its vocabulary file lies in."""
    kwargs = getattr(tokenizer, "init_kwargs", {}) or {}
    files = [kwargs.get(key) for key in ("vocab_file", "tokenizer_file")]
    candidates = [getattr(tokenizer, "name_or_path", "")] + [str(Path(f).parent) for f in files if f]
    for name in candidates:
        folder = Path(name) if name else None
        if folder is not None and folder.is_dir() and any((folder / f).exists() for f in TOKENIZER_FILES):
            return folder
    return None


def _copy_tokenizer_files(source: Path, out: str | Path, names: Sequence[str] = TOKENIZER_FILES) -> None:
    for name in names:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, Path(out) / name, dirs_exist_ok=True)
        elif path.is_file():
            shutil.copy2(path, Path(out) / name)
