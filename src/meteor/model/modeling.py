"""LLaVA-Meteor as a transformers model: a frozen vision tower → Top-Down Compression → any causal LM.

Laid out as transformers' LLaVA (``LlavaForConditionalGeneration``), so tools that know that layout
find things where they expect them: ``model.vision_tower`` (any ``AutoModel`` of the vision config:
CLIP, SigLIP), ``model.multi_modal_projector`` (the compressor: Top-Down Compression or a baseline
projector, ``meteor.model.projectors``), ``model.language_model`` (the decoder, any ``AutoModel``
of the text config) and ``lm_head``.

The model takes what ``LlavaMeteorProcessor`` makes (docs/design.md, "Tensors"): token ids in
which every visual token is one ``<image>`` id, laid out in LLaVA-UHD's spatial schema; the pixels
of every view as flattened patches ``pixel_values`` (P, 3·p·p); each view's patch grid
``view_grids`` (V, 2) and each image's slice grid ``image_grids`` (I, 2). It encodes the views (views
of one size as one batch), compresses each view to its K′ tokens and writes them into the
``<image>`` positions of the language model's input embeddings. ``GenerationMixin.generate`` is
the one generation path: the images are read at the prefill step only, then the KV cache runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from meteor.model.configuration import IGNORE_INDEX, ConfigError, MeteorConfig
from meteor.model.configuration_llava_meteor import MODEL_TYPE, LlavaMeteorConfig
from meteor.model.projectors import PROJECTORS, CompressionOutput, build_projector
from meteor.model.vision import VisionOutput, VisionTower

logger = logging.getLogger(__name__)


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


TowerOutputs = list[tuple[list[int], VisionOutput]]
"""The vision tower's outputs for a batch's views: per group of views of one size, the views'
positions (in ``view_grids`` order) and their ``VisionOutput``. ``LlavaMeteorModel.encode_views``
makes it; a feature cache can make the same (``meteor.model.feature_cache``) and hand it to
``forward(tower_outputs=...)``."""


@dataclass
class LlavaMeteorCausalLMOutput(CausalLMOutputWithPast):
    """The causal LM's output; with ``return_views=True`` also the projector's per-view outputs,
    what a training aid adds a loss on (``meteor.train.auxiliary``)."""
    views: list[ViewGroup] | None = None
    """The batch's view groups in the order they ran."""


# --- tensors in, views out ---------------------------------------------------------------------------

def split_views(pixel_values: torch.Tensor, view_grids: torch.Tensor, patch_size: int) -> list[torch.Tensor]:
    """Flattened patches → views: pixel_values (P, 3·p·p), each view's patches in raster order and
    each patch as (channel, y, x); view_grids (V, 2) → V tensors (3, rows·p, cols·p)."""
    grids = [tuple(int(v) for v in grid) for grid in view_grids.tolist()]
    counts = [rows * cols for rows, cols in grids]
    if sum(counts) != pixel_values.shape[0]:
        raise ValueError(f"pixel_values holds {pixel_values.shape[0]} patches but view_grids describe "
                         f"{sum(counts)} ({len(grids)} views): make both with the model's processor")
    channels = pixel_values.shape[1] // (patch_size * patch_size)
    if channels * patch_size * patch_size != pixel_values.shape[1]:
        raise ValueError(f"pixel_values rows have {pixel_values.shape[1]} values, not 3·{patch_size}² for "
                         f"{patch_size}-pixel patches: is the processor's patch_size the vision tower's?")
    views = []
    for (rows, cols), patches in zip(grids, pixel_values.split(counts)):
        view = patches.view(rows, cols, channels, patch_size, patch_size)      # (r, c, 3, p, p)
        views.append(view.permute(2, 0, 3, 1, 4).reshape(channels, rows * patch_size, cols * patch_size))
    return views


def view_batches(pixel_values: torch.Tensor, view_grids: torch.Tensor, patch_size: int
                 ) -> list[tuple[list[int], torch.Tensor]]:
    """The views stacked by size, as the tower runs them: (their positions, (n, 3, h, w)) per size."""
    views = split_views(pixel_values, view_grids, patch_size)
    groups: dict[tuple[int, int], list[int]] = {}
    for position, view in enumerate(views):
        groups.setdefault(tuple(view.shape[-2:]), []).append(position)
    return [(positions, torch.stack([views[p] for p in positions])) for positions in groups.values()]


