"""Serve LLaVA-Meteor folders with vLLM: an out-of-tree model plugin.

Installed with the package (``pip install "llava-meteor[vllm]"``), the entry point ``register`` in the
group ``vllm.general_plugins`` runs in every vLLM process and registers, by name, the model class
``LlavaMeteorForConditionalGeneration`` with vLLM's ``ModelRegistry`` (its module, which also
registers the multimodal processor, is imported only when vLLM loads such a folder), the config's
model_type "llava_meteor" with transformers' ``AutoConfig``, and a tokenizer mode that loads the
folder's tokenizer with the ``<image>`` placeholder added (``tokenizer``), as the package's processor
adds it. A folder saved by
``meteor.pretrained.save_pretrained`` then serves unchanged::

    python -m vllm.entrypoints.openai.api_server --model FOLDER --limit-mm-per-prompt '{"image": 4}' \
        --trust-request-mm-kwargs        # lets requests set K′ (extra_body={"mm_processor_kwargs": ...})

    from vllm import LLM
    llm = LLM(model=FOLDER)
    llm.generate({"prompt": processor.apply_chat_template(messages, add_generation_prompt=True),
                  "multi_modal_data": {"image": pil_image},
                  "mm_processor_kwargs": {"tokens_per_slice": 32}})     # K′ for this request

A folder the plugin cannot serve is refused when vLLM reads its config, before any process starts,
with the reason (``config.UnservableFolder``). Modules: ``config`` (what is read from config.json, what
is refused and why), ``processing`` (vLLM's multimodal processor around the folder's
``LlavaMeteorProcessor``), ``model`` (the vLLM model).
"""

from __future__ import annotations

from meteor.adapters.vllm.config import ARCHITECTURE, register_config, serving_config

MODEL_CLASS = f"meteor.adapters.vllm.model:{ARCHITECTURE}"
TOKENIZER_MODE = "llava_meteor"
"""vLLM's tokenizer mode the plugin registers (``tokenizer.MeteorTokenizer``) and selects for the
folders it serves: the folder's tokenizer with the image placeholder the processor adds."""


def register() -> None:
    """The ``vllm.general_plugins`` entry point; safe to call more than once."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    class CheckServable(VerifyAndUpdateConfig):
        """vLLM's per-architecture check of the model config, run where the engine's configuration
        is made (before any process starts): a folder the plugin cannot serve is refused there, with
        the reason in the exception the user gets (``config.UnservableFolder``)."""

        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            serving_config(model_config.hf_config)
            if model_config.tokenizer_mode in ("auto", "hf"):
                model_config.tokenizer_mode = TOKENIZER_MODE       # the folder's tokenizer with <image>

    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    register_config()
    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(TOKENIZER_MODE, "meteor.adapters.vllm.tokenizer", "MeteorTokenizer")
    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:       # prompts rendered as the hf mode renders them
        RENDERER_REGISTRY.register(TOKENIZER_MODE, "vllm.renderers.hf", "HfRenderer")
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    MODELS_CONFIG_MAP[ARCHITECTURE] = CheckServable


__all__ = ["ARCHITECTURE", "MODEL_CLASS", "register"]
