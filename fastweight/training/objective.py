"""The training objective and the evaluation loss, both from hidden states and the LM head
through fastweight's fused loss (the (N, V) logits are never built):

    loss = sum_i w_i * (sum of i's response-token losses) / num_items      (sample_reduction="token")
    loss = sum_i w_i * f_i / num_items                                     (sample_reduction="mean")

``num_items`` is the global count (scored tokens, or samples with a scored token for "mean") over
every micro-batch of the optimizer step and every rank, so the loss and its gradient do not
depend on how a step is split into micro-batches or processes.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from fastweight.runtime import Distributed
from fastweight.training.plan import count_items, micro_batches, to_device

__all__ = ["LossModule", "evaluate_loss", "autocast"]


class LossModule(nn.Module):
    """Wraps the model so that DDP sees the loss computation as its forward (the forward must
    go through the wrapper for DDP to synchronise gradients).

    ``forward`` returns ``(loss, unweighted_sum)``: the weighted objective, and (when asked for)
    the sum of the batch's per-token losses without weights, for logging a loss that standard
    and FLOW runs share. Its cost: with no weights and ``sample_reduction="token"`` it is the
    loss itself times the token count, free. Otherwise it is one extra forward-only pass of the
    LM head (``sequence_losses`` under no_grad, about a third of the head's training flops) on
    the hidden states already computed: the transformer body does not run again. A weighted
    scalar loss cannot give it for free, as the fused kernel reduces the per-token losses
    inside.
    """

    def __init__(self, model: nn.Module, sample_reduction: str, impl: str):
        super().__init__()
        self.model = model
        self.sample_reduction = sample_reduction
        self.impl = impl

    def forward(self, input_ids, labels, attention_mask=None, sample_weights=None, num_items=None,
                unweighted: bool = False):
        from fastweight import sequence_losses, weighted_ce
        from fastweight.hf import head_inputs

        inputs = head_inputs(self.model, input_ids, labels, attention_mask)
        loss = weighted_ce(inputs.hidden, inputs.weight, inputs.labels, sample_weights,
                           sample_reduction=self.sample_reduction, num_items=num_items,
                           impl=self.impl, **inputs.loss_options())
        if not unweighted:
            return loss, None
        if sample_weights is None and self.sample_reduction == "token":
            return loss, loss.detach().double() * num_items
        with torch.no_grad():
            per_sample = sequence_losses(inputs.hidden, inputs.weight, inputs.labels,
                                         impl=self.impl, **inputs.loss_options())
            tokens = (labels[:, 1:] != -100).sum(dim=1)
            return loss, (per_sample.double() * tokens).sum()


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked for; nothing otherwise."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(model, tokenized, pad_id: int, *, batch_tokens: int = 8192, device=None,
                  bf16: bool = False, distributed: Distributed | None = None,
                  impl: str = "auto") -> float:
    """Mean loss per scored (label != -100) token of ``model`` over ``tokenized``, unweighted;
    sharded over ranks and all-reduced under torch.distributed."""
    from fastweight.hf import causal_lm_loss

    distributed = distributed or Distributed()
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    batches = micro_batches(tokenized, batch_tokens, shuffle=False, seed=0)
    for positions in batches[distributed.rank::distributed.world_size]:
        batch = to_device(tokenized, positions, pad_id, device)
        with autocast(device, bf16):
            loss_sum = causal_lm_loss(model, batch["input_ids"], batch["labels"],
                                      batch.get("attention_mask"), reduction="sum", impl=impl)
        totals[0] += loss_sum.double()
        totals[1] += count_items(batch["labels"], "token")
    distributed.all_reduce_sum(totals)
    model.train(was_training)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
