"""LLaVA-Meteor and the tools around it.

- ``llava``: LLaVA / llava-hf checkpoints in (``from_llava``, ``meteor convert``) and components out.
- ``qwen_vl``: training-free Visual-Native Selection for transformers' Qwen2.5-VL / Qwen3-VL
  (``meteor.compress``), and ``meteor explain`` on them.
- ``vllm``: the vLLM plugin (an entry point of ``vllm.general_plugins``).
- ``lmms_eval``: the lmms-eval model ``llava_meteor``.
- ``pretrained``: the package registry's real pretrained weights as Hugging Face folders (``meteor weights --real``).
- ``legacy``: the model class of 0.1, a deprecated alias.
"""
