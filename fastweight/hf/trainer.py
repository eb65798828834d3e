"""``FlowTrainer``: a ``transformers.Trainer`` whose loss is fastweight's fused weighted
cross-entropy on the final hidden states and the LM head (the logits are never built).

The batch carries a ``sample_weight`` column (the FLOW weights of ``fastweight score``); the loss
is ``sum_i w_i * (sum of i's token losses) / num_items_in_batch`` (``sample_reduction="token"``)
so gradient accumulation and data parallelism give the same gradient as one big batch.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import Trainer

from fastweight.data import collate
from fastweight.hf.head import causal_lm_loss
from fastweight.training.weights import normalize_weights

__all__ = ["FlowTrainer", "FlowCollator"]

WEIGHT_COLUMN = "sample_weight"


class FlowCollator:
    """Pads ``input_ids`` (pad id), ``labels`` (-100; default: the input_ids) and builds
    ``attention_mask`` with ``fastweight.data.collate``; stacks ``sample_weight`` (default 1.0)
    as fp32."""

    def __init__(self, pad_token_id: int, ignore_index: int = -100):
        self.pad_token_id, self.ignore_index = int(pad_token_id), ignore_index

    def __call__(self, features: list[dict]) -> dict:
        batch = collate(features, self.pad_token_id, ignore_index=self.ignore_index)
        weights = torch.tensor([float(f.get(WEIGHT_COLUMN, 1.0)) for f in features],
                               dtype=torch.float32)
        return {"input_ids": batch["input_ids"], "labels": batch["labels"],
                "attention_mask": batch["attention_mask"], WEIGHT_COLUMN: weights}


@contextlib.contextmanager
def _forward_as(module: torch.nn.Module, fn):
    """Temporarily make ``module.forward`` run ``fn``, so that a wrapper (DDP) calling the module
    runs our loss through its own forward (which DDP needs to synchronise gradients)."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


class FlowTrainer(Trainer):
    """``transformers.Trainer`` with the FLOW-weighted fused loss.

    Extra arguments: ``sample_reduction`` ("token" or "mean"), ``weight_normalization``
    ("none", the paper's weights, or "mean": every weight divided by the mean positive weight of
    ``train_dataset``'s ``sample_weight`` column, so that the average step matches standard
    fine-tuning; rows without a scored token have weight 0 and do not count), and
    ``weighted_ce_options`` (passed to ``weighted_ce``: ``impl``, ``label_smoothing``, ...).
    Without a ``data_collator``, a ``FlowCollator`` is used; the ``sample_weight`` column is
    kept whatever ``remove_unused_columns`` says.
    """

    def __init__(self, *args, sample_reduction: str = "token", weight_normalization: str = "none",
                 weighted_ce_options: dict | None = None, **kwargs):
        if kwargs.get("data_collator") is None:
            tok = kwargs.get("processing_class") or kwargs.get("tokenizer")
            pad = getattr(tok, "pad_token_id", None)
            if pad is None:
                pad = getattr(tok, "eos_token_id", None) or 0
            kwargs["data_collator"] = FlowCollator(pad)
        super().__init__(*args, **kwargs)
        self.sample_reduction = sample_reduction
        self.weight_scale = self._weight_scale(weight_normalization)
        self.weighted_ce_options = dict(weighted_ce_options or {})
        # Ask the Trainer to count num_items_in_batch (over labels[..., 1:]) whatever the model.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True

    def _weight_scale(self, normalization: str) -> float:
        """The factor every batch's weights are multiplied by: 1, or 1 / mean weight."""
        if normalization == "none":
            return 1.0
        dataset = self.train_dataset
        if normalization != "mean" or WEIGHT_COLUMN not in (getattr(dataset, "column_names", None) or ()):
            raise ValueError(f"weight_normalization={normalization!r}: expected 'none', or 'mean' "
                             f"with a train_dataset that has a {WEIGHT_COLUMN!r} column")
        weights = torch.tensor(dataset[WEIGHT_COLUMN], dtype=torch.float64)
        return float(normalize_weights(weights, normalization).sum() / weights.sum())

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if WEIGHT_COLUMN not in self._signature_columns:
            self._signature_columns.append(WEIGHT_COLUMN)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        weights = inputs.pop(WEIGHT_COLUMN, None)
        labels = inputs.pop("labels")
        base = self.accelerator.unwrap_model(model)
        if weights is not None:
            weights = weights.to(device=labels.device, dtype=torch.float32) * self.weight_scale
        num_items = num_items_in_batch
        if torch.is_tensor(num_items):
            num_items = num_items.to(labels.device)
        if self.sample_reduction == "mean" and num_items is not None:
            num_items = None  # the Trainer counts tokens; "mean" normalises by samples itself

        def loss_fn(*_a, **_k):
            return causal_lm_loss(base, inputs["input_ids"], labels, inputs.get("attention_mask"),
                                  weights, num_items=num_items, sample_reduction=self.sample_reduction,
                                  **self.weighted_ce_options)

        if model is base:
            loss = loss_fn()
        else:  # DDP & co.: go through the wrapper's forward
            with _forward_as(base, loss_fn):
                loss = model()
        scaled = num_items is not None
        self.loss_is_scaled_for_ga = scaled
        if scaled and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes
        return (loss, {"loss": loss}) if return_outputs else loss