def views_per_image(image_grids: torch.Tensor) -> list[int]:
    """Each image's number of views: its slices (rows · cols, 0 when unsliced) and the global view."""
    return [int(rows) * int(cols) + 1 for rows, cols in image_grids.tolist()]


def view_token_counts(view_grids: torch.Tensor, tokens_per_slice: int | None) -> list[int]:
    """Visual tokens of each view: K′, or every patch of the view when K′ is None (keep all)."""
    if tokens_per_slice is not None:
        return [tokens_per_slice] * len(view_grids)
    return [int(rows) * int(cols) for rows, cols in view_grids.tolist()]


# --- the model -----------------------------------------------------------------------------------------

class LlavaMeteorPreTrainedModel(PreTrainedModel):
    config_class = LlavaMeteorConfig
    config: LlavaMeteorConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = [cls.__name__ for cls in PROJECTORS.values()]
    """A projector runs its views as one piece: accelerate never splits it across devices."""

    def _init_weights(self, module: nn.Module) -> None:
        # The vision tower and the language model are transformers models that initialise
        # themselves (transformers dispatches to their own _init_weights). The projector draws its
        # weights when it is built (Mamba's S4D-real A and Δ bias, the instruction token, ...), and
        # from_pretrained refuses a folder that lacks any of them, so nothing here redraws them.
        if module is getattr(self, "lm_head", None):
            super()._init_weights(module)


