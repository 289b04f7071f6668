"""Serve LLaVA-Meteor folders with vLLM: an out-of-tree model plugin.

Installed with the package (``pip install "llava-meteor[vllm]"``), the entry point ``register`` in the
group ``vllm.general_plugins`` runs in every vLLM process and registers, by name, the model class
``LlavaMeteorForConditionalGeneration`` with vLLM's ``ModelRegistry`` (its module, which also
registers the multimodal processor, is imported only when vLLM loads such a folder) and the config's
model_type "llava_meteor" with transformers' ``AutoConfig``. A saved folder then serves unchanged::

    python -m vllm.entrypoints.openai.api_server --model FOLDER --limit-mm-per-prompt '{"image": 4}'

    from vllm import LLM
    llm = LLM(model=FOLDER)
    llm.generate({"prompt": "USER: <image>\\nWhat is this? ASSISTANT:",
                  "multi_modal_data": {"image": pil_image},
                  "mm_processor_kwargs": {"tokens_per_slice": 32}})     # K′ for this request

Modules: ``config`` (what is read from config.json, what is refused and why), ``layout`` (the tensors
between processor and model, each image's ids in the prompt), ``processing`` (vLLM's multimodal
processor), ``model`` (the vLLM model).
"""

from __future__ import annotations

from meteor.adapters.vllm.config import ARCHITECTURE, register_config

MODEL_CLASS = f"meteor.adapters.vllm.model:{ARCHITECTURE}"


def register() -> None:
    """The ``vllm.general_plugins`` entry point; safe to call more than once."""
    from vllm import ModelRegistry

    register_config()
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


__all__ = ["ARCHITECTURE", "MODEL_CLASS", "register"]
