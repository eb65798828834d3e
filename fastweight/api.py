"""The functional entry points: validate, flatten, build the coefficients, dispatch."""
from __future__ import annotations

import torch
from torch import Tensor

from fastweight import _layout, _validate, aggregation, dispatch, linear_ce_reference, ops

REDUCTIONS = ("mean", "sum", "none", "sequence")


def _check(hidden, weight, labels, sample_weights, token_weights, bias, cu_seqlens, softcap,
           label_smoothing, ignore_index, sample_reduction, reduction, num_items) -> None:
    """Every check that reads only metadata."""
    _validate.float_tensor("hidden", hidden)
    _validate.float_tensor("weight", weight)
    _validate.int_tensor("labels", labels)
    _validate.choice("reduction", reduction, REDUCTIONS)
    _validate.choice("sample_reduction", sample_reduction, aggregation.SAMPLE_REDUCTIONS)
    _validate.options(softcap, label_smoothing, ignore_index, num_items)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"`hidden` must be (B, T, D) or (N, D), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"`weight` must be (V, D) with D={hidden.shape[-1]} (hidden's last dim), "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"`weight` dtype {weight.dtype} differs from `hidden` dtype {hidden.dtype}")
    _validate.same_device("weight", weight, hidden)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"`labels` must have shape {tuple(hidden.shape[:-1])} (hidden without its "
                         f"last dim), got {tuple(labels.shape)}")
    _validate.same_device("labels", labels, hidden)
    if bias is not None:
        _validate.float_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"`bias` must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        _validate.same_device("bias", bias, hidden)
    if cu_seqlens is not None:
        _validate.int_tensor("cu_seqlens", cu_seqlens)
        if hidden.dim() != 2:
            raise ValueError("`cu_seqlens` goes with packed (N, D) hidden, but hidden is "
                             f"{tuple(hidden.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"`cu_seqlens` must be 1-D (B+1,), got shape {tuple(cu_seqlens.shape)}")
        _validate.same_device("cu_seqlens", cu_seqlens, hidden)
    num_samples = (hidden.shape[0] if hidden.dim() == 3 else
                   cu_seqlens.numel() - 1 if cu_seqlens is not None else 1)
    if sample_weights is not None:
        _validate.float_tensor("sample_weights", sample_weights)
        if sample_weights.shape != (num_samples,):
            raise ValueError(f"`sample_weights` must have one weight per sample, shape ({num_samples},),"
                             f" got {tuple(sample_weights.shape)}")
        _validate.same_device("sample_weights", sample_weights, hidden)
    if token_weights is not None:
        _validate.float_tensor("token_weights", token_weights)
        if token_weights.shape != labels.shape:
            raise ValueError(f"`token_weights` must be shaped like labels {tuple(labels.shape)}, "
                             f"got {tuple(token_weights.shape)}")
        _validate.same_device("token_weights", token_weights, hidden)
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
                impl: str = "auto", chunk_bytes: int | None = None) -> Tensor:
    """Weighted cross-entropy of ``hidden @ weight.T (+ bias)`` without the full logits.

    Args:
        hidden: (B, T, D) rows, or packed (N, D) with ``cu_seqlens``; fp16, bf16, fp32 or fp64.
        weight: (V, D) LM-head weight, hidden's dtype. bias: (V,) or None.
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
        num_items: divisor of "mean" (global valid-token or sample count, HF convention).
        impl: "auto" | "triton" | "torch" | "reference". chunk_bytes: working-memory budget of
            the chunked PyTorch path (default ``FASTWEIGHT_CHUNK_BYTES`` or 64 MiB).

    Returns:
        A scalar for mean/sum, else per-token or per-sample losses; fp32 (fp64 for fp64 input).
        Gradients flow to hidden, weight and bias in their own dtypes.
    """
    _check(hidden, weight, labels, sample_weights, token_weights, bias, cu_seqlens, softcap,
           label_smoothing, ignore_index, sample_reduction, reduction, num_items)
    vocab = weight.shape[0]
    _validate.check_values(labels, vocab, ignore_index, cu_seqlens, labels.numel(),
                           {"sample_weights": sample_weights, "token_weights": token_weights})
    flat = _layout.flatten(hidden, labels, cu_seqlens, token_weights, shift, ignore_index)
    name, _ = dispatch.resolve_linear_ce(impl, hidden.device)
    cap = float(softcap) if softcap is not None else 0.0
    ls = float(label_smoothing)
    cb = int(chunk_bytes or 0)

    if reduction in ("mean", "sum"):
        coeff = aggregation.normalised_coefficients(
            flat.valid, flat.cu_seqlens,
            None if sample_weights is None else sample_weights.detach(),
            None if flat.token_weights is None else flat.token_weights.detach(),
            sample_reduction, reduction, num_items,
            dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        if name == "reference":
            tok = linear_ce_reference.token_losses(flat.x, weight, bias, flat.targets,
                                                   softcap=softcap, label_smoothing=ls)
            return (tok * coeff.to(tok.dtype)).sum()
        return ops.linear_ce_reduced(flat.x, weight, bias, flat.targets, coeff, cap, ls, name, cb)[0]

    if reduction == "sequence" and name != "reference" and not torch.is_grad_enabled():
        backend = dispatch.linear_ce_module(name)
        if hasattr(backend, "sequence_forward"):
            return backend.sequence_forward(flat.x, weight, bias, flat.targets, flat.cu_seqlens,
                                            softcap=softcap, label_smoothing=ls)
    if name == "reference":
        tok = linear_ce_reference.token_losses(flat.x, weight, bias, flat.targets,
                                               softcap=softcap, label_smoothing=ls)
    else:
        tok = ops.linear_ce_tokens(flat.x, weight, bias, flat.targets, cap, ls, name, cb)[0]
    if reduction == "none":
        return tok.view(flat.shape)
    return aggregation.segment_mean_unchecked(tok, flat.cu_seqlens, flat.valid)


def sequence_losses(hidden: Tensor, weight: Tensor, labels: Tensor, **options) -> Tensor:
    """Per-sample mean valid-token loss f_i, (B,) fp32: ``weighted_ce(..., reduction="sequence")``.

    The scoring pass of FLOW. Under ``torch.no_grad()`` it runs forward only and keeps no
    gradient state; with the Triton backend the per-sample means come straight from the kernel.
    """
    if options.get("reduction", "sequence") != "sequence":
        raise ValueError(f"sequence_losses always uses reduction='sequence', got {options['reduction']!r}")
    options["reduction"] = "sequence"
    return weighted_ce(hidden, weight, labels, **options)