class LlavaMeteorModel(LlavaMeteorPreTrainedModel):
    """The vision tower, the compressor and the decoder, without the language-modelling head."""

    def __init__(self, config: LlavaMeteorConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = build_projector(config.compressor_config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    @property
    def meteor_config(self) -> MeteorConfig:
        return self.config.meteor

    @property
    def tower(self) -> VisionTower:
        """``vision_tower`` read as the visual expert needs it (features and scores at the
        configured layers); the same weights, not a second module."""
        reader = self.__dict__.get("_tower_reader")
        if reader is None or reader.encoder is not self.vision_tower:
            config = self.config
            reader = VisionTower(self.vision_tower, config.feature_layer, config.attention_layer,
                                 visual_expert=config.visual_expert)
            self.__dict__["_tower_reader"] = reader       # not a submodule: no second copy of the weights
        return reader

    def train(self, mode: bool = True) -> "LlavaMeteorModel":
        super().train(mode)
        self.vision_tower.train(False)        # frozen, no dropout, whatever the parent asks
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # --- vision → compressed tokens -----------------------------------------------------------------
    def encode_views(self, pixel_values: torch.Tensor, view_grids: torch.Tensor) -> TowerOutputs:
        """The frozen tower's outputs for every view, views of one size run as one batch."""
        tower = self.tower
        device, dtype = self.vision_tower.device, tower.dtype
        return [(positions, tower(views.to(device, dtype)))
                for positions, views in view_batches(pixel_values, view_grids, tower.patch_size)]

    def compress(self, tower_outputs: TowerOutputs, image_grids: torch.Tensor, tokens_per_slice: int | None = None,
                 questions: torch.Tensor | None = None, training_progress: float | None = None,
                 return_selection: bool = False) -> tuple[list[torch.Tensor], list[ViewSelection], list[ViewGroup]]:
        """Each image → its visual tokens in LLM order (Σ views' K′, D); also, with
        ``return_selection``, what each view kept; and the view groups as they ran. K′ =
        ``tokens_per_slice``, else the trained K. ``questions``: (images, D) pooled question
        embeddings for a question-conditioned instruction token. ``training_progress``: the
        fraction of training done, which drives the native expert's warm-up (None at inference)."""
        owners = []                                    # (image, view, is_global) per view position
        for image, count in enumerate(views_per_image(image_grids)):
            owners += [(image, view, view == count - 1) for view in range(count)]
        total = sum(len(positions) for positions, _ in tower_outputs)
        if total != len(owners):
            raise ValueError(f"the tower encoded {total} views but image_grids describe {len(owners)}: make "
                             f"pixel_values, view_grids and image_grids with one processor call")
        progress = training_progress if self.training else None
        per_view: list[torch.Tensor | None] = [None] * total
        selections: list[ViewSelection] = []
        ran: list[ViewGroup] = []
        for positions, encoded in tower_outputs:
            extra = {} if questions is None else {"question": questions[[owners[p][0] for p in positions]]}
            out: CompressionOutput = self.multi_modal_projector(encoded.patch_tokens, encoded.cls_attention,
                                                                encoded.grid, progress, tokens_per_slice, **extra)
            ran.append(ViewGroup([owners[p][:2] for p in positions], out))
            for row, position in enumerate(positions):
                per_view[position] = out.tokens[row]                        # (K, D)
                if return_selection:
                    image, view, is_global = owners[position]
                    selections.append(ViewSelection(image, view, is_global, encoded.grid, _row(out.indices, row),
                                                    _row(out.visual_scores, row), _row(out.native_scores, row),
                                                    _row(out.aggregate_scores, row)))
        per_image: list[list[torch.Tensor]] = [[] for _ in range(len(image_grids))]
        for (image, _, _), tokens in zip(owners, per_view):
            per_image[image].append(tokens)
        selections.sort(key=lambda s: (s.image_index, s.view_index))
        return [torch.cat(parts) for parts in per_image], selections, ran

    def text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's input embeddings of ``input_ids`` (B, T, D), ``<image>`` placeholders included
        (the placeholder may lie outside the decoder's vocabulary: a harmless id is looked up)."""
        placeholder = self.config.image_token_id
        ids = input_ids if placeholder is None else input_ids.masked_fill(input_ids == placeholder, 0)
        return self.get_input_embeddings()(ids)

    def question_embeddings(self, input_ids: torch.Tensor, text_embeds: torch.Tensor, view_grids: torch.Tensor,
                            image_grids: torch.Tensor, tokens_per_slice: int | None = None,
                            labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
                            ) -> torch.Tensor:
        """(images, D): for each image, the mean input embedding of its question: the tokens after
        the image's last visual token, up to the next image, the first supervised token (the
        answer, in training) or the end of the sample. So a prompt "<image>\\n Q ASSISTANT:" gives
        the mean over "\\n Q ASSISTANT:", in training and at inference alike; without tokens after
        it, zeros. Detached: the question steers the selection, it is not trained through it."""
        per_view = view_token_counts(view_grids, self.config.meteor.resolve_tokens_per_slice(tokens_per_slice))
        counts, start = [], 0
        for views in views_per_image(image_grids):
            counts.append(sum(per_view[start:start + views]))
            start += views
        image_mask = input_ids == self.config.image_token_id
        vectors, image = [], 0
        for row in range(input_ids.shape[0]):
            positions = image_mask[row].nonzero().flatten().tolist()
            end = int(attention_mask[row].nonzero().max()) + 1 if attention_mask is not None else input_ids.shape[1]
            supervised = (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist() if labels is not None else []
            while positions:
                if image >= len(counts):
                    raise ValueError("the input holds more image tokens than the images given")
                last = positions[counts[image] - 1]
                positions = positions[counts[image]:]
                stop = min([end, *(p for p in supervised if p > last), *positions[:1]])
                span = text_embeds[row, last + 1:stop]
                vectors.append(span.mean(0) if len(span) else text_embeds.new_zeros(text_embeds.shape[-1]))
                image += 1
        return torch.stack(vectors).detach()

    def image_features(self, input_ids: torch.Tensor, text_embeds: torch.Tensor, view_grids: torch.Tensor,
                       image_grids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       tower_outputs: TowerOutputs | None = None, tokens_per_slice: int | None = None,
                       labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                       training_progress: float | None = None, return_selection: bool = False
                       ) -> tuple[list[torch.Tensor], list[ViewSelection], list[ViewGroup]]:
        """``compress`` of the views (encoded here unless ``tower_outputs`` are given), with the
        question embeddings a question-conditioned instruction token reads."""
        k = self.config.meteor.resolve_tokens_per_slice(tokens_per_slice)
        if tower_outputs is None:
            tower_outputs = self.encode_views(pixel_values, view_grids)
        questions = None
        if self.config.compressor["instruction"] == "question":
            questions = self.question_embeddings(input_ids, text_embeds, view_grids, image_grids, k, labels,
                                                 attention_mask)
        return self.compress(tower_outputs, image_grids, k, questions, training_progress, return_selection)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              view_grids: torch.Tensor | None = None, image_grids: torch.Tensor | None = None,
              tokens_per_slice: int | None = None, tower_outputs: TowerOutputs | None = None,
              labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
              training_progress: float | None = None, decoding: bool = False
              ) -> tuple[torch.Tensor, list[ViewGroup]]:
        """Token ids with ``<image>`` placeholders → the decoder's input embeddings (B, T, D), the
        compressed visual tokens written into the placeholders; and the view groups as they ran."""
        inputs_embeds = self.text_embeddings(input_ids)                           # (B, T, D)
        placeholders = int((input_ids == self.config.image_token_id).sum())
        if pixel_values is None and tower_outputs is None:
            if placeholders and not decoding:
                raise ValueError(f"the input has {placeholders} image tokens but no images were given")
            return inputs_embeds, []
        if view_grids is None or image_grids is None:
            raise ValueError("pixel_values come with view_grids and image_grids: pass every output of the "
                             "model's processor")
        parts, _, groups = self.image_features(input_ids, inputs_embeds, view_grids, image_grids, pixel_values,
                                               tower_outputs, tokens_per_slice, labels, attention_mask,
                                               training_progress)
        visual = torch.cat(parts)                                                  # (Σ tokens, D)
        if visual.shape[0] != placeholders:
            raise ValueError(f"image features and image tokens disagree: the images give {visual.shape[0]} visual "
                             f"tokens but the input has {placeholders} {self.config.image_token} tokens; make the "
                             f"input with this model's processor, with the same tokens_per_slice")
        mask = (input_ids == self.config.image_token_id).unsqueeze(-1)             # (B, T, 1)
        inputs_embeds = inputs_embeds.masked_scatter(mask.to(inputs_embeds.device),
                                                     visual.to(inputs_embeds.device, inputs_embeds.dtype))
        return inputs_embeds, groups

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                view_grids: torch.Tensor | None = None, image_grids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                tokens_per_slice: int | None = None, training_progress: float | None = None,
                tower_outputs: TowerOutputs | None = None, image_sizes: torch.Tensor | None = None, **kwargs):
        """The decoder's output on the prompt with its images; ``(outputs, view groups)``.

        ``image_sizes`` (the originals' sizes, which the processor also returns) is not needed here."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        groups: list[ViewGroup] = []
        if inputs_embeds is None:
            inputs_embeds, groups = self.embed(input_ids, pixel_values, view_grids, image_grids, tokens_per_slice,
                                               tower_outputs, labels, attention_mask, training_progress,
                                               decoding=_past_prefill(kwargs))
        outputs = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, **kwargs)
        return outputs, groups


class LlavaMeteorForConditionalGeneration(LlavaMeteorPreTrainedModel, GenerationMixin):
    """LLaVA-Meteor with its language-modelling head: the class ``AutoModelForImageTextToText`` loads
    for a folder whose config.json says ``"model_type": "llava_meteor"``."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: LlavaMeteorConfig):
        super().__init__(config)
        self.model = LlavaMeteorModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    # names the rest of the project and users reach for
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def compressor(self) -> nn.Module:
        """The vision-to-language projector (``model.multi_modal_projector``)."""
        return self.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def meteor_config(self) -> MeteorConfig:
        return self.config.meteor

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                view_grids: torch.Tensor | None = None, image_grids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                tokens_per_slice: int | None = None, training_progress: float | None = None,
                tower_outputs: TowerOutputs | None = None, return_views: bool = False,
                num_items_in_batch: float | torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                image_sizes: torch.Tensor | None = None, **kwargs) -> LlavaMeteorCausalLMOutput:
        """Logits for every position (the last ``logits_to_keep`` when set) and, with ``labels``
        (IGNORE_INDEX where unsupervised), the next-token loss: the mean over supervised tokens, or
        their sum divided by ``num_items_in_batch`` when given (the trainer's global token count).

        ``tokens_per_slice``: K′ instead of the trained K (the processor must have laid the prompt out
        with the same K′). ``training_progress``: the fraction of training done, which drives the
        native expert's warm-up; None outside training. ``tower_outputs``: the vision tower's outputs
        made elsewhere (a feature cache), in place of encoding ``pixel_values``. ``return_views``: also
        the projector's per-view outputs (``views``)."""
        outputs, groups = self.model(input_ids=input_ids, pixel_values=pixel_values, view_grids=view_grids,
                                     image_grids=image_grids, attention_mask=attention_mask,
                                     position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels,
                                     tokens_per_slice=tokens_per_slice, training_progress=training_progress,
                                     tower_outputs=tower_outputs, **kwargs)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels.to(logits.device),
                                      vocab_size=self.config.text_config.vocab_size,
                                      num_items_in_batch=num_items_in_batch)
        rest = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
        return LlavaMeteorCausalLMOutput(loss=loss, logits=logits, **rest, views=groups if return_views else None)

    # --- what the compressor keeps ---------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, view_grids: torch.Tensor, image_grids: torch.Tensor,
                      tokens_per_slice: int | None = None, return_selection: bool = False,
                      tower_outputs: TowerOutputs | None = None, questions: torch.Tensor | None = None,
                      **_) -> tuple[list[torch.Tensor], list[ViewSelection]]:
        """Each image's visual tokens in LLM order (Σ views' K′, D), and with ``return_selection`` what
        each view kept, for images read without a prompt: a question-conditioned instruction token
        needs ``questions`` ((images, D), ``model.question_embeddings``), or use ``image_selections``."""
        k = self.config.meteor.resolve_tokens_per_slice(tokens_per_slice)
        if tower_outputs is None:
            tower_outputs = self.model.encode_views(pixel_values, view_grids)
        tokens, selections, _ = self.model.compress(tower_outputs, image_grids, k, questions,
                                                    return_selection=return_selection)
        return tokens, selections

    @torch.no_grad()
    def image_selections(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, view_grids: torch.Tensor,
                         image_grids: torch.Tensor, tokens_per_slice: int | None = None,
                         attention_mask: torch.Tensor | None = None, tower_outputs: TowerOutputs | None = None,
                         **_) -> list[ViewSelection]:
        """What the compressor keeps of each view when the model reads this prompt (the processor's
        outputs), as ``forward`` computes it: for a question-conditioned instruction token, each
        image's question steers it; for the paper's token the prompt changes nothing."""
        input_ids = torch.as_tensor(input_ids, device=self.device)
        input_ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        embeds = self.model.text_embeddings(input_ids)
        _, selections, _ = self.model.image_features(input_ids, embeds, view_grids, image_grids, pixel_values,
                                                     tower_outputs, tokens_per_slice, None, attention_mask,
                                                     return_selection=True)
        return selections

    # --- generation ----------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if "pixel_values" not in inputs and "tower_outputs" in inputs:
            inputs.pop("tower_outputs")       # read at the prefill step only, as pixel_values is
        return inputs

    # --- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``; a local folder of another model type, one without weights,
        one in the format before this class, or one missing compressor weights is refused with what
        to do."""
        folder = Path(str(pretrained_model_name_or_path))
        if folder.is_dir():
            check_folder(folder)
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = sorted(key for key in info.get("missing_keys", ()) if ".multi_modal_projector." in f".{key}")
        if missing:
            raise ValueError(f"{pretrained_model_name_or_path} lacks the compressor weights {missing[:4]}"
                             f"{' …' if len(missing) > 4 else ''}: was it saved with another projector? Load it "
                             f"with the configuration it was trained with")
        return (model, info) if wants_info else model


def check_folder(folder: Path) -> dict[str, Any]:
    """A LLaVA-Meteor folder's config.json, read and checked: that it is one, and that it has weights."""
    config_file = folder / "config.json"
    if not config_file.is_file() and (folder / "meteor_config.json").is_file():
        raise FileNotFoundError(f"{folder} is in LLaVA-Meteor's format before 0.2 (meteor_config.json): load it "
                                f"with meteor.pretrained.load_pretrained, or rewrite it as a transformers folder "
                                f"with `meteor convert --upgrade {folder} --out NEW_FOLDER`")
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: it is not a model folder (save one with "
                                f"model.save_pretrained, or convert a LLaVA with `meteor convert --from-llava`)")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_file} is not valid JSON ({err})") from err
    model_type = data.get("model_type")
    if model_type != MODEL_TYPE:
        hint = ("convert it with `meteor convert --from-llava " + str(folder) + " --out NEW_FOLDER`"
                if model_type == "llava" or "mm_projector_type" in data else
                "load it with the transformers class of that model type")
        raise ConfigError(f"{config_file} describes a {model_type!r} model, not a LLaVA-Meteor one "
                          f"({MODEL_TYPE!r}): {hint}")
    weights = [name for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
               if (folder / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{folder} has config.json but no weights (model.safetensors or "
                                f"model.safetensors.index.json): copy the weight files into it, or save the "
                                f"model again with model.save_pretrained")
    return data


def _past_prefill(kwargs: dict) -> bool:
    """Whether this call continues from a KV cache (a decoding step): its ids are new tokens only."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0


def _row(scores: torch.Tensor | None, row: int) -> torch.Tensor | None:
    return None if scores is None else scores[row].detach().cpu()


__all__ = ["IGNORE_INDEX", "LlavaMeteorCausalLMOutput", "LlavaMeteorForConditionalGeneration", "LlavaMeteorModel",
           "LlavaMeteorPreTrainedModel", "TowerOutputs", "ViewGroup", "ViewSelection", "split_views", "view_batches",
           "view_token_counts", "views_per_image"]
