"""Adapters that let other evaluation harnesses run LLaVA-Meteor models (``lmms_eval``: lmms-eval)."""
