"""LLaVA-Meteor as a vLLM model: the package's vision tower and Top-Down Compression make each image's
embeddings, and vLLM's own implementation of the language model (LLaMA, Qwen2, ... as
``text_config.architectures`` names it) reads them, with vLLM's paged attention and KV cache.

The tower is transformers' model for ``vision_config`` (``AutoModel.from_config``: CLIPVisionModel,
SiglipVisionModel, Dinov2Model or Dinov2WithRegistersModel) read through ``meteor.model.vision.VisionTower``, which runs it to the feature
layer and computes the visual expert's scores; the compressor is ``build_projector`` of the folder's
``CompressorConfig``: the same modules as the transformers class. They are plain torch modules, so
they are not sharded across tensor-parallel ranks (each rank would hold a copy; not tested yet).
Weights load from the folder's names (the transformers class's, llava-hf's layout) through
``hf_to_vllm_mapper``. transformers 5 writes a DINOv2's weights under their original names
(``attention.attention.query``, ``attention.output.dense``; a SwiGLU MLP's ``weights_in`` holding
the gate and up projections stacked, ``weights_out``) and renames them when it loads; the mapper and
``load_weights`` rename them the same way for the modules built here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import (AutoWeightsLoader, WeightsMapper, init_vllm_registered_model,
                                              maybe_prefix)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from meteor.adapters.vllm.config import CHAT_PLACEHOLDER, serving_config, text_architectures
from meteor.adapters.vllm.processing import (KEEP_ALL, MeteorDummyInputsBuilder, MeteorMultiModalProcessor,
                                             MeteorProcessingInfo)
from meteor.model.modeling import split_views
from meteor.model.projectors import build_projector
from meteor.model.vision import VisionTower


@MULTIMODAL_REGISTRY.register_processor(MeteorMultiModalProcessor, info=MeteorProcessingInfo,
                                        dummy_inputs=MeteorDummyInputsBuilder)
class LlavaMeteorForConditionalGeneration(nn.Module, SupportsMultiModal):
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "model.language_model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
        # CLIP / SigLIP vision models saved before transformers 5 nest their weights in "vision_model."
        "model.vision_tower.vision_model.": "model.vision_tower.",
        # VisionTower keeps the transformers encoder as its attribute ``clip``
        "model.vision_tower.": "vision_tower.clip.",
        "model.multi_modal_projector.": "multi_modal_projector.",
    }, orig_to_new_substr={
        # DINOv2 as transformers 5 saves it (its conversion mapping for Dinov2Model, reversed on save)
        ".attention.attention.query.": ".attention.q_proj.",
        ".attention.attention.key.": ".attention.k_proj.",
        ".attention.attention.value.": ".attention.v_proj.",
        ".attention.output.dense.": ".attention.o_proj.",
        ".mlp.weights_out.": ".mlp.down_proj.",
    })

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return CHAT_PLACEHOLDER
        raise ValueError(f"LLaVA-Meteor reads images only, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        from transformers import AutoModel

        config = vllm_config.model_config.hf_config
        self.serving = serving = serving_config(config)
        meteor = serving.meteor
        self.config = config
        self.embedding_dtype = vllm_config.model_config.dtype
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size,
                                         mm_token_ids=[serving.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            encoder = AutoModel.from_config(config.vision_config, attn_implementation="sdpa")
            self.vision_tower = VisionTower(encoder, meteor.feature_layer, meteor.attention_layer,
                                            visual_expert=meteor.visual_expert)
            self.multi_modal_projector = build_projector(meteor.compressor)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config,
                architectures=text_architectures(config.text_config),
                prefix=maybe_prefix(prefix, "language_model"))
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # ------------------------------------------------------------------------------ images

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Each image's visual tokens in LLM order, (tokens, D): views of one size and one K′ run as
        one batch through the tower and the compressor."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        patches = _cat(pixel_values)
        view_grids = _cat(kwargs["view_grids"]).reshape(-1, 2).cpu()
        image_grids = _stack(kwargs["image_grids"]).reshape(-1, 2).cpu()
        budgets = _stack(kwargs["tokens_per_slice"]).reshape(-1).cpu().tolist()
        views = split_views(patches, view_grids, self.serving.patch_size)
        owners = []   # (image, K′) of each view, in order
        for image, ((rows, cols), k) in enumerate(zip(image_grids.tolist(), budgets)):
            owners += [(image, None if k == KEEP_ALL else int(k))] * (rows * cols + 1)
        if len(owners) != len(views):
            raise ValueError(f"the image grids give {len(owners)} views but {len(views)} were sent")
        groups: dict[tuple, list[int]] = {}
        for position, (view, (_, k)) in enumerate(zip(views, owners)):
            groups.setdefault((*view.shape[-2:], k), []).append(position)
        tower_dtype = self.vision_tower.dtype
        per_view: list[torch.Tensor | None] = [None] * len(views)
        for (_, _, k), positions in groups.items():
            encoded = self.vision_tower(torch.stack([views[p] for p in positions]).to(tower_dtype))
            out = self.multi_modal_projector(encoded.patch_tokens, encoded.cls_attention, encoded.grid,
                                             None, k)
            for row, position in enumerate(positions):
                per_view[position] = out.tokens[row]
        per_image: list[list[torch.Tensor]] = [[] for _ in budgets]
        for (image, _), tokens in zip(owners, per_view):
            per_image[image].append(tokens)
        return tuple(torch.cat(parts).to(self.embedding_dtype) for parts in per_image)

    # ------------------------------------------------------------------------------ language model

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(split_swiglu(weights), mapper=self.hf_to_vllm_mapper)


def split_swiglu(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    """A DINOv2 SwiGLU MLP's stacked ``mlp.weights_in`` (gate rows, then up rows) as transformers
    loads it: ``mlp.gate_proj`` and ``mlp.up_proj``. Every other weight passes unchanged."""
    for name, tensor in weights:
        if ".mlp.weights_in." in name:
            gate, up = tensor.chunk(2, dim=0)
            yield name.replace(".mlp.weights_in.", ".mlp.gate_proj."), gate
            yield name.replace(".mlp.weights_in.", ".mlp.up_proj."), up
        else:
            yield name, tensor


def _cat(value) -> torch.Tensor:
    """A flat field as one tensor (vLLM concatenates items' rows when their shapes allow, else lists)."""
    return value if isinstance(value, torch.Tensor) else torch.cat([torch.as_tensor(v) for v in value])


def _stack(value) -> torch.Tensor:
    """A batched field as one tensor, one row per image."""
    return value if isinstance(value, torch.Tensor) else torch.stack([torch.as_tensor(v) for v in value])
