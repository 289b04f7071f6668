"""``LlavaMeteorProcessor``: from (text, images) to model inputs: slicing, the spatial-schema prompt,
tokenisation, padding.

The conversation's text is tokenised as one string in the LLM's own format
(``meteor.processing.conversation``), each image a single `<image>` placeholder there; then each
placeholder is replaced by its image's layout, built as ids (LLaVA-UHD's spatial schema): one image
id per kept visual token, slices row by row with the "," ids between slices and the newline ids
after each row, the global view last. The separator ids are found once per tokenizer, as the
separators tokenise inside running text; tokenising text around special tokens would give stray
pieces instead (a sentencepiece tokenizer reads "," after `<image>` as a new word, "▁ ,"). The model
then writes the compressed tokens into exactly the image positions, so text-only samples, one-slice
and six-slice images batch together with plain padding.

The images themselves become tensors in ``LlavaMeteorImageProcessor``
(``meteor.processing.image_processor``). Two ways in:

- transformers' way: ``processor(images=..., text=...)`` on text that already holds `<image>` tags
  (a prompt made with ``apply_chat_template``), and ``apply_chat_template(messages)``, so
  ``pipeline("image-text-to-text")`` works;
- the project's way: ``encode`` (a LLaVA conversation → ids and labels, for training) and
  ``prompts`` (questions → a left-padded ``Batch`` in the model's template).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import BatchFeature, ProcessorMixin

from meteor.model.configuration import IGNORE_INDEX, MeteorConfig
from meteor.processing.conversation import CHAT_TEMPLATES, Turn, parse_turns, render, resolve_template, tokenize
from meteor.processing.conversation import tokenize as tokenize_rendered
from meteor.processing.image_processor import LlavaMeteorImageProcessor, flatten_images, image_tensors
from meteor.processing.slicing import SlicedImage, SlicePlan, view_token_counts
from meteor.processing.tokenizer import prepare_tokenizer, save_tokenizer, separator_ids

PROCESSOR_CONFIG = "processor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

@dataclass
class Batch:
    """Padded samples and their images, as the trainer and the runners pass them around."""
    input_ids: torch.Tensor          # (B, T)
    attention_mask: torch.Tensor     # (B, T)
    images: list[SlicedImage]        # in order of their <image> tokens across the batch
    labels: torch.Tensor | None = None  # (B, T), IGNORE_INDEX where unsupervised
    tokens_per_slice: int | None = None  # K′ the images were laid out with, when not the model's K
    patch_size: int = 14

    def image_inputs(self) -> dict[str, torch.Tensor]:
        """The images as the model takes them (``pixel_values``, ``view_grids``, ``image_grids``,
        ``image_sizes``); empty without images."""
        return image_tensors(self.images, self.patch_size) if self.images else {}

    def to_model_kwargs(self) -> dict[str, Any]:
        """Everything the model's ``forward`` / ``generate`` takes for this batch."""
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.image_inputs()}
        if self.labels is not None:
            kwargs["labels"] = self.labels
        if self.tokens_per_slice is not None:
            kwargs["tokens_per_slice"] = self.tokens_per_slice
        return kwargs


