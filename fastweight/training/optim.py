"""AdamW parameter groups and the warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["make_optimizer", "warmup_steps"]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases or other vectors."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        vector_like = param.dim() < 2 or "norm" in name.lower() or name.endswith(".bias")
        (no_decay if vector_like else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``--warmup`` below 1 is a fraction of the steps, from 1 on a number of steps."""
    return int(warmup * total_steps) if warmup < 1 else int(warmup)


def _lr_factor(total_steps: int, warmup: int, min_lr_ratio: float):
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def make_optimizer(model: nn.Module, config, total_steps: int):
    """(AdamW, LambdaLR) for ``config``'s lr, betas, weight decay, warm-up and cosine floor."""
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=tuple(config.betas))
    schedule = _lr_factor(total_steps, warmup_steps(config.warmup, total_steps), config.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
