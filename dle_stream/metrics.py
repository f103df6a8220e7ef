"""Moved to :mod:`dle_stream.evaluation.metrics`; this name stays only for
``training/trainer.py``'s import until that file moves to the new one (remove then)."""
from dle_stream.evaluation.metrics import json_safe, prior_baseline, summarize

__all__ = ["json_safe", "prior_baseline", "summarize"]
