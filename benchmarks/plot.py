"""Draw PNGs from benchmark JSON: ``python -m benchmarks.plot [results.json ...] [--out DIR]``.

Without arguments, the newest JSON in benchmarks/results/ is drawn. One figure per
(device, V, op, dtype, D): time and peak memory against N, one line per implementation; the
GEMM floor is drawn dashed. Files: ``<out>/<device>-<op>-V<V>-D<D>-<dtype>.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x


def plot_records(records: list[dict], out_dir: Path | str, title_extra: str = "") -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    out = []
    for p in paths:
        doc = json.loads(Path(p).read_text())
        out += plot_records(doc.get("records", []), out_dir or Path(p).parent)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="*", help="result files (default: newest in benchmarks/results)")
    ap.add_argument("--out", default=None, help="output folder (default: next to each JSON)")
    args = ap.parse_args(argv)
    files = args.json
    if not files:
        found = sorted(RESULTS_DIR.glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            print("no JSON in benchmarks/results", file=sys.stderr)
            return 1
        files = [found[-1]]
    for png in plot_files(files, args.out):
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
