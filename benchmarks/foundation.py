"""The foundation benchmark (issue 2, item 7), runnable on its own:

    python -m benchmarks.foundation [--repeats 3] [--no-memory] [--chunk-bytes BYTES ...] [--out FILE]

N = 4096 tokens (8 samples x 512), D = 512, V = 32000, fp32, FLOW-weighted mean, forward +
backward: fastweight (chunked PyTorch path) vs naive PyTorch vs PyTorch's chunked
F.linear_cross_entropy, each one's peak memory in its own process, and the three-GEMM floor
measured in the same run.

Goals: time <= 1.0x PyTorch chunked and <= 0.85x naive; peak memory <= PyTorch chunked's;
floor_ms / ms >= 0.85.

``--chunk-bytes`` adds fastweight runs with that memory budget (impl name
``fastweight_torch@<bytes>``) to explore the chunk size.
"""
from __future__ import annotations

import argparse
import statistics
import sys

from benchmarks.cases import FOUNDATION_CASE, build_inputs
from benchmarks.measure import gemm_fns, measure_peak_memory, release_memory, time_fn
from benchmarks.peers import IMPLEMENTATIONS, fastweight_builder
from benchmarks.results import add_ratios, make_record, write_results

FOUNDATION_IMPLS = ("fastweight_torch", "naive", "torch_chunked")
GOALS = {"vs_torch_chunked": 1.0, "vs_naive": 0.85, "frac_of_floor": 0.85}


def evaluate_goals(records: list[dict], impl: str = "fastweight_torch") -> dict:
    """The goal figures of ``impl`` on the foundation case from ``records``."""
    by = {r["impl"]: r for r in records
          if r["case"] == FOUNDATION_CASE.name and r["op"] == "fwd_bwd"}
    fw, naive, chunked = by.get(impl), by.get("naive"), by.get("torch_chunked")
    if fw is None or fw.get("ms") is None:
        return {"error": f"no {impl} record for the foundation case"}
    out = {"ms": fw["ms"], "floor_ms": fw["floor_ms"], "frac_of_floor": fw["floor_ms"] / fw["ms"],
           "peak_mem_mib": fw.get("peak_mem_mib")}
    out["goal_floor"] = out["frac_of_floor"] >= GOALS["frac_of_floor"]
    if naive and naive.get("ms"):
        out["vs_naive"] = fw["ms"] / naive["ms"]
        out["goal_naive"] = out["vs_naive"] <= GOALS["vs_naive"]
    if chunked and chunked.get("ms"):
        out["vs_torch_chunked"] = fw["ms"] / chunked["ms"]
        out["goal_torch_chunked"] = out["vs_torch_chunked"] <= GOALS["vs_torch_chunked"]
        m_fw, m_ch = fw.get("peak_mem_mib"), chunked.get("peak_mem_mib")
        if m_fw is not None and m_ch is not None and m_fw == m_fw and m_ch == m_ch:
            out["goal_memory"] = m_fw <= m_ch
    out["all_met"] = all(v for k, v in out.items() if k.startswith("goal_"))
    return out


def format_summary(records: list[dict]) -> str:
    lines = [f"foundation case {FOUNDATION_CASE.name} (fwd+bwd, FLOW-weighted mean)"]
    for r in records:
        if r["case"] != FOUNDATION_CASE.name or r["op"] != "fwd_bwd":
            continue
        if r.get("ms") is None or r["ms"] != r["ms"]:
            lines.append(f"  {r['impl']:26s} ERROR {r.get('error')}")
            continue
        mem = r.get("peak_mem_mib")
        lines.append(f"  {r['impl']:26s} {r['ms']:9.1f} ms  {100 * r['floor_ms'] / r['ms']:5.1f}% of floor"
                     f" ({r['floor_ms']:.1f} ms)  peak {mem if mem is None else round(mem, 1)} MiB"
                     f"  loss {r.get('loss'):.6g}")
    goals = evaluate_goals(records)
    lines.append("  goals: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in goals.items()))
    return "\n".join(lines)


def time_interleaved(fns: dict, device="cpu", rounds: int = 3) -> dict[str, list[float]]:
    """ms per call of each fn, the calls interleaved round-robin (after one warm-up call each),
    so that load from other processes on a shared machine hits every implementation alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += time_fn(fn, device, warmup=0, repeats=1)
    return times


def run_foundation(impls, device="cpu", repeats: int = 3, memory: bool = True,
                   chunk_bytes=()) -> list[dict]:
    """Records of the foundation case: the floor and every implementation timed interleaved in
    this process, then each implementation's peak memory in its own process."""
    case = FOUNDATION_CASE
    inp = build_inputs(case, device)
    builders = {name: IMPLEMENTATIONS[name] for name in impls}
    builders.update({f"fastweight_torch@{cb}": fastweight_builder("torch", cb) for cb in chunk_bytes})
    names = list(builders)
    fns, losses, errors = {}, {}, {}
    for name in names:
        try:
            fns[name] = builders[name](inp, "fwd_bwd", device)
            losses[name] = float(fns[name]().float().sum())  # warm-up
        except Exception as exc:  # noqa: BLE001
            errors[name] = f"{type(exc).__name__}: {str(exc)[:500]}"
            fns.pop(name, None)
    gemms = gemm_fns(case, "fwd_bwd", device).values()
    fns["__floor__"] = lambda: [g() for g in gemms]
    fns["__floor__"]()
    times = time_interleaved(fns, device, repeats)
    floor_times = times.pop("__floor__")
    floor = statistics.median(floor_times)
    del fns, gemms
    release_memory()
    records = []
    for name in names:
        if name in errors:
            records.append(make_record(device, case, "fwd_bwd", name, float("nan"), floor,
                                         error=errors[name]))
            continue
        mem = {}
        if memory:
            base, _, cb = name.partition("@")
            mem = measure_peak_memory(case, "fwd_bwd", base, device,
                                        chunk_bytes=int(cb) if cb else None)
        rec = make_record(device, case, "fwd_bwd", name, statistics.median(times[name]), floor,
                            mem.get("peak_mem_mib", float("nan")), losses[name],
                            times_ms=times[name], floor_times_ms=floor_times,
                            timing="interleaved round-robin, median")
        if "@" in name:
            rec["chunk_bytes"] = int(name.partition("@")[2])
        records.append(rec)
    return add_ratios(records)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fastweight foundation benchmark (issue 2 item 7)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--impls", nargs="*", default=list(FOUNDATION_IMPLS))
    ap.add_argument("--chunk-bytes", type=int, nargs="*", default=[])
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/<device>-<date>.json)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    records = run_foundation(args.impls, args.device, args.repeats, not args.no_memory,
                             args.chunk_bytes)
    add_ratios(records)
    print(format_summary(records))
    if not args.no_write:
        path = write_results(records, args.device, args.out)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
