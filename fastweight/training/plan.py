"""The data plan: which rows form each micro-batch of each optimizer step.

Rows are grouped into micro-batches under a token budget (``--batch-tokens`` per micro-batch,
padding included), shuffled with ``seed + epoch``. An optimizer step takes
``world_size * grad_accum`` consecutive micro-batches; micro-batch ``j`` of a step goes to rank
``j % world_size``. So one process with ``--grad-accum 2`` and two processes with
``--grad-accum 1`` see the same data in the same steps. The plan is a pure function of
(data, seed, epoch), which is what ``--resume`` relies on: a checkpoint stores the optimizer
step, and the data position follows from it.
"""
from __future__ import annotations

import math

import torch

from fastweight import data

__all__ = ["DataPlan", "load_tokenized", "to_device", "count_items", "few_steps_warning",
           "FEW_STEPS"]

FEW_STEPS = 10  # fewer optimizer steps than this is worth a warning


def load_tokenized(path: str, tokenizer, config, fmt: str, flag: str = "--data"):
    """(rows, tokenized rows, number truncated) of a data file, with ``config``'s field and
    length options and the row layout ``fmt``."""
    rows = data.load_rows(path)
    options = {**data.format_options(config), "fmt": fmt}
    tokenized, num_truncated = data.tokenize_rows(rows, tokenizer, **options,
                                                  source=f"{flag} {path}")
    return rows, tokenized, num_truncated


def micro_batches(tokenized, token_budget: int, *, shuffle: bool, seed: int) -> list[list[int]]:
    """Row positions of each padded micro-batch under ``token_budget``."""
    return [list(map(int, batch)) for batch in
            data.make_batches(tokenized, token_budget, pack=False, shuffle=shuffle, seed=seed)]


def to_device(tokenized, positions: list[int], pad_id: int, device) -> dict:
    """The padded batch of the rows at ``positions``, on ``device``."""
    batch = data.collate([tokenized[i] for i in positions], pad_id, pack=False)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def count_items(labels: torch.Tensor, sample_reduction: str) -> int:
    """The loss's divisor for these labels: scored (shifted) tokens, or for
    ``sample_reduction="mean"`` the samples with at least one scored token."""
    valid = labels[:, 1:] != data.IGNORE_INDEX
    if sample_reduction == "mean":
        return int(valid.any(dim=1).sum())
    return int(valid.sum())


class DataPlan:
    """The micro-batches of each optimizer step, a pure function of (data, seed, epoch)."""

    def __init__(self, tokenized, token_budget: int, group: int, seed: int):
        self.tokenized, self.token_budget, self.group, self.seed = tokenized, token_budget, group, seed
        self._epoch, self._batches = None, None
        self.batches_per_epoch = len(self._epoch_batches(0))
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / group))

    def total_steps(self, epochs: float, steps: int | None) -> int:
        """``steps`` if given, else enough steps for ``epochs`` passes (at least one)."""
        return steps if steps is not None else max(1, math.ceil(epochs * self.steps_per_epoch))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch != epoch:
            self._batches = micro_batches(self.tokenized, self.token_budget, shuffle=True,
                                          seed=self.seed + epoch)
            self._epoch = epoch
        return self._batches

    def step(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, the ``group`` micro-batches) of optimizer step ``step`` (from 0)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        batches = self._epoch_batches(epoch)
        chunk = batches[k * self.group:(k + 1) * self.group]
        i = 0
        while len(chunk) < self.group:  # last step of an epoch: wrap around, as DistributedSampler pads
            chunk.append(batches[i % len(batches)])
            i += 1
        return epoch, chunk


def few_steps_warning(plan: DataPlan, total_steps: int, config, world_size: int) -> str | None:
    """A warning when the run has fewer than ``FEW_STEPS`` optimizer steps, with the numbers
    and the flags that change them; None otherwise."""
    if total_steps >= FEW_STEPS:
        return None
    how = (f"--steps {config.steps}" if config.steps is not None else
           f"--epochs {config.epochs:g} x {plan.steps_per_epoch} step(s) per epoch")
    return (f"warning: only {total_steps} optimizer step(s): {len(plan.tokenized)} rows make "
            f"{plan.batches_per_epoch} micro-batch(es) of --batch-tokens {config.batch_tokens}, "
            f"{plan.group} per step (world size {world_size} x --grad-accum {config.grad_accum}), "
            f"{how}. For at least {FEW_STEPS} steps raise --epochs or --steps, or lower "
            "--batch-tokens.")
