"""LLaVA-Meteor and the tools around it: LLaVA / llava-hf checkpoints (``llava``), lmms-eval
(``lmms_eval``)."""
