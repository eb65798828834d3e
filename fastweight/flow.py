"""FLOW sample weights: w_i = exp(-f_i / tau), tau = median(f) by default (Sanyal et al., 2025)."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor


def flow_temperature(losses: Tensor, temperature: str | float = "median") -> float:
    """tau of ``flow_weights``: the median of the finite losses (the mean of the two middle
    values for an even count; torch.median would return the lower one), or the given number.
    NaN when no loss is finite."""
    if isinstance(temperature, str):
        if temperature != "median":
            raise ValueError(f"`temperature` must be 'median' or a positive number, got {temperature!r}")
        f = losses.detach().float()
        ordered = f[torch.isfinite(f)].sort().values
        k = ordered.numel()
        if k == 0:
            return float("nan")
        tau = float((ordered[(k - 1) // 2] + ordered[k // 2]) / 2)
        if not tau > 0:
            raise ValueError(f"the median loss is {tau:g}; the median temperature needs a "
                             "positive median, pass a number as `temperature`")
        return tau
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0:
        return float(temperature)
    raise ValueError(f"`temperature` must be 'median' or a positive number, got {temperature!r}")


def flow_weights(losses: Tensor, temperature: str | float = "median") -> Tensor:
    """Weights exp(-loss / tau) of the FLOW method, one per sample.

    Args:
        losses: (B,) per-sample mean losses f_i of the frozen pre-trained model
            (e.g. from ``sequence_losses``), any float dtype.
        temperature: "median" (tau = median of the finite losses, averaging the two middle
            values for an even count) or a positive number.

    Returns:
        (B,) fp32 weights, not normalised. A non-finite loss gets weight 0, with a warning
        that counts them. The weights are constants: no gradient flows through them.
    """
    if not isinstance(losses, Tensor) or not losses.dtype.is_floating_point:
        raise TypeError(f"`losses` must be a float tensor, got "
                        f"{losses.dtype if isinstance(losses, Tensor) else type(losses).__name__}")
    if losses.dim() != 1:
        raise ValueError(f"`losses` must be 1-D (B,), got shape {tuple(losses.shape)}")
    f = losses.detach().float()
    finite = torch.isfinite(f)
    num_bad = int((~finite).sum())
    if num_bad:
        warnings.warn(f"flow_weights: {num_bad} of {f.numel()} losses are not finite; "
                      "they get weight 0", RuntimeWarning, stacklevel=2)
    tau = flow_temperature(f, temperature)
    if not finite.any():
        return torch.zeros_like(f)
    return torch.where(finite, torch.exp(-f / tau), 0.0)