class LlavaMeteorProcessor(ProcessorMixin):
    """The tokenizer, the image processor and the model's prompt options (``meteor_config``: the
    ``MeteorConfig`` of the model, whose template, image token, separators and K it lays prompts out
    with)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None,
                 meteor_config: MeteorConfig | dict | None = None, **kwargs):
        if tokenizer is None:
            raise ValueError("LlavaMeteorProcessor needs a tokenizer")
        config = meteor_config if isinstance(meteor_config, MeteorConfig) else MeteorConfig.from_dict(meteor_config or {})
        if image_processor is None:
            image_processor = LlavaMeteorImageProcessor(max_slices=config.max_slices)
        if image_processor.max_slices != config.max_slices:
            raise ValueError(f"the image processor cuts images into at most {image_processor.max_slices} slices but "
                             f"the model's configuration says max_slices={config.max_slices}: make them agree")
        self.image_token_id = prepare_tokenizer(tokenizer, config.image_token)
        # "auto" is decided once, from the tokenizer as it comes (before a chat template of ours is
        # attached to it), so a saved and reloaded processor renders as this one does.
        config = dataclasses.replace(config, template=resolve_template(config.template, tokenizer))
        if chat_template is None:
            chat_template = (tokenizer.chat_template if config.template == "chat_template"
                             else CHAT_TEMPLATES[config.template])
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.config = config
        self.meteor_config = config.to_dict()
        self.slice_separator_ids = separator_ids(tokenizer, config.slice_separator)
        self.row_separator_ids = separator_ids(tokenizer, config.row_separator)

    def set_config(self, config: MeteorConfig) -> None:
        """Use another ``MeteorConfig`` (the model's, e.g. with its widths or a new template); its
        image token and slicing must be this processor's."""
        if (config.image_token, config.max_slices) != (self.config.image_token, self.config.max_slices):
            raise ValueError("a processor's image token and max_slices are fixed when it is built: build another")
        self.config = dataclasses.replace(config, template=resolve_template(config.template, self.tokenizer))
        self.meteor_config = self.config.to_dict()
        self.slice_separator_ids = separator_ids(self.tokenizer, config.slice_separator)
        self.row_separator_ids = separator_ids(self.tokenizer, config.row_separator)

    # --- image geometry ----------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.image_processor.patch_size

    @property
    def base_size(self) -> int:
        return self.image_processor.base_size

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(self.image_processor.image_mean)

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(self.image_processor.image_std)

    def prepare_image(self, image: Any) -> SlicedImage:
        """Anything ``meteor.processing.images.load_image`` accepts → the normalised global view and slices."""
        return self.image_processor.prepare(image)

    def image_inputs(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Images (prepared ``SlicedImage``s, or anything ``prepare_image`` takes) as the model takes
        them: ``pixel_values``, ``view_grids``, ``image_grids``, ``image_sizes``."""
        return image_tensors([self.prepare_image(image) for image in images], self.patch_size)

    def tokens_per_slice(self, requested: int | None = None, images: Sequence[SlicedImage] = ()) -> int | None:
        """K′ for these images: ``MeteorConfig.resolve_tokens_per_slice`` against their smallest view."""
        fewest = min((rows * cols for image in images for rows, cols in image.plan.view_patches), default=None)
        return self.config.resolve_tokens_per_slice(requested, fewest)

    def layout_ids(self, plan: SlicePlan, tokens_per_slice: int | None = None) -> list[int]:
        """The ids of an image with this slicing plan in the prompt: for a 2×2 grid and K = 2,
        ``I I , I I \\n I I , I I \\n I I`` (I the image id, "," and "\\n" the separator ids); K′ =
        ``tokens_per_slice`` if given, every patch of each view when the model keeps all."""
        k = self.config.resolve_tokens_per_slice(tokens_per_slice)
        counts = view_token_counts(plan, k if k is not None else (lambda grid: grid[0] * grid[1]))
        rows, cols = plan.grid
        ids: list[int] = []
        for row in range(rows):
            for col in range(cols):
                if col:
                    ids += self.slice_separator_ids
                ids += [self.image_token_id] * counts[row * cols + col]
            ids += self.row_separator_ids
        return ids + [self.image_token_id] * counts[-1]

    def image_layout(self, image: SlicedImage, tokens_per_slice: int | None = None) -> list[int]:
        return self.layout_ids(image.plan, tokens_per_slice)

    def num_image_tokens(self, image: SlicedImage | SlicePlan, tokens_per_slice: int | None = None) -> int:
        """How many visual tokens the image gives the model (its ``<image>`` ids in the prompt; the
        separators come on top: ``len(layout_ids(...))``)."""
        plan = image.plan if isinstance(image, SlicedImage) else image
        return self.layout_ids(plan, tokens_per_slice).count(self.image_token_id)

    # --- text: the project's way -------------------------------------------------------------------
    def encode(self, conversations: Sequence[dict] | str, images: Sequence[SlicedImage] = (),
               template: str | None = None, for_generation: bool = False,
               tokens_per_slice: int | None = None) -> tuple[list[int], list[int]]:
        """One sample → (input_ids, labels). ``conversations`` is LLaVA's list of turns, or a plain
        question string (for generation). Each <image> tag consumes the next image in order.
        Raises ``TokenizationMismatch`` when an answer cannot be aligned with the ids. ``template``
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
        return self._expand(text_ids, text_labels, images, tokens_per_slice, template)

    def _expand(self, text_ids: list[int], text_labels: list[int], images: Sequence[SlicedImage],
                tokens_per_slice: int | None, template: str = "") -> tuple[list[int], list[int]]:
        """Each image placeholder id → its image's layout (labels IGNORE_INDEX there)."""
        placeholders = text_ids.count(self.image_token_id)
        if placeholders != len(images):
            raise ValueError(f"the {template + ' ' if template else ''}prompt holds {placeholders} "
                             f"{self.config.image_token} token(s) for {len(images)} image(s): "
                             f"{'does the template drop or repeat the user text?' if template else 'give one image per tag'}")
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
        return Batch(input_ids, mask, list(images), labels, patch_size=self.patch_size)

    def prompts(self, questions: Sequence[str] | str, images: Sequence[Any] | None = None,
                template: str | None = None, tokens_per_slice: int | None = None) -> Batch:
        """Generation prompts in the model's template (or ``template``): one question per sample,
        each with zero or one image (any format ``load_image`` accepts, or an already prepared
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
            ids, own = self.question_prompt(question, image, template, tokens_per_slice)
            samples.append((ids, ids))
            prepared += own
        batch = self.collate(samples, prepared, padding_side="left")
        batch.labels = None
        batch.tokens_per_slice = tokens_per_slice
        return batch

    def question_prompt(self, question: str, image: Any = None, template: str | None = None,
                        tokens_per_slice: int | None = None) -> tuple[list[int], list[SlicedImage]]:
        """One question (and its image, if any) as a generation prompt in the model's template (or
        ``template``): its ids, the image laid out with K′ = ``tokens_per_slice``, and its prepared
        images (the image first in the user turn when the question has no tag)."""
        if image is None:
            return self.encode(question, (), template)[0], []
        sliced = self.prepare_image(image)
        if self.config.image_token not in question:
            question = f"{self.config.image_token}\n{question}"
        return self.encode(question, [sliced], template, tokens_per_slice=tokens_per_slice)[0], [sliced]

    # --- text: transformers' way --------------------------------------------------------------------
    def __call__(self, images: Any = None, text: str | Sequence[str] | None = None, tokens_per_slice: int | None = None,
                 return_tensors: str | None = "pt", padding: bool | str = True, padding_side: str = "left",
                 add_special_tokens: bool = True, **kwargs) -> BatchFeature:
        """``text`` (one prompt or a batch) holding one ``<image>`` tag per image, and the images in
        order (one, a list, or a list per prompt) → ``input_ids``, ``attention_mask`` (padded on
        ``padding_side``, left by default: ready for ``generate``), ``pixel_values``, ``view_grids``,
        ``image_grids``, ``image_sizes``. ``tokens_per_slice``: K′ for this call (pass the same to
        the model). The text is used as given: render a conversation with ``apply_chat_template``."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"LlavaMeteorProcessor returns PyTorch tensors (return_tensors='pt'), not {return_tensors!r}")
        if text is None:
            raise ValueError("give the prompt text (with one <image> tag per image); for a chat, render it with "
                             "processor.apply_chat_template(messages, add_generation_prompt=True) first")
        texts = [text] if isinstance(text, str) else list(text)
        prepared = [self.prepare_image(image) for image in flatten_images(images)]
        k = self.tokens_per_slice(tokens_per_slice, prepared)
        queue = iter(prepared)
        samples = []
        for prompt in texts:
            ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
            own = [next(queue, None) for _ in range(ids.count(self.image_token_id))]
            if any(image is None for image in own):
                raise ValueError(f"the text holds more {self.config.image_token} tags than the {len(prepared)} "
                                 f"image(s) given: give one image per tag")
            samples.append(self._expand(ids, [IGNORE_INDEX] * len(ids), own, k))
        if next(queue, None) is not None:
            raise ValueError(f"{len(prepared)} image(s) were given but the text holds fewer "
                             f"{self.config.image_token} tags: put one tag per image where it belongs")
        if not padding and len({len(ids) for ids, _ in samples}) > 1:
            raise ValueError("prompts of different lengths need padding=True")
        return self._features(samples, prepared, k if tokens_per_slice is not None else None, padding_side)

    def _features(self, samples: Sequence[tuple[list[int], list[int]]], prepared: Sequence[SlicedImage],
                  tokens_per_slice: int | None, padding_side: str = "left") -> BatchFeature:
        input_ids, mask, _ = pad_batch(samples, self.tokenizer.pad_token_id, padding_side)
        data = {"input_ids": input_ids, "attention_mask": mask}
        if prepared:
            data.update(image_tensors(prepared, self.patch_size))
        if tokens_per_slice is not None:
            data["tokens_per_slice"] = tokens_per_slice
        return BatchFeature(data)

    def apply_chat_template(self, conversation, chat_template: str | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = False, return_dict: bool = False, return_tensors: str | None = None,
                            continue_final_message: bool = False, processor_kwargs: dict | None = None, **kwargs):
        """A chat (OpenAI-style messages: ``content`` a string or a list of ``{"type": "image", ...}``
        and ``{"type": "text", "text": ...}`` parts) rendered in the model's template, exactly as
        ``encode`` renders it for training: each message's images first, each as ``<image>\\n``.
        With ``tokenize=True``, the images given in the messages (``"image"``, ``"url"`` or ``"path"``
        of each image part) are loaded and the processor's tensors returned."""
        if chat_template is not None:
            raise ValueError("LlavaMeteorProcessor renders chats in the model's own template; chat_template "
                             "cannot be overridden here (render the text yourself and call the processor)")
        if continue_final_message:
            raise ValueError("continue_final_message is not supported: end the chat with a user message")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        chats = conversation if batched else [conversation]
        options = dict(processor_kwargs or {})
        requested = options.pop("tokens_per_slice", None)
        texts, samples, prepared = [], [], []
        for chat in chats:
            turns, sources = self._chat_turns(chat)
            rendered = render(turns, self.config.template, self.tokenizer, self.config.image_token)
            if not tokenize:
                bos = self.tokenizer.bos_token if rendered.bos and self.tokenizer.bos_token else ""
                texts.append(bos + rendered.text)
                continue
            own = [self.prepare_image(source) for source in sources]
            ids, _ = tokenize_rendered(self.tokenizer, rendered)
            samples.append((ids, own))
            prepared += own
        if not tokenize:
            return texts if batched else texts[0]
        k = self.tokens_per_slice(requested, prepared)
        expanded = [self._expand(ids, [IGNORE_INDEX] * len(ids), own, k) for ids, own in samples]
        out = self._features(expanded, prepared, k if requested is not None else None,
                             options.pop("padding_side", "left"))
        return out if return_dict else out["input_ids"]

    def _chat_turns(self, chat: Sequence[dict]) -> tuple[list[Turn], list[Any]]:
        """OpenAI-style messages → LLaVA turns ending with a user turn, and the images they hold."""
        turns: list[Turn] = []
        images: list[Any] = []
        tag = self.config.image_token
        for position, message in enumerate(chat):
            role = {"user": "human", "assistant": "gpt"}.get(message.get("role"))
            if role is None:
                raise ValueError(f"message {position} has role {message.get('role')!r}; this model's template "
                                 f"knows 'user' and 'assistant' turns")
            content = message.get("content", "")
            if isinstance(content, str):
                text = content
            else:
                parts = [part for part in content if part.get("type") in ("image", "image_url")]
                for part in parts:
                    source = next((part[key] for key in ("image", "url", "path", "image_url") if key in part), None)
                    if isinstance(source, dict):
                        source = source.get("url")
                    if source is None:
                        raise ValueError(f"message {position} has an image part without 'image', 'url' or 'path'")
                    images.append(source)
                text = "".join(f"{tag}\n" for _ in parts) + "".join(
                    part.get("text", "") for part in content if part.get("type") == "text")
            if turns and turns[-1].role == role:
                turns[-1] = Turn(role, turns[-1].text + "\n" + text)
            else:
                turns.append(Turn(role, text))
        if not turns or turns[0].role != "human":
            raise ValueError("a chat starts with a user message")
        return turns, images

    # --- persistence -------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, **kwargs) -> list[str]:
        """The tokenizer (so that reloaded it tokenises exactly as now), ``preprocessor_config.json``,
        ``processor_config.json`` and ``chat_template.jinja``."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_tokenizer(self.tokenizer, folder, self.config.image_token)
        self.image_processor.save_pretrained(folder)
        (folder / PROCESSOR_CONFIG).write_text(json.dumps(
            {"processor_class": type(self).__name__, "meteor_config": self.meteor_config}, indent=2) + "\n")
        if self.chat_template:
            (folder / CHAT_TEMPLATE_FILE).write_text(self.chat_template)
        return [str(folder / name) for name in (PROCESSOR_CONFIG, CHAT_TEMPLATE_FILE)]

    def save_tokenizer(self, folder: str | Path) -> None:
        """The tokenizer alone, so that loaded back and prepared it tokenises as now
        (``meteor.processing.tokenizer.save_tokenizer``)."""
        save_tokenizer(self.tokenizer, folder, self.config.image_token)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> "LlavaMeteorProcessor":
        """A processor saved with ``save_pretrained`` (or a model folder holding one)."""
        from transformers import AutoTokenizer

        folder = Path(pretrained_model_name_or_path)
        config_file = folder / PROCESSOR_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder} holds no {PROCESSOR_CONFIG}: it is not a LLaVA-Meteor folder "
                                    f"(save one with processor.save_pretrained)")
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        if "meteor_config" not in saved:
            raise ValueError(f"{config_file} has no meteor_config: it was written by another processor "
                             f"({saved.get('processor_class')}); load it with that class")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = LlavaMeteorImageProcessor.from_pretrained(folder)
        template_file = folder / CHAT_TEMPLATE_FILE
        chat_template = template_file.read_text() if template_file.is_file() else None
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                   meteor_config=saved["meteor_config"])


def MeteorProcessor(tokenizer, config: MeteorConfig, patch_size: int = 14, base_size: int = 336,
                    image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None
                    ) -> LlavaMeteorProcessor:
    """Deprecated: ``LlavaMeteorProcessor(image_processor=LlavaMeteorImageProcessor(...), tokenizer=...,
    meteor_config=...)`` replaces it (this builds exactly that)."""
    warnings.warn("MeteorProcessor(tokenizer, config, ...) is deprecated: build a LlavaMeteorProcessor with a "
                  "LlavaMeteorImageProcessor (meteor.processing)", DeprecationWarning, stacklevel=2)
    return build_processor(tokenizer, config, patch_size, base_size, image_mean, image_std)


def build_processor(tokenizer, config: MeteorConfig, patch_size: int = 14, base_size: int = 336,
                    image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None
                    ) -> LlavaMeteorProcessor:
    """A processor for a tokenizer and a model's options, with the tower's patch and native size and
    normalisation (OpenAI CLIP's when None)."""
    statistics = {} if image_mean is None else {"image_mean": image_mean, "image_std": image_std}
    image_processor = LlavaMeteorImageProcessor(patch_size=patch_size, base_size=base_size,
                                                max_slices=config.max_slices, **statistics)
    return LlavaMeteorProcessor(image_processor=image_processor, tokenizer=tokenizer, meteor_config=config)


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
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        labels[row, span] = torch.tensor(labs, dtype=torch.long)
        mask[row, span] = 1
    return input_ids, mask, labels


__all__ = ["Batch", "CHAT_TEMPLATES", "LlavaMeteorProcessor", "MeteorProcessor", "build_processor", "pad_batch"]
