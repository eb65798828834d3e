"""The GPU speed goal (issue 10, goal 1), judged from records: PASS or SHORT per (case, op).

fastweight passes a (case, op) when, in the same run:
- it reaches at least ``MIN_FRAC_OF_FLOOR`` of the matmul floor;
- it is faster than every peer timed (torch.compile'd naive included; fastweight's own
  variants, the implementations named ``fastweight_*``, are not peers);
- its peak memory above inputs and gradients is at most ``MAX_PEAK_GIB``.
Otherwise it is SHORT, with the reasons. A missing figure (fastweight failed, no peer was
timed, memory was not measured) is a reason too: a goal is never passed by default.

    python -m benchmarks.goals benchmarks/results/gpu-<card>-<date>.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.results import measured

MIN_FRAC_OF_FLOOR = 0.85
MAX_PEAK_GIB = 1.0


def verdict(records: list[dict], case: str, op: str, impl: str = "fastweight") -> dict:
    """{"case", "op", "status": "PASS"|"SHORT", "short_on": [...], "frac_of_floor",
    "best_peer", "ratio_to_best_peer", "peak_mem_gib", "untimed_peers"} of ``impl`` on
    (case, op) against the other implementations' records of the same (case, op)."""
    group = [r for r in records if r["case"] == case and r["op"] == op]
    mine = next((r for r in group if r["impl"] == impl), None)
    # The others, less the judged implementation's own variants (named "<impl>_..."): not peers.
    others = [r for r in group if r["impl"] != impl and not r["impl"].startswith(impl + "_")]
    peers = [r for r in others if measured(r)]
    out = {"case": case, "op": op, "impl": impl, "frac_of_floor": None, "best_peer": None,
           "ratio_to_best_peer": None, "peak_mem_gib": None,
           "untimed_peers": [r["impl"] for r in others if not measured(r)]}
    short_on = []
    best = min(peers, key=lambda r: r["ms"]) if peers else None
    out["best_peer"] = best["impl"] if best else None
    if mine is None or not measured(mine):
        short_on.append("no fastweight time" + (f" ({mine['error'][:80]})" if mine and mine.get("error") else ""))
    else:
        out["frac_of_floor"] = mine.get("frac_of_floor")
        if out["frac_of_floor"] is None or not out["frac_of_floor"] >= MIN_FRAC_OF_FLOOR:
            short_on.append("floor")
        if best:
            out["ratio_to_best_peer"] = mine["ms"] / best["ms"]
            if not out["ratio_to_best_peer"] < 1.0:
                short_on.append("peer")
        else:
            short_on.append("no peer timed")
        gib = mine.get("peak_mem_gib")
        out["peak_mem_gib"] = gib if gib is not None and gib == gib else None
        if out["peak_mem_gib"] is None:
            short_on.append("memory unmeasured")
        elif out["peak_mem_gib"] > MAX_PEAK_GIB:
            short_on.append("memory")
    out["short_on"] = short_on
    out["status"] = "SHORT" if short_on else "PASS"
    return out


def verdicts(records: list[dict], impl: str = "fastweight") -> list[dict]:
    """``verdict`` of every (case, op) that has an ``impl`` record, in the records' order."""
    pairs = dict.fromkeys((r["case"], r["op"]) for r in records if r["impl"] == impl)
    return [verdict(records, case, op, impl) for case, op in pairs]


def format_verdict(v: dict) -> str:
    """One line: status, case, op, and the three figures against their goals."""
    def figure(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)
    peer = (f"{figure(v['ratio_to_best_peer'], '.3f')}x best peer {v['best_peer']} (<1)"
            if v["best_peer"] else "no peer timed")
    untimed = f"; untimed: {','.join(v['untimed_peers'])}" if v["untimed_peers"] else ""
    short = f"; short on: {', '.join(v['short_on'])}" if v["short_on"] else ""
    frac = None if v["frac_of_floor"] is None else 100 * v["frac_of_floor"]
    return (f"{v['status']:5} {v['case']} {v['op']}: {figure(frac, '.1f')}% of floor "
            f"(>={100 * MIN_FRAC_OF_FLOOR:.0f}%), {peer}, {figure(v['peak_mem_gib'], '.2f')} GiB "
            f"(<={MAX_PEAK_GIB:g}){short}{untimed}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="PASS/SHORT per (case, op) against the GPU speed goal")
    parser.add_argument("json", type=Path, help="a results file (benchmarks/results/gpu-*.json)")
    parser.add_argument("--impl", default="fastweight", help="the implementation judged")
    args = parser.parse_args(argv)
    records = json.loads(args.json.read_text())["records"]
    lines = [format_verdict(v) for v in verdicts(records, args.impl)]
    print("\n".join(lines) if lines else f"goals: no {args.impl} record in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
