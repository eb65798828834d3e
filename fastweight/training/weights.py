"""FLOW weights for training: read from a ``fastweight score`` file in row order, checked
against the data and model, and optionally mean-normalised (``--weight-normalization mean``)."""
from __future__ import annotations

import torch

__all__ = ["load_flow_weights", "normalize_weights", "scores_expectations"]


def load_flow_weights(scores_path: str, num_rows: int, *, expect_fingerprint=None,
                      expect_model_hash=None, normalization: str = "none") -> torch.Tensor:
    """(num_rows,) fp32 FLOW weights in row order from a ``fastweight score`` file.

    Refuses (ValueError; ``ScoresMismatchError`` for another dataset or model) a file whose
    data fingerprint or model hash differ from the expected ones, or whose rows do not cover
    the dataset. ``normalization="mean"`` divides by the mean weight of the scored samples.
    """
    from fastweight.scoring import read_scores

    scores = read_scores(scores_path, expect_fingerprint=expect_fingerprint,
                         expect_model_hash=expect_model_hash)
    weight, index = scores["weight"].float(), scores["index"].long()
    if index.numel() and (index.min() < 0 or index.max() >= num_rows):
        raise ValueError(f"scores file {scores_path} has row indices outside [0, {num_rows})")
    weights = torch.full((num_rows,), float("nan"))
    weights[index] = weight
    scored = torch.zeros(num_rows, dtype=torch.bool)
    scored[index] = scores["num_tokens"] > 0
    missing = int(torch.isnan(weights).sum())
    if missing:
        raise ValueError(f"scores file {scores_path} has no weight for {missing} of {num_rows} rows")
    return normalize_weights(weights, normalization, scored)


def normalize_weights(weights: torch.Tensor, normalization: str,
                      scored: torch.Tensor | None = None) -> torch.Tensor:
    """``"none"``: the weights as they are (the paper's rule, whose mean is below 1, so FLOW
    also takes smaller steps). ``"mean"``: divided by their mean over the scored samples
    (``scored``; default: those with a positive weight, as unscored rows get 0), so that the
    average step matches standard fine-tuning and only the reweighting differs."""
    if normalization == "none":
        return weights
    if normalization != "mean":
        raise ValueError(f"weight normalization must be 'none' or 'mean', got {normalization!r}")
    scored = weights > 0 if scored is None else scored
    if not scored.any():
        raise ValueError("no scored sample: the weights cannot be mean-normalised")
    return weights / weights[scored].mean()


def scores_expectations(rows, model) -> dict:
    """The data fingerprint and model hash that a matching scores file must carry."""
    from fastweight import data
    from fastweight.hf import model_hash

    return {"expect_fingerprint": data.fingerprint(rows), "expect_model_hash": model_hash(model)}
