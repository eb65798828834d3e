"""Metrics of ``fastweight train``: ``metrics.jsonl`` (one JSON record per logged step or eval),
the run summary and ``curves.png``.

A step record has both losses of the same batch, labelled: ``loss_weighted`` (the objective
being optimised, with the FLOW weights) and ``loss_unweighted`` (the plain token-mean loss,
comparable across standard and FLOW runs); ``grad_norm`` (before clipping) and ``clipped``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["MetricsLog", "train_summary", "draw_curves", "plot_metrics", "SMOOTHING_STEPS"]

SMOOTHING_STEPS = 10  # the summary's train losses are means over the last this many steps


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (on the main process) and keeps them in memory.

    On resume, the records up to the checkpoint's step are kept and later ones (from the
    interrupted part of the run) dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, enabled: bool, keep_until: int):
        self.path, self.enabled, self.records = path, enabled, []
        if not enabled:
            return
        if path.exists():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.get("step", 0) <= keep_until:
                    self.records.append(record)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, path)

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def first_eval(self) -> dict | None:
        """The step-0 evaluation, if one was logged."""
        return next((r for r in self.records if r.get("step") == 0 and "eval_target_loss" in r), None)


def train_summary(records: list[dict], window: int = SMOOTHING_STEPS) -> dict:
    """Smoothed train losses (means over the last ``window`` logged steps, not the last
    micro-batch, which is noisy) and how often clipping fired."""
    steps = [r for r in records if "loss_weighted" in r]
    last = steps[-window:]
    if not last:
        return {"logged_steps": 0}
    return {"train_loss_weighted": sum(r["loss_weighted"] for r in last) / len(last),
            "train_loss_unweighted": sum(r["loss_unweighted"] for r in last) / len(last),
            "smoothed_over_steps": len(last), "logged_steps": len(steps),
            "clipped_steps": sum(bool(r.get("clipped")) for r in steps)}


def _series(records: list[dict]) -> list[tuple[str, list[tuple[str, list, list]]]]:
    """(panel title, [(label, steps, values)]) for every panel that has data."""
    steps = [r for r in records if "loss_weighted" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    loss_lines = []
    if steps:
        x = [r["step"] for r in steps]
        loss_lines += [("train, weighted (optimised)", x, [r["loss_weighted"] for r in steps]),
                       ("train, unweighted token mean", x, [r["loss_unweighted"] for r in steps])]
    for key in sorted({k for r in evals for k in r if k.startswith("eval_")}):
        points = [(r["step"], r[key]) for r in evals if key in r]
        name = key.removeprefix("eval_").removesuffix("_loss")
        loss_lines.append((f"eval, {name} (unweighted)", *map(list, zip(*points))))
    panels = [("loss", loss_lines)] if loss_lines else []
    if steps:
        x = [r["step"] for r in steps]
        panels.append(("learning rate", [("lr", x, [r["lr"] for r in steps])]))
        panels.append(("grad norm (before clipping)",
                       [("grad norm", x, [r["grad_norm"] for r in steps])]))
    return panels


def draw_curves(records: list[dict], title: str = ""):
    """A matplotlib figure with one panel per quantity that has data (no empty panels); every
    line has markers, so that a run of 1-10 steps stays readable."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = _series(records)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.4 * max(1, len(panels)), 3.6),
                             squeeze=False)
    for axis, (panel_title, lines) in zip(axes[0], panels):
        for label, x, y in lines:
            axis.plot(x, y, marker="o", markersize=4 if len(x) <= 50 else 0, label=label)
        axis.set_title(panel_title)
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 0.96 ... 1.04
        if len(lines) > 1:
            axis.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_metrics(records: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Write ``draw_curves`` to ``path`` (PNG); None when matplotlib is missing."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = draw_curves(records, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
