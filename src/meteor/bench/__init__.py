"""Measurements: the cost model (``cost``) that predicts each stage's time from FLOPs and bytes."""
