"""The plugin's multimodal processor: from an image to the tensors the model reads, and the image's
place in the prompt.

vLLM tokenises the prompt itself; for each image this processor slices it exactly as the package's
``MeteorProcessor`` does (``meteor.processing.slicing``: the plan, the resized views, the
normalisation), and replaces the image's one ``<image>`` id with its layout
(``meteor.adapters.vllm.layout.layout_ids``): K′ image ids per view, the separators' ids between
slices and after each row. Only the image ids receive embeddings (``PromptUpdateDetails
.select_token_id``); the separators stay text. K′ comes from the request's
``mm_processor_kwargs={"tokens_per_slice": K′}``, else the engine's ``--mm-processor-kwargs``, else
the folder's K; the image's hash includes it, so vLLM's caches never mix two budgets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

import torch
from transformers import BatchFeature
from transformers.utils.constants import (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN,
                                          OPENAI_CLIP_STD)
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptReplacement, PromptUpdate, PromptUpdateDetails)

from meteor.adapters.vllm.config import ServingConfig, serving_config
from meteor.adapters.vllm.layout import KEEP_ALL, layout_ids, pack_views
from meteor.processing.images import load_image
from meteor.processing.processor import separator_ids
from meteor.processing.slicing import plan_slices, slice_image

PROCESSOR_KWARGS = ("tokens_per_slice",)
"""The ``mm_processor_kwargs`` the plugin reads (per request, or per engine with
``--mm-processor-kwargs``)."""


class MeteorProcessingInfo(BaseProcessingInfo):
    """The folder's geometry and options, read once per engine."""

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.serving  # refuse a folder the plugin cannot serve when vLLM builds its processor

    @cached_property
    def serving(self) -> ServingConfig:
        return serving_config(self.get_hf_config())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    @cached_property
    def separators(self) -> tuple[list[int], list[int]]:
        """The slice and row separators' ids inside running text (as ``MeteorProcessor`` finds them)."""
        tokenizer = self.get_tokenizer()
        meteor = self.serving.meteor
        return separator_ids(tokenizer, meteor.slice_separator), separator_ids(tokenizer, meteor.row_separator)

    @cached_property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """image_mean / image_std: the folder's preprocessor_config.json, else the tower's usual ones."""
        saved = self.ctx.get_hf_image_processor_config() or {}
        siglip = self.get_hf_config().vision_config.model_type.startswith("siglip")
        mean = IMAGENET_STANDARD_MEAN if siglip else OPENAI_CLIP_MEAN
        std = IMAGENET_STANDARD_STD if siglip else OPENAI_CLIP_STD
        return tuple(saved.get("image_mean", mean)), tuple(saved.get("image_std", std))

    def tokens_per_slice(self, mm_kwargs: Mapping[str, object]) -> int | None:
        """K′ for a request: its ``tokens_per_slice``, else the engine's, else the folder's K (None:
        every token). Unknown keys and values the projector cannot keep are refused."""
        merged = self.ctx.get_merged_mm_kwargs(mm_kwargs)
        unknown = sorted(set(merged) - set(PROCESSOR_KWARGS))
        if unknown:
            raise ValueError(f"unknown mm_processor_kwargs {unknown} for LLaVA-Meteor: it reads only "
                             f"{list(PROCESSOR_KWARGS)} (e.g. {{\"tokens_per_slice\": 32}})")
        compressor = self.serving.meteor.compressor
        k = merged.get("tokens_per_slice")
        if k is None:
            return compressor.tokens_per_slice
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"mm_processor_kwargs tokens_per_slice must be a positive number of tokens per "
                             f"view, got {k!r}")
        if compressor.projector == "mlp":
            raise ValueError(f"this model's 'mlp' projector keeps every token and cannot keep "
                             f"tokens_per_slice={k}: leave tokens_per_slice out")
        if compressor.projector == "resampler" and k != compressor.tokens_per_slice:
            raise ValueError(f"this model's resampler makes exactly {compressor.tokens_per_slice} tokens per "
                             f"view, not tokens_per_slice={k}: leave tokens_per_slice out")
        return k

    def check_tokens_per_slice(self, k: int | None, view_grids: Sequence[tuple[int, int]]) -> None:
        """Refuse a K′ that a view of this image cannot give (more tokens than its patches; a count
        that average pooling cannot tile)."""
        if k is None:
            return
        projector = self.serving.meteor.compressor.projector
        for rows, cols in view_grids:
            if k > rows * cols:
                raise ValueError(f"tokens_per_slice={k} is more than a view of this image has ({rows}x{cols} "
                                 f"= {rows * cols} patches): ask for at most {rows * cols}")
            if projector == "avgpool":
                from meteor.model.projectors.baselines import pooled_grid
                pooled_grid((rows, cols), k)

    def plan(self, width: int, height: int):
        serving = self.serving
        return plan_slices(width, height, serving.meteor.max_slices, serving.patch_size, serving.base_size)

    def num_image_tokens(self, width: int, height: int, tokens_per_slice: int | None = None) -> int:
        """The length of a ``width`` x ``height`` image's layout in the prompt (image and separator
        ids), from its size alone; ``tokens_per_slice`` None: the folder's K."""
        plan = self.plan(width, height)
        k = self.serving.meteor.compressor.tokens_per_slice if tokens_per_slice is None else tokens_per_slice
        slice_ids, row_ids = self.separators
        return len(layout_ids(plan.grid, plan.view_patches, KEEP_ALL if k is None else k, 0, slice_ids, row_ids))

    def get_image_size_with_most_features(self) -> ImageSize:
        """An image cut into ``max_slices`` slices of the native size (each view at most
        (base / patch)² patches)."""
        serving = self.serving
        return ImageSize(width=serving.base_size * serving.meteor.max_slices, height=serving.base_size)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        """The most embeddings one image can take whatever K′ a request asks for: every view keeping
        every patch ((max_slices + 1) views of at most (base / patch)² patches)."""
        serving = self.serving
        return {"image": (serving.meteor.max_slices + 1) * serving.max_view_patches}


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
    """Images → ``pixel_values`` (P, 3·p·p), ``view_grids`` (V, 2), ``image_grids`` (I, 2),
    ``tokens_per_slice`` (I,) (``layout.KEEP_ALL`` for every token); prompt → each ``<image>`` id
    replaced by its image's layout."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        info, serving = self.info, self.info.serving
        k = info.tokens_per_slice(hf_kwargs)
        mean, std = info.normalisation
        patches, view_grids, image_grids = [], [], []
        for image in hf_data.get("images", []):
            if isinstance(image, torch.Tensor):   # vLLM hands arrays over as they came; load_image reads HWC
                image = (image.permute(1, 2, 0) if image.dim() == 3 and image.shape[0] in (1, 3, 4) else image).numpy()
            sliced = slice_image(load_image(image), max_slices=serving.meteor.max_slices, image_mean=mean,
                                 image_std=std, patch_size=serving.patch_size, base_size=serving.base_size)
            info.check_tokens_per_slice(k, sliced.plan.view_patches)
            flat, grids = pack_views(sliced.views(), serving.patch_size)
            patches.append(flat)
            view_grids.append(grids)
            image_grids.append(sliced.plan.grid)
        if not patches:
            return BatchFeature({})
        dtype = self.info.ctx.model_config.dtype
        return BatchFeature({
            "pixel_values": torch.cat(patches).to(dtype),
            "view_grids": torch.cat(view_grids),
            "image_grids": torch.tensor(image_grids, dtype=torch.int64),
            "tokens_per_slice": torch.full((len(patches),), KEEP_ALL if k is None else k, dtype=torch.int64),
        })

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
                              ) -> Mapping[str, MultiModalFieldConfig]:
        image_grids = hf_inputs.get("image_grids", torch.empty(0, 2, dtype=torch.int64))
        view_grids = hf_inputs.get("view_grids", torch.empty(0, 2, dtype=torch.int64))
        views_per_image = image_grids.prod(-1) + 1
        patches_per_view = view_grids.prod(-1)
        patches_per_image = torch.stack([part.sum() for part in patches_per_view.split(views_per_image.tolist())]
                                        ) if len(views_per_image) else torch.empty(0, dtype=torch.int64)
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", patches_per_image),
            "view_grids": MultiModalFieldConfig.flat_from_sizes("image", views_per_image),
            "image_grids": MultiModalFieldConfig.batched("image"),
            "tokens_per_slice": MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        image_token_id = self.info.serving.image_token_id
        slice_ids, row_ids = self.info.separators
        items = out_mm_kwargs.get("image", [])

        def replacement(index: int) -> PromptUpdateDetails:
            item = items[index].get_data()
            ids = layout_ids(tuple(item["image_grids"].tolist()), item["view_grids"].tolist(),
                             int(item["tokens_per_slice"]), image_token_id, slice_ids, row_ids)
            return PromptUpdateDetails.select_token_id(ids, image_token_id)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]
