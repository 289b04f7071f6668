"""LLaVA-Meteor: frozen CLIP vision tower → Top-Down Compression → any causal LM.

The model takes what `MeteorProcessor` produces: token ids in which every visual token of every
image is one `<image>` id laid out in LLaVA-UHD's spatial schema, and the sliced images in the
same order. It encodes each view, compresses it to K tokens, and writes them into the `<image>`
positions of the LLM's input embeddings.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from meteor.model.configuration import CONFIG_NAME, MeteorConfig
from meteor.processing.conversation import IGNORE_INDEX
from meteor.model.feature_cache import FeatureCache
from meteor.model.projectors import CompressionOutput, build_projector
from meteor.processing.processor import MeteorProcessor
from meteor.processing.slicing import SlicedImage
from meteor.model.vision import VisionTower

COMPRESSOR_FILE = "compressor.safetensors"
VISION_DIR = "vision_tower"
LANGUAGE_DIR = "language_model"


@dataclass
class ViewSelection:
    """What the compressor kept for one view: for drawing and for analysis."""
    image_index: int
    view_index: int          # LLM order: slices row by row, then the global view
    is_global: bool
    grid: tuple[int, int]    # patch grid (rows, cols)
    indices: torch.Tensor | None   # (K,) kept positions, raster order; None for mixing projectors
    visual_scores: torch.Tensor | None   # (rows·cols,)
    native_scores: torch.Tensor | None
    aggregate_scores: torch.Tensor | None


@dataclass
class ViewGroup:
    """Views of one size that went through the vision tower and the projector as one batch."""
    owners: list[tuple[int, int]]
    """(image index, view index) of each row of ``output``, in row order (view index in LLM order)."""
    output: CompressionOutput
    """The projector's output for these views (with gradients, in training)."""


@dataclass
class MeteorCausalLMOutput(CausalLMOutputWithPast):
    """The language model's output with the projector's per-view outputs (``return_views=True``):
    what a training aid needs to add a loss on the compressed views (``meteor.train.auxiliary``)."""
    views: list[ViewGroup] | None = None
    """The batch's view groups in the order they ran."""


