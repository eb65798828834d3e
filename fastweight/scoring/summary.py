"""``fastweight weights``: what a scores file says: tau, the loss quantiles with the weight of
each of those losses, the mean weight and the effective sample size; optional histograms."""
from __future__ import annotations

import argparse
import math

import torch

from fastweight.scoring.files import read_scores

__all__ = ["summarize", "format_summary", "plot", "run_weights", "QUANTILES"]

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def summarize(scores: dict) -> dict:
    """tau, the loss quantiles over the scored samples and the FLOW weight exp(-loss / tau) of
    each quantile's loss (so that a row reads across), the mean weight over the scored samples,
    and the effective sample size ESS = (sum w)^2 / sum w^2."""
    loss, weight = scores["loss"].double(), scores["weight"].double()
    scored = scores["num_tokens"] > 0
    metadata = scores.get("metadata", {})
    tau = float(metadata.get("tau", "nan"))
    summary = {"num_samples": int(loss.numel()), "num_scored": int(scored.sum()),
               "num_empty": int((~scored).sum()), "tau": tau,
               "temperature": metadata.get("temperature", "?")}
    if scored.any():
        levels = torch.tensor(QUANTILES, dtype=torch.float64)
        loss_quantiles = torch.quantile(loss[scored], levels).tolist()
        summary["loss_quantiles"] = dict(zip(QUANTILES, loss_quantiles))
        # The weight is a decreasing function of the loss: the weight of the loss at quantile q,
        # not the weight quantile q (which belongs to another sample).
        summary["weight_of_loss_quantiles"] = {
            q: math.exp(-value / tau) if tau == tau else float("nan")
            for q, value in zip(QUANTILES, loss_quantiles)}
        summary["loss_mean"] = float(loss[scored].mean())
        summary["weight_mean"] = float(weight[scored].mean())
    weight_sum, weight_square_sum = float(weight.sum()), float((weight * weight).sum())
    summary["weight_sum"] = weight_sum
    summary["ess"] = weight_sum ** 2 / weight_square_sum if weight_square_sum > 0 else 0.0
    summary["ess_fraction"] = summary["ess"] / max(summary["num_scored"], 1)
    return summary


def format_summary(path: str, summary: dict) -> str:
    """The text that ``fastweight weights`` prints."""
    lines = [f"{path}: {summary['num_samples']} samples, {summary['num_scored']} scored, "
             f"{summary['num_empty']} with no response token (weight 0)",
             f"temperature: {summary['temperature']}  tau = {summary['tau']:.6g}"]
    if "loss_quantiles" in summary:
        lines.append(f"{'quantile':>9} {'loss':>12} {'its weight':>12}")
        for q in QUANTILES:
            lines.append(f"{q:>9.2f} {summary['loss_quantiles'][q]:>12.6g} "
                         f"{summary['weight_of_loss_quantiles'][q]:>12.6g}")
        lines.append(f"mean loss {summary['loss_mean']:.6g}; mean weight {summary['weight_mean']:.6g} "
                     "(train --weight-normalization mean divides the weights by it)")
    lines.append(f"sum of weights {summary['weight_sum']:.6g}; effective sample size "
                 f"(sum w)^2/sum w^2 = {summary['ess']:.6g} "
                 f"({100 * summary['ess_fraction']:.1f}% of scored samples)")
    return "\n".join(lines)


def plot(scores: dict, path) -> None:
    """Histograms of the scored samples' losses (with tau) and of their weights."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = scores["num_tokens"] > 0
    loss = scores["loss"][scored].numpy()
    weight = scores["weight"][scored].numpy()
    fig, (loss_axis, weight_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss_axis.hist(loss, bins=50, color="tab:blue")
    tau = float(scores.get("metadata", {}).get("tau", "nan"))
    if tau == tau:
        loss_axis.axvline(tau, color="k", ls="--", label=f"tau = {tau:.3g}")
        loss_axis.legend()
    loss_axis.set_xlabel("mean response-token loss f_i")
    loss_axis.set_ylabel("samples")
    weight_axis.hist(weight, bins=50, color="tab:orange")
    weight_axis.set_xlabel("FLOW weight exp(-f_i / tau)")
    fig.suptitle(f"{len(loss)} samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_weights(args: argparse.Namespace) -> int:
    """Entry point of ``fastweight weights``."""
    scores = read_scores(args.scores)
    print(format_summary(args.scores, summarize(scores)))
    if args.plot:
        plot(scores, args.plot)
        print(f"histograms written to {args.plot}")
    return 0
