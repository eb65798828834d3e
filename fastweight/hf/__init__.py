"""Hugging Face ``transformers`` integration: the LM head, hidden states without logits, the
weighted causal-LM loss, per-sample scoring losses. ``FlowTrainer`` is imported lazily from
``fastweight.hf.trainer``."""
from __future__ import annotations

from fastweight.hf.head import (HeadInputs, LMHead, causal_lm_loss, check_head, find_lm_head,
                                head_inputs, hidden_states, is_peft_model, model_hash,
                                sample_losses, unwrap_peft)

from fastweight.lazy import lazy_attributes

__all__ = ["LMHead", "HeadInputs", "find_lm_head", "hidden_states", "head_inputs", "causal_lm_loss",
           "sample_losses", "model_hash", "check_head", "is_peft_model",
           "unwrap_peft"]  # FlowTrainer: lazy, see __getattr__

_LAZY = {"FlowTrainer": "fastweight.hf.trainer"}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
