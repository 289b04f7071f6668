"""The plugin's multimodal processor: from an image to the tensors the model reads, and the image's
place in the prompt.

vLLM tokenises the prompt itself and hands each image to this processor, which runs the folder's own
``LlavaMeteorProcessor`` (loaded once per engine, as transformers loads it): its image processor
slices and normalises the image into the tensors the transformers class takes (``pixel_values``,
``view_grids``, ``image_grids``, ``image_sizes``), and its ``layout_ids`` replaces the image's one
``<image>`` id with LLaVA-UHD's spatial schema (K′ image ids per view, the separators' ids between
slices and after each row). Only the image ids receive embeddings (``PromptUpdateDetails
.select_token_id``); the separators stay text.

K′ comes from the request's ``mm_processor_kwargs={"tokens_per_slice": K′}`` (the OpenAI server
accepts those with ``--trust-request-mm-kwargs``), else the engine's ``--mm-processor-kwargs``, else
the folder's K, and is resolved as everywhere in the package (``MeteorConfig
.resolve_tokens_per_slice``). vLLM hashes each image with the request's kwargs, so its caches never
mix two budgets; each image carries its K′ to the model, so one batch can mix them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptReplacement, PromptUpdate, PromptUpdateDetails)

from meteor.adapters.vllm.config import ServingConfig, UnservableFolder, serving_config
from meteor.processing.image_processor import image_tensors
from meteor.processing.processor import LlavaMeteorProcessor

PROCESSOR_KWARGS = ("tokens_per_slice",)
"""The ``mm_processor_kwargs`` the plugin reads."""
KEEP_ALL = 0
"""The per-image ``tokens_per_slice`` value meaning "every token of each view" (the folder's K is null)."""


class MeteorProcessingInfo(BaseProcessingInfo):
    """The folder's options and its processor, read once per engine."""

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.serving  # refuse a folder the plugin cannot serve as soon as vLLM builds its processor

    @cached_property
    def serving(self) -> ServingConfig:
        return serving_config(self.get_hf_config())

    def get_hf_processor(self, **kwargs: object) -> LlavaMeteorProcessor:
        return self.processor

    @cached_property
    def processor(self) -> LlavaMeteorProcessor:
        """The folder's ``LlavaMeteorProcessor`` (loaded through vLLM, which resolves hub names and
        revisions), checked against config.json."""
        processor = self.ctx.get_hf_processor(LlavaMeteorProcessor)
        meteor, saved = self.serving.meteor, processor.config
        differ = [name for name, ours, theirs in (
            ("image_token_id", self.serving.image_token_id, processor.image_token_id),
            ("tokens_per_slice", meteor.compressor.tokens_per_slice, saved.compressor.tokens_per_slice),
            ("max_slices", meteor.max_slices, saved.max_slices),
            ("slice_separator", meteor.slice_separator, saved.slice_separator),
            ("row_separator", meteor.row_separator, saved.row_separator)) if ours != theirs]
        if differ or processor.patch_size != self.serving.patch_size:
            raise UnservableFolder(f"the folder's processor files and config.json disagree on "
                                   f"{differ or ['patch_size']}: they come from different models; save the model "
                                   f"and its processor together (meteor.pretrained.save_pretrained)")
        return processor

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def tokens_per_slice(self, mm_kwargs: Mapping[str, object], images: Sequence = ()) -> int | None:
        """K′ for a request's images: its ``tokens_per_slice``, else the engine's, else the folder's K
        (None: every token). Unknown keys, and values the model cannot keep for these images, are
        refused."""
        merged = self.ctx.get_merged_mm_kwargs(mm_kwargs)
        unknown = sorted(set(merged) - set(PROCESSOR_KWARGS))
        if unknown:
            raise ValueError(f"unknown mm_processor_kwargs {unknown} for LLaVA-Meteor: it reads only "
                             f"{list(PROCESSOR_KWARGS)} (e.g. {{\"tokens_per_slice\": 32}})")
        return self.processor.tokens_per_slice(merged.get("tokens_per_slice"), images)

    def num_image_tokens(self, width: int, height: int, tokens_per_slice: int | None = None) -> int:
        """How many ids a ``width`` x ``height`` image takes in the prompt (visual tokens and
        separators), from its size alone; ``tokens_per_slice`` None: the folder's K."""
        processor = self.processor
        return len(processor.layout_ids(processor.image_processor.plan(width, height), tokens_per_slice))

    def get_image_size_with_most_features(self) -> ImageSize:
        """An image cut into ``max_slices`` slices of the processor's view side (the tower's native
        side unless the model was built with another ``base_size``)."""
        base = self.processor.base_size
        return ImageSize(width=base * self.serving.meteor.max_slices, height=base)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        """The most embeddings one image can take whatever K′ a request asks for: (max_slices + 1)
        views keeping all of their at most (base / patch)² patches."""
        side = self.processor.base_size // self.processor.patch_size
        return {"image": (self.serving.meteor.max_slices + 1) * side * side}


class MeteorDummyInputsBuilder(BaseDummyInputsBuilder[MeteorProcessingInfo]):
    """Prompts for vLLM's memory profiling: one ``<image>`` per image, each of the largest kind."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.serving.meteor.image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_image_size_with_most_features()
        overrides = mm_options.get("image") if mm_options else None
        return {"image": self._get_dummy_images(width=size.width, height=size.height,
                                                num_images=mm_counts.get("image", 0), overrides=overrides)}


class MeteorMultiModalProcessor(BaseMultiModalProcessor[MeteorProcessingInfo]):
    """Images → the transformers class's image tensors plus ``tokens_per_slice`` (I,) (``KEEP_ALL``
    for every token); prompt → each ``<image>`` id replaced by its image's layout."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        processor = self.info.processor
        prepared = [processor.image_processor.prepare(_as_loadable(image)) for image in hf_data.get("images", [])]
        if not prepared:
            return BatchFeature({})
        k = self.info.tokens_per_slice(hf_kwargs, prepared)
        data = image_tensors(prepared, processor.patch_size)
        data["pixel_values"] = data["pixel_values"].to(self.info.ctx.model_config.dtype)
        data["tokens_per_slice"] = torch.full((len(prepared),), KEEP_ALL if k is None else k, dtype=torch.long)
        return BatchFeature(data)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
                              ) -> Mapping[str, MultiModalFieldConfig]:
        image_grids = hf_inputs.get("image_grids", torch.empty(0, 2, dtype=torch.long))
        view_grids = hf_inputs.get("view_grids", torch.empty(0, 2, dtype=torch.long))
        views_per_image = image_grids.prod(-1) + 1
        patches_per_view = view_grids.prod(-1)
        patches_per_image = torch.tensor([int(part.sum()) for part in patches_per_view.split(views_per_image.tolist())],
                                         dtype=torch.long)
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", patches_per_image),
            "view_grids": MultiModalFieldConfig.flat_from_sizes("image", views_per_image),
            "image_grids": MultiModalFieldConfig.batched("image"),
            "image_sizes": MultiModalFieldConfig.batched("image"),
            "tokens_per_slice": MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        processor = self.info.processor
        image_token_id = self.info.serving.image_token_id
        items = out_mm_kwargs.get("image", [])

        def replacement(index: int) -> PromptUpdateDetails:
            item = items[index].get_data()
            height, width = item["image_sizes"].tolist()
            k = int(item["tokens_per_slice"])
            ids = processor.layout_ids(processor.image_processor.plan(width, height), None if k == KEEP_ALL else k)
            return PromptUpdateDetails.select_token_id(ids, image_token_id)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


def _as_loadable(image):
    """vLLM hands images over as PIL images or arrays; a (C, H, W) tensor becomes the (H, W, C) array
    ``meteor.processing.images.load_image`` reads."""
    if isinstance(image, torch.Tensor):
        if image.dim() == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.permute(1, 2, 0)
        return image.numpy()
    return image
