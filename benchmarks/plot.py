"""Draw PNGs from benchmark JSON: ``python -m benchmarks.plot [results.json ...] [--out DIR]``.

Without arguments, the newest JSON in benchmarks/results/ is drawn.
- A sweep (several N at one shape): one figure per (device, V, op, dtype, D), time and peak
  memory against N, one line per implementation, the GEMM floor dashed. Files:
  ``<out>/<device>-<op>-V<V>-D<D>-<dtype>.png``.
- Single shapes (the GPU check): one figure, a row per (case, op), with bars of time and peak
  memory per implementation, the floor as a dashed line. File: ``<out>/<json stem>.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks.results import RESULTS_DIR


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def is_sweep(records: list[dict]) -> bool:
    """Several token counts at one (device, op, V, D, dtype): drawn as lines against N."""
    sizes: dict[tuple, set] = defaultdict(set)
    for r in records:
        sizes[(r["device"], r["op"], r["V"], r["D"], r["dtype"])].add(r["N"])
    return any(len(n) > 1 for n in sizes.values())


def plot_cases(records: list[dict], path: Path | str, title: str = "") -> Path:
    """One figure: per (case, op), bars of ms (with the floor dashed) and peak GiB per impl."""
    plt = _pyplot()
    pairs = list(dict.fromkeys((r["case"], r["op"]) for r in records if r.get("op") in ("fwd_bwd", "score")))
    fig, axes = plt.subplots(len(pairs), 2, figsize=(11, 2.4 * len(pairs) + 0.6), squeeze=False)
    for (case, op), (ax_t, ax_m) in zip(pairs, axes):
        recs = [r for r in records if r["case"] == case and r["op"] == op and _finite(r.get("ms"))]
        names = [r["impl"] for r in recs]
        ax_t.barh(names, [r["ms"] for r in recs], color="tab:blue")
        floors = [r["floor_ms"] for r in recs if _finite(r.get("floor_ms"))]
        if floors:
            ax_t.axvline(floors[0], color="k", linestyle="--", linewidth=1, label="matmul floor")
            ax_t.legend(fontsize=7, loc="lower right")
        mem = [(r["impl"], r["peak_mem_gib"]) for r in recs if _finite(r.get("peak_mem_gib"))]
        if mem:
            ax_m.barh(*zip(*mem), color="tab:orange")
        ax_t.set_title(f"{case} {op}: time (ms)", fontsize=9)
        ax_m.set_title(f"{case} {op}: peak memory above inputs and gradients (GiB)", fontsize=9)
        for ax in (ax_t, ax_m):
            ax.tick_params(labelsize=8)
            ax.grid(True, axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_records(records: list[dict], out_dir: Path | str, title_extra: str = "") -> list[Path]:
    """The sweep figures (time and memory against N) of ``records``."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("op") in ("fwd_bwd", "score") and _finite(r.get("N")):
            groups[(r["device"], r["op"], r["V"], r["D"], r["dtype"])].append(r)
    paths = []
    for (device, op, V, D, dtype), recs in sorted(groups.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        impls = sorted({r["impl"] for r in recs}, key=lambda s: (s != "naive", s))
        for impl in impls:
            pts = sorted((r["N"], r.get("ms"), r.get("peak_mem_mib")) for r in recs if r["impl"] == impl)
            t = [(n, ms) for n, ms, _ in pts if _finite(ms)]
            m = [(n, mb) for n, _, mb in pts if _finite(mb)]
            if t:
                ax_t.plot(*zip(*t), marker="o", label=impl)
            if m:
                ax_m.plot(*zip(*m), marker="o", label=impl)
        floor = sorted({(r["N"], r["floor_ms"]) for r in recs if _finite(r.get("floor_ms"))})
        if floor:
            ax_t.plot(*zip(*floor), "k--", linewidth=1, label="GEMM floor")
        for ax, ylabel in ((ax_t, "time per call (ms)"), (ax_m, "peak memory above inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        what = "weighted_ce forward+backward" if op == "fwd_bwd" else "sequence_losses (scoring)"
        fig.suptitle(f"{what} - {device} - V={V}, D={D}, {dtype}{title_extra}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{device}-{op}-V{V}-D{D}-{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_files(paths: list[Path | str], out_dir: Path | str | None = None) -> list[Path]:
    """Draw each results file: sweep figures, or one figure of single shapes."""
    out = []
    for p in paths:
        p = Path(p)
        doc = json.loads(p.read_text())
        if not isinstance(doc, dict):  # e.g. the AOT compile report
            continue
        records = [r for r in doc.get("records", []) if r.get("op") in ("fwd_bwd", "score") and _finite(r.get("N"))]
        if is_sweep(records):
            out += plot_records(records, out_dir or p.parent)
        elif records:
            machine = doc.get("machine", {})
            title = " ".join(str(machine[k]) for k in ("device", "date", "git_commit") if machine.get(k))
            out.append(plot_cases(records, Path(out_dir or p.parent) / f"{p.stem}.png", title))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="*", help="result files (default: the newest with records in benchmarks/results)")
    ap.add_argument("--out", default=None, help="output folder (default: next to each JSON)")
    args = ap.parse_args(argv)
    files = args.json
    if not files:
        found = sorted((p for p in RESULTS_DIR.glob("*.json") if '"records"' in p.read_text()),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            print("no JSON in benchmarks/results", file=sys.stderr)
            return 1
        files = [found[-1]]
    for png in plot_files(files, args.out):
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
