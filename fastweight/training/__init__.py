"""``fastweight train``, the bundled minimal FLOW fine-tuning loop.

    from fastweight.training import TrainConfig, train
    summary = train(TrainConfig(model="path", data="train.jsonl", scores="scores.safetensors",
                                out="run/"))

Modules: ``config`` (TrainConfig and the CLI flags), ``loop`` (train), ``objective`` (the loss
and the eval loss), ``plan`` (which rows each step sees), ``weights`` (FLOW weights from a scores
file), ``optim``, ``checkpoint``, ``metrics`` (metrics.jsonl, summary, curves.png).

``TrainConfig`` is imported eagerly (it needs no torch, so the CLI parser stays fast); the rest
on first use.
"""
from __future__ import annotations

from fastweight.lazy import lazy_attributes

from fastweight.training.config import TrainConfig

_LAZY = {
    "train": "fastweight.training.loop",
    "evaluate_loss": "fastweight.training.objective",
    "load_flow_weights": "fastweight.training.weights",
    "normalize_weights": "fastweight.training.weights",
    "latest_checkpoint": "fastweight.training.checkpoint",
    "plot_metrics": "fastweight.training.metrics",
}

__all__ = ["TrainConfig", *_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
