"""The functional entry points: validate, flatten, build the coefficients, call the ops.

The backend of each op is chosen inside the op (:mod:`fastweight.backends`), so these functions
trace under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastweight import backends, layout
from fastweight import validation
from fastweight.aggregation import SAMPLE_REDUCTIONS
from fastweight.aggregation import ops as aggregation_ops
from fastweight.linear_ce import ops as linear_ce_ops

REDUCTIONS = ("mean", "sum", "none", "sequence")


class WeightedCEOutput(NamedTuple):
    """What ``weighted_ce`` returns when ``return_lse`` or ``return_accuracy`` is set.

    ``lse`` and ``accuracy`` are per token, shaped like labels and indexed by input position
    (as ``reduction="none"``); None unless asked for. Neither carries a gradient.
    """
    loss: Tensor                 # as the reduction gives it
    lse: Tensor | None           # fp32 (fp64 for fp64 input) log-sum-exp of the (capped) logits, 0 where ignored
    accuracy: Tensor | None      # bool: the argmax is the label; False where ignored


def _check(hidden, weight, labels, sample_weights, token_weights, bias, cu_seqlens, softcap,
           label_smoothing, ignore_index, sample_reduction, reduction, num_items, impl, chunk_bytes,
           z_loss) -> None:
    """Every check that reads only metadata."""
    validation.float_tensor("hidden", hidden)
    validation.float_tensor("weight", weight)
    validation.int_tensor("labels", labels)
    validation.choice("reduction", reduction, REDUCTIONS)
    validation.choice("sample_reduction", sample_reduction, SAMPLE_REDUCTIONS)
    validation.choice("impl", impl, backends.names("linear_ce"))
    validation.options(softcap, label_smoothing, ignore_index, num_items)
    if not (isinstance(z_loss, (int, float)) and not isinstance(z_loss, bool) and z_loss >= 0):
        raise ValueError(f"`z_loss` must be a non-negative number, got {z_loss!r}")
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)
                                    or chunk_bytes <= 0):
        raise ValueError(f"`chunk_bytes` must be None or a positive int, got {chunk_bytes!r}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"`hidden` must be (B, T, D) or (N, D), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"`weight` must be (V, D) with D={hidden.shape[-1]} (hidden's last dim), "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"`weight` dtype {weight.dtype} differs from `hidden` dtype {hidden.dtype}")
    validation.same_device("weight", weight, hidden)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"`labels` must have shape {tuple(hidden.shape[:-1])} (hidden without its "
                         f"last dim), got {tuple(labels.shape)}")
    validation.same_device("labels", labels, hidden)
    if bias is not None:
        validation.float_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"`bias` must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"`bias` dtype {bias.dtype} differs from `hidden` dtype {hidden.dtype}")
        validation.same_device("bias", bias, hidden)
    if cu_seqlens is not None:
        validation.int_tensor("cu_seqlens", cu_seqlens)
        if hidden.dim() != 2:
            raise ValueError("`cu_seqlens` goes with packed (N, D) hidden, but hidden is "
                             f"{tuple(hidden.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"`cu_seqlens` must be 1-D (B+1,), got shape {tuple(cu_seqlens.shape)}")
        validation.same_device("cu_seqlens", cu_seqlens, hidden)
    num_samples = (hidden.shape[0] if hidden.dim() == 3 else
                   cu_seqlens.numel() - 1 if cu_seqlens is not None else 1)
    if sample_weights is not None:
        validation.float_tensor("sample_weights", sample_weights)
        if sample_weights.shape != (num_samples,):
            raise ValueError(f"`sample_weights` must have one weight per sample, shape ({num_samples},),"
                             f" got {tuple(sample_weights.shape)}")
        validation.same_device("sample_weights", sample_weights, hidden)
    if token_weights is not None:
        validation.float_tensor("token_weights", token_weights)
        if token_weights.shape != labels.shape:
            raise ValueError(f"`token_weights` must be shaped like labels {tuple(labels.shape)}, "
                             f"got {tuple(token_weights.shape)}")
        validation.same_device("token_weights", token_weights, hidden)
    if reduction in ("none", "sequence"):
        for name, value in (("sample_weights", sample_weights), ("token_weights", token_weights),
                            ("num_items", num_items)):
            if value is not None:
                raise ValueError(f"`{name}` must be None with reduction={reduction!r}: "
                                 "per-token and per-sequence losses are unweighted")


def weighted_ce(hidden: Tensor, weight: Tensor, labels: Tensor, sample_weights: Tensor | None = None, *,
                token_weights: Tensor | None = None, bias: Tensor | None = None,
                cu_seqlens: Tensor | None = None, shift: bool = False, ignore_index: int = -100,
                softcap: float | None = None, label_smoothing: float = 0.0,
                sample_reduction: str = "token", reduction: str = "mean", num_items=None,
                impl: str = "auto", chunk_bytes: int | None = None, z_loss: float = 0.0,
                return_lse: bool = False, return_accuracy: bool = False) -> Tensor | WeightedCEOutput:
    """Weighted cross-entropy of ``hidden @ weight.T (+ bias)`` without the full logits.

    Args:
        hidden: (B, T, D) rows, or packed (N, D) with ``cu_seqlens``; fp16, bf16, fp32 or fp64.
        weight: (V, D) LM-head weight, hidden's dtype. bias: (V,) of hidden's dtype, or None.
        labels: (B, T) or (N,) integer classes; ``ignore_index`` marks tokens that do not count.
        sample_weights: (B,) per-sample weights w (e.g. ``flow_weights``), constants.
        token_weights: per-token weights u shaped like labels, constants.
        cu_seqlens: (B+1,) integer offsets of packed samples (flash-attention convention).
        shift: token t predicts label t+1 of its own sequence (causal LM); labels and token
            weights shift together, the last token of each sequence has no target.
        softcap: logits become softcap * tanh(logits / softcap). label_smoothing: in [0, 1).
        sample_reduction: "token" (c_t = w_s u_t) or "mean" (c_t = w_s u_t / n_s).
        reduction: "mean" | "sum" | "none" (per-token, labels' shape, 0 where ignored) |
            "sequence" (per-sample mean valid-token loss, (B,)).
        num_items: divisor of "mean" (global valid-token or sample count, HF convention); a
            positive number or scalar tensor, divided by exactly.
        impl: "auto" | "triton" | "torch" | "reference" (``FASTWEIGHT_IMPL`` overrides "auto").
        chunk_bytes: working-memory budget for the logits blocks, honoured by every backend
            that chunks: default ``FASTWEIGHT_CHUNK_BYTES``, else 1008 MiB (Triton) or the larger
            of 64 MiB and V*D*2 bytes (torch). impl="reference" cannot honour it and raises.
        z_loss: adds z_loss * lse^2 to each counted token's loss (PaLM's z-loss), weighted and
            reduced like the cross-entropy.
        return_lse, return_accuracy: also return the per-token log-sum-exp and whether the
            argmax is the label (no gradient), as a :class:`WeightedCEOutput`.

    Returns:
        A scalar for mean/sum, else per-token or per-sample losses; fp32 (fp64 for fp64 input).
        A :class:`WeightedCEOutput` (loss, lse, accuracy) with ``return_lse``/``return_accuracy``.
        Gradients flow to hidden, weight and bias in their own dtypes, and only to those that
        require them (a frozen head costs no dW).

    Bad labels: in eager mode with the value checks on, a label outside [0, V) that is not
    ``ignore_index`` raises ValueError. Under torch.compile, or with the checks off, it gives a
    NaN loss for that token (so a NaN mean), with no host sync; no backend reads outside a row.
    """
    _check(hidden, weight, labels, sample_weights, token_weights, bias, cu_seqlens, softcap,
           label_smoothing, ignore_index, sample_reduction, reduction, num_items, impl, chunk_bytes, z_loss)
    vocab = weight.shape[0]
    validation.check_values(labels, vocab, ignore_index, cu_seqlens, labels.numel(),
                           {"sample_weights": sample_weights, "token_weights": token_weights}, num_items)
    flat = layout.flatten(hidden, labels, cu_seqlens, token_weights, shift, ignore_index, vocab)
    # The op schemas take plain numbers: 0 means "not set".
    options = (float(softcap) if softcap is not None else 0.0, float(label_smoothing), float(z_loss), impl,
               chunk_bytes or 0, bool(return_accuracy))

    def result(loss: Tensor, lse: Tensor, hits: Tensor) -> Tensor | WeightedCEOutput:
        if not (return_lse or return_accuracy):
            return loss
        return WeightedCEOutput(loss, lse.view(flat.shape) if return_lse else None,
                                hits.view(flat.shape) if return_accuracy else None)

    if reduction in ("mean", "sum"):
        coeff = aggregation_ops.normalised_coefficients(
            flat.valid, flat.cu_seqlens,
            None if sample_weights is None else sample_weights.detach(),
            None if flat.token_weights is None else flat.token_weights.detach(),
            sample_reduction, reduction, num_items,
            dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        needs = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias)]
        total, lse, hits, *_ = linear_ce_ops.linear_ce_reduced(flat.x, weight, bias, flat.targets, coeff,
                                                                *options, *needs)
        return result(total, lse, hits)

    per_token, lse, hits = linear_ce_ops.linear_ce_tokens(flat.x, weight, bias, flat.targets, *options)
    if reduction == "none":
        return result(per_token.view(flat.shape), lse, hits)
    return result(aggregation_ops.segment_mean(per_token, flat.cu_seqlens, flat.valid)[0], lse, hits)


def sequence_losses(hidden: Tensor, weight: Tensor, labels: Tensor, **options) -> Tensor:
    """Per-sample mean valid-token loss f_i, (B,) fp32: ``weighted_ce(..., reduction="sequence")``.

    The scoring pass of FLOW. Under ``torch.no_grad()`` it runs forward only and keeps no
    gradient state. ``options`` are those of :func:`weighted_ce`; an unknown one raises.
    """
    if options.get("reduction", "sequence") != "sequence":
        raise ValueError(f"sequence_losses always uses reduction='sequence', got {options['reduction']!r}")
    options["reduction"] = "sequence"
    return weighted_ce(hidden, weight, labels, **options)
