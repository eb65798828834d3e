"""Hugging Face ``transformers`` integration: the LM head, hidden states without logits, the
weighted causal-LM loss, per-sample scoring losses. ``FlowTrainer`` is imported lazily from
``fastweight.hf.trainer``."""
from __future__ import annotations

import importlib

from fastweight.hf.head import (LMHead, causal_lm_loss, check_head, find_lm_head, hidden_states,
                                model_hash, sample_losses)

__all__ = ["LMHead", "find_lm_head", "hidden_states", "causal_lm_loss", "sample_losses",
           "model_hash", "check_head"]  # FlowTrainer: lazy, see __getattr__

_LAZY = {"FlowTrainer": "fastweight.hf.trainer"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastweight.hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
