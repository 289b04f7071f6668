"""LLaVA-Meteor and the tools around it: LLaVA / llava-hf checkpoints (``llava``), lmms-eval
(``lmms_eval``).
``qwen_vl``: training-free Visual-Native Selection for transformers' Qwen2.5-VL / Qwen3-VL (``meteor.compress``).
"""