class LlavaMeteor(nn.Module):
    def __init__(self, config: MeteorConfig, vision_tower: VisionTower, language_model: nn.Module,
                 image_token_id: int):
        super().__init__()
        compressor_config = dataclasses.replace(
            config.compressor,
            vision_width=vision_tower.hidden_size,
            text_width=language_model.get_input_embeddings().embedding_dim,
        )
        self.config = dataclasses.replace(config, compressor=compressor_config)
        self.vision_tower = vision_tower
        self.compressor = build_projector(compressor_config)
        self.language_model = language_model
        self.image_token_id = image_token_id
        self.training_progress: float | None = None
        """Fraction of training done, set by the trainer; drives the native expert's warm-up."""
        self.feature_cache: FeatureCache | None = None
        """Where the frozen tower's outputs are kept between calls (``meteor.model.feature_cache``); None:
        every view is encoded every time."""

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, vision: str | os.PathLike | VisionTower, language_model: str | os.PathLike | nn.Module,
              tokenizer: Any, config: MeteorConfig | None = None, dtype: torch.dtype | None = None
              ) -> tuple["LlavaMeteor", MeteorProcessor]:
        """A new model from a CLIP folder (or tower) and a causal-LM folder (or model); the
        compressor is freshly initialised. The widths C and D are read from the components."""
        from transformers import AutoTokenizer

        config = config or MeteorConfig()
        if not isinstance(vision, VisionTower):
            vision = VisionTower.from_pretrained(vision, feature_layer=config.feature_layer,
                                                 attention_layer=config.attention_layer, dtype=dtype,
                                                 visual_expert=config.visual_expert)
        elif vision.visual_expert != config.visual_expert:
            raise ValueError(f"the vision tower computes the visual expert {vision.visual_expert!r} but the "
                             f"config asks for {config.visual_expert!r}: build the tower with "
                             f"visual_expert={config.visual_expert!r} or set MeteorConfig.visual_expert")
        if isinstance(language_model, (str, os.PathLike)):
            language_model = _load_causal_lm(language_model, dtype)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        processor = MeteorProcessor(tokenizer, config, patch_size=vision.patch_size,
                                    base_size=vision.image_size, image_mean=vision.image_mean,
                                    image_std=vision.image_std)
        model = cls(config, vision, language_model, processor.image_token_id)
        if dtype is not None:
            model.compressor.to(dtype)
        return model, processor

    # --- vision → compressed tokens ---------------------------------------------------------------
    def encode_images(self, images: Sequence[SlicedImage], return_selection: bool = False,
                      tokens_per_slice: int | None = None, questions: torch.Tensor | None = None
                      ) -> tuple[list[torch.Tensor], list[ViewSelection]]:
        """Each image → (its visual tokens in LLM order, D); views of one size run as one batch
        through the vision tower and the projector. ``tokens_per_slice``: keep K′ tokens per view
        instead of the trained K (the processor must lay prompts out with the same K′).
        ``questions``: (images, D) pooled question embeddings, for a question-conditioned
        instruction token (``question_embeddings`` computes them from a prompt)."""
        tokens, selections, _ = self._encode_images(images, return_selection, tokens_per_slice, questions)
        return tokens, selections

    def prompt_selections(self, input_ids: torch.Tensor | Sequence[int], images: Sequence[SlicedImage],
                          tokens_per_slice: int | None = None) -> list[ViewSelection]:
        """What the compressor keeps of ``images`` when the model reads the prompt ``input_ids``
        (one row, or a list of ids): ``encode_images(..., return_selection=True)``'s selections, with
        a question-conditioned instruction token fed the prompt's question as ``forward`` feeds it
        (for the paper's instruction token the prompt changes nothing)."""
        ids = torch.as_tensor(input_ids).to(self._device())
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        questions = self._questions(ids, self._text_embeds(ids), images, tokens_per_slice)
        return self.encode_images(images, True, tokens_per_slice, questions)[1]

    def _text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The LLM's input embeddings of ``input_ids`` (B, T, D), `<image>` placeholders included."""
        # The placeholder id may lie outside the LLM's vocabulary: look up a harmless id instead.
        return self.language_model.get_input_embeddings()(input_ids.masked_fill(input_ids == self.image_token_id, 0))

    def _questions(self, input_ids: torch.Tensor, text_embeds: torch.Tensor, images: Sequence[SlicedImage],
                   tokens_per_slice: int | None = None, labels: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """``question_embeddings`` for a question-conditioned instruction token; None for the paper's."""
        if self.config.compressor.instruction != "question":
            return None
        return self.question_embeddings(input_ids, text_embeds, images, tokens_per_slice, labels, attention_mask)

    def _encode_images(self, images: Sequence[SlicedImage], return_selection: bool = False,
                       tokens_per_slice: int | None = None, questions: torch.Tensor | None = None
                       ) -> tuple[list[torch.Tensor], list[ViewSelection], list[ViewGroup]]:
        """`encode_images`, and the view groups as they ran."""
        views, owners = [], []
        for image_index, image in enumerate(images):
            for view_index, view in enumerate(image.views()):
                views.append(view)
                owners.append((image_index, view_index, view_index == image.plan.num_slices))
        device = self._device()
        groups: dict[tuple[int, int], list[int]] = {}
        for position, view in enumerate(views):
            groups.setdefault(tuple(view.shape[-2:]), []).append(position)
        per_view: list[torch.Tensor | None] = [None] * len(views)
        selections: list[ViewSelection] = []
        ran: list[ViewGroup] = []
        progress = self.training_progress if self.training else None
        for positions in groups.values():
            pixels = torch.stack([views[p] for p in positions]).to(device, self.vision_tower.dtype)
            if self.feature_cache is None:
                encoded = self.vision_tower(pixels)                  # tokens (n, HW, C), CLS row (n, HW)
            else:
                encoded = self.feature_cache.encode(self.vision_tower, pixels)
            extra = {} if questions is None else {"question": questions[[owners[p][0] for p in positions]]}
            out: CompressionOutput = self.compressor(encoded.patch_tokens, encoded.cls_attention,
                                                     encoded.grid, progress, tokens_per_slice, **extra)
            ran.append(ViewGroup([owners[p][:2] for p in positions], out))
            for row, position in enumerate(positions):
                per_view[position] = out.tokens[row]                  # (K, D)
                if return_selection:
                    image_index, view_index, is_global = owners[position]
                    selections.append(ViewSelection(
                        image_index, view_index, is_global, encoded.grid, _row(out.indices, row),
                        _row(out.visual_scores, row), _row(out.native_scores, row),
                        _row(out.aggregate_scores, row)))
        per_image: list[list[torch.Tensor]] = [[] for _ in images]
        for (image_index, _, _), tokens in zip(owners, per_view):
            per_image[image_index].append(tokens)
        selections.sort(key=lambda s: (s.image_index, s.view_index))
        return [torch.cat(parts) for parts in per_image], selections, ran

    def embed(self, input_ids: torch.Tensor, images: Sequence[SlicedImage] = (),
              tokens_per_slice: int | None = None, labels: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids with `<image>` placeholders → the LLM's input embeddings (B, T, D)."""
        return self._embed(input_ids, images, tokens_per_slice, labels, attention_mask)[0]

    def question_embeddings(self, input_ids: torch.Tensor, text_embeds: torch.Tensor,
                            images: Sequence[SlicedImage], tokens_per_slice: int | None = None,
                            labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
                            ) -> torch.Tensor:
        """(images, D): for each image, the mean input embedding of its question: the tokens after
        the image's last visual token, up to the next image, the first supervised token (the
        answer, in training) or the end of the sample. So a prompt "<image>\\n Q ASSISTANT:" gives
        the mean over "\\n Q ASSISTANT:", in training and at inference alike; without tokens after
        it, zeros. Detached: the question steers the selection, it is not trained through it."""
        from meteor.processing.slicing import view_token_counts

        k = self.config.compressor.tokens_per_slice if tokens_per_slice is None else tokens_per_slice
        counts = [sum(view_token_counts(image.plan, k if k is not None else (lambda grid: grid[0] * grid[1])))
                  for image in images]
        image_mask = input_ids == self.image_token_id
        vectors, image = [], 0
        for row in range(input_ids.shape[0]):
            positions = image_mask[row].nonzero().flatten().tolist()
            end = int(attention_mask[row].nonzero().max()) + 1 if attention_mask is not None else input_ids.shape[1]
            if labels is not None:
                supervised = (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
            else:
                supervised = []
            starts = []
            while positions:
                if image >= len(images):
                    raise ValueError("the input holds more image tokens than the images given")
                starts.append(positions[0])
                last = positions[counts[image] - 1]
                positions = positions[counts[image]:]
                stop = min([end, *(p for p in supervised if p > last), *positions[:1]])
                span = text_embeds[row, last + 1:stop]
                vectors.append(span.mean(0) if len(span) else text_embeds.new_zeros(text_embeds.shape[-1]))
                image += 1
        return torch.stack(vectors).detach()

    def _embed(self, input_ids: torch.Tensor, images: Sequence[SlicedImage] = (),
               tokens_per_slice: int | None = None, labels: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[ViewGroup]]:
        image_mask = input_ids == self.image_token_id                 # (B, T)
        embeds = self._text_embeds(input_ids)                         # (B, T, D)
        expected = int(image_mask.sum())
        if not images:
            if expected:
                raise ValueError(f"the input has {expected} image tokens but no images were given")
            return embeds, []
        questions = self._questions(input_ids, embeds, images, tokens_per_slice, labels, attention_mask)
        parts, _, groups = self._encode_images(images, tokens_per_slice=tokens_per_slice, questions=questions)
        visual = torch.cat(parts)                                      # (Σ tokens, D)
        if visual.shape[0] != expected:
            raise ValueError(
                f"image features and image tokens disagree: the images give {visual.shape[0]} visual "
                f"tokens but the input has {expected} {self.config.image_token} tokens; build the "
                f"input with the MeteorProcessor of this model (same tokens_per_slice and max_slices)")
        return embeds.masked_scatter(image_mask.unsqueeze(-1), visual.to(embeds.dtype)), groups

    # --- LLM ------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                images: Sequence[SlicedImage] = (), labels: torch.Tensor | None = None,
                return_views: bool = False, tokens_per_slice: int | None = None, **kwargs):
        """The causal LM's output; with `labels` (IGNORE_INDEX where unsupervised) its `loss`. With
        `return_views`, a `MeteorCausalLMOutput` that also holds the projector's per-view outputs.
        `tokens_per_slice`: K′ instead of the trained K (as the batch was laid out with)."""
        device = self._device()
        input_ids = input_ids.to(device)
        labels = None if labels is None else labels.to(device)
        mask = None if attention_mask is None else attention_mask.to(device)
        embeds, groups = self._embed(input_ids, images, tokens_per_slice, labels, mask)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels, **kwargs)
        if not return_views:
            return out
        unknown = set(out.keys()) - {f.name for f in dataclasses.fields(MeteorCausalLMOutput)}
        if unknown:
            raise ValueError(f"return_views=True cannot carry the language model's output field(s) "
                             f"{sorted(unknown)}: ask for them without return_views")
        return MeteorCausalLMOutput(**out, views=groups)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 images: Sequence[SlicedImage] = (), tokens_per_slice: int | None = None,
                 **generate_kwargs) -> torch.Tensor:
        """New token ids (B, T_new) for left-padded prompts; ``tokens_per_slice`` as in ``forward``."""
        device = self._device()
        input_ids = input_ids.to(device)
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate needs left-padded prompts (the last position of every row "
                             "must be a real token): use MeteorProcessor(...), which pads left")
        mask = None if attention_mask is None else attention_mask.to(device)
        embeds = self.embed(input_ids, images, tokens_per_slice, attention_mask=mask)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)

    def _device(self) -> torch.device:
        return next(self.compressor.parameters()).device

    # --- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, processor: MeteorProcessor | None = None,
                        overwrite: bool = False) -> Path:
        """Write config, compressor, vision tower, language model (all safetensors) and tokenizer.

        The folder is written beside its destination and moved into place at the end, so an
        interrupted save never leaves a half-written model; an existing folder is replaced only
        with overwrite=True."""
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise FileExistsError(f"{folder} exists and is not empty: choose another folder or pass "
                                  f"overwrite=True to replace it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            self.config.save(staging)
            save_file({k: v.detach().contiguous().cpu() for k, v in self.compressor.state_dict().items()},
                      staging / COMPRESSOR_FILE, metadata={"format": "pt"})
            self.vision_tower.save_pretrained(staging / VISION_DIR)
            self.language_model.save_pretrained(staging / LANGUAGE_DIR)
            if processor is not None:
                processor.save_tokenizer(staging)   # the tokenizer's own files: it tokenises as it did
            _replace_folder(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                        compressor_overrides: dict[str, Any] | None = None
                        ) -> tuple["LlavaMeteor", MeteorProcessor]:
        """Load a folder written by `save_pretrained` (no pickle anywhere).

        ``compressor_overrides``: CompressorConfig fields to change at load time, e.g.
        ``{"projector": "cls_topk", "tokens_per_slice": 16}`` to compress an all-tokens LLaVA-1.5
        model without training (its ``mlp.*`` weights are what cls_topk uses), or
        ``{"tokens_per_slice": 16, "expert_mode": "visual"}``. The new projector's weights must all
        be in the saved file with the same shapes; saved weights it does not use are left out (and
        logged)."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} is not a LLaVA-Meteor model folder: {CONFIG_NAME} is "
                                    f"missing (write one with LlavaMeteor.save_pretrained)")
        config = MeteorConfig.load(folder)
        saved_projector = config.compressor.projector
        if compressor_overrides:
            config = dataclasses.replace(config, compressor=_override_compressor(config.compressor,
                                                                                 compressor_overrides))
        vision = VisionTower.from_pretrained(folder / VISION_DIR, feature_layer=config.feature_layer,
                                             attention_layer=config.attention_layer, dtype=dtype,
                                             visual_expert=config.visual_expert)
        language_model = _load_causal_lm(folder / LANGUAGE_DIR, dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model, processor = cls.build(vision, language_model, tokenizer, config, dtype)
        weights = load_compressor(folder / COMPRESSOR_FILE)
        if compressor_overrides:
            _load_overridden(model.compressor, weights, saved_projector, config.compressor.projector, folder)
        else:
            model.compressor.load_state_dict(weights)
        return model, processor

    @classmethod
    def from_llava(cls, path: str | os.PathLike, config: MeteorConfig | None = None,
                   vision: str | os.PathLike | None = None, dtype: torch.dtype | None = None
                   ) -> tuple["LlavaMeteor", MeteorProcessor]:
        """A LLaVA-Meteor model from a local llava-hf (``LlavaForConditionalGeneration``) or original
        LLaVA-1.5 (``LlavaLlamaForCausalLM``) folder: its vision tower, language model and tokenizer,
        and its mlp2x_gelu projector as the initial weights of the projector's MLP. ``config`` None
        keeps LLaVA's own computation (projector "mlp", every token, one view); the feature layer
        is always the checkpoint's. ``vision``: the local CLIP folder an original LLaVA-1.5 folder
        names by hub id in ``mm_vision_tower``. See ``meteor.adapters.llava``."""
        from meteor.adapters.llava.convert import load_projector_mlp, read_llava_for_meteor

        config, parts = read_llava_for_meteor(path, config, vision, dtype)
        model, processor = cls.build(parts.vision, parts.language_model, parts.tokenizer, config, dtype)
        load_projector_mlp(model.compressor, parts.projector, str(path))
        return model, processor


_UNOVERRIDABLE = ("vision_width", "text_width")


def _override_compressor(compressor, overrides: dict[str, Any]):
    """``compressor`` with ``overrides`` applied and validated (CompressorConfig's own checks)."""
    from meteor.model.configuration import ConfigError

    known = {f.name for f in dataclasses.fields(compressor)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown compressor option(s) {unknown} to override; known: {sorted(known)}")
    fixed = sorted(set(overrides) & set(_UNOVERRIDABLE))
    if fixed:
        raise ConfigError(f"{fixed} are the widths of the vision tower and the LLM, read from them: they "
                          f"cannot be overridden")
    return dataclasses.replace(compressor, **overrides)


def _load_overridden(compressor: nn.Module, weights: dict[str, torch.Tensor], saved: str, new: str,
                     folder: Path) -> None:
    """Load saved compressor weights into an overridden projector: every weight it has must be
    saved with its shape; saved weights it lacks (another projector's) are logged and left out."""
    import logging

    own = compressor.state_dict()
    missing = sorted(name for name in own if name not in weights)
    if missing:
        raise ValueError(f"the {saved!r} compressor saved in {folder} has no weights for the {new!r} "
                         f"projector's {missing[:4]}{' …' if len(missing) > 4 else ''}: override to a "
                         f"projector made of the saved one's parts (the token-wise ones share mlp.*)")
    mismatched = [f"{name} {tuple(weights[name].shape)} vs {tuple(own[name].shape)}" for name in own
                  if weights[name].shape != own[name].shape]
    if mismatched:
        raise ValueError(f"the saved compressor's weights do not fit the {new!r} projector: {mismatched[:3]}")
    unused = sorted({name.split(".")[0] for name in weights if name not in own})
    if unused:
        logging.getLogger(__name__).warning("the %r projector loaded from %s's %r compressor leaves its %s "
                                            "weights unused", new, folder, saved, ", ".join(unused))
    compressor.load_state_dict({name: weights[name] for name in own}, strict=True)


def load_compressor(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compressor weights not found at {path}")
    return load_file(str(path))


def _load_causal_lm(path: str | os.PathLike, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no causal language model at {path}: expected a Hugging Face folder "
                                f"with config.json and weights (e.g. a local Vicuna checkout)")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _replace_folder(staging: Path, folder: Path) -> None:
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(folder)


def _row(scores: torch.Tensor | None, row: int) -> torch.Tensor | None:
    return None if scores is None else scores[row].detach().cpu()
