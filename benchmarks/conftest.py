"""Shared fixtures of the pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``).

- ``bench_device``: "cuda" when a GPU is present, else "cpu".
- ``bench_floor(case, op)``: the GEMM floor of a shape, measured once per session.
- ``bench_record(benchmark, case, op, impl, fn, ...)``: time ``fn`` with pytest-benchmark,
  measure its peak memory (own process on the CPU), and keep the record; at the end of the
  session all records go to ``benchmarks/results/<device>-<date>.json`` and PNGs are drawn.

Environment:
    FASTWEIGHT_BENCH_MEMORY=0    skip the peak-memory subprocesses
    FASTWEIGHT_BENCH_ROUNDS=N    timed rounds per case (default 2 on the CPU, 10 on CUDA)
    FASTWEIGHT_BENCH_RESULTS=F   results file (default benchmarks/results/<device>-<date>.json)
    FASTWEIGHT_BENCH_PLOT=0      do not draw PNGs at the end
"""
from __future__ import annotations

import os
import statistics

import pytest
import torch

from benchmarks.cases import Case, build_inputs
from benchmarks.measure import measure_floor, measure_peak_memory, release_memory, synchronize
from benchmarks.peers import build
from benchmarks.results import make_record, write_results

_RECORDS: list[dict] = []
_FLOORS: dict[tuple, float] = {}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _enabled(config) -> bool:
    try:
        return not config.getoption("benchmark_disable")
    except ValueError:
        return True


@pytest.fixture(scope="session")
def bench_device() -> str:
    return _device()


@pytest.fixture(scope="session")
def bench_rounds(bench_device) -> int:
    return int(os.environ.get("FASTWEIGHT_BENCH_ROUNDS", 10 if bench_device == "cuda" else 2))


@pytest.fixture(scope="session")
def bench_records() -> list[dict]:
    """All records of this session (also usable by other bench files)."""
    return _RECORDS


@pytest.fixture(scope="session")
def bench_floor(bench_device):
    def floor(case: Case, op: str) -> float:
        key = (case.N, case.D, case.V, case.dtype, op)
        if key not in _FLOORS:
            _FLOORS[key] = measure_floor(case, op, bench_device, repeats=2)
        return _FLOORS[key]
    return floor


def find_record(case: Case, op: str, impl: str) -> dict | None:
    for r in _RECORDS:
        if r["case"] == case.name and r["op"] == op and r["impl"] == impl:
            return r
    return None


@pytest.fixture
def bench_record(request, bench_device, bench_rounds, bench_floor):
    """Time ``impl`` on ``case`` with pytest-benchmark and keep its record."""
    def record(benchmark, case: Case, op: str, impl: str, memory: bool = True) -> dict:
        floor = bench_floor(case, op)
        inp = build_inputs(case, bench_device)
        try:
            fn = build(impl, inp, op, bench_device)
            loss = float(fn().float().sum())  # first call: warm-up (and compilation)
        except Exception as exc:  # e.g. torch.compile without a working C++ compiler
            rec = make_record(bench_device, case, op, impl, float("nan"), floor,
                                error=f"{type(exc).__name__}: {str(exc)[:500]}")
            _RECORDS.append(rec)
            pytest.skip(f"{impl} failed: {rec['error'][:200]}")

        def timed():
            fn()
            synchronize(bench_device)

        benchmark.group = f"{op} {case.name}"
        benchmark.extra_info.update({"case": case.name, "op": op, "impl": impl,
                                     "N": case.N, "D": case.D, "V": case.V, "dtype": case.dtype})
        benchmark.pedantic(timed, rounds=bench_rounds, iterations=1, warmup_rounds=0)
        del fn, inp
        release_memory()
        times = [t * 1e3 for t in benchmark.stats.stats.data] if benchmark.stats else []
        ms = statistics.median(times) if times else float("nan")
        use_mem = memory and os.environ.get("FASTWEIGHT_BENCH_MEMORY", "1") != "0"
        mem = measure_peak_memory(case, op, impl, bench_device) if use_mem else {}
        rec = make_record(bench_device, case, op, impl, ms, floor,
                            mem.get("peak_mem_mib", float("nan")), loss, times_ms=times,
                            **({"mem_error": mem["error"]} if "error" in mem else {}))
        _RECORDS.append(rec)
        benchmark.extra_info.update({"floor_ms": floor, "frac_of_floor": rec["frac_of_floor"],
                                     "peak_mem_mib": rec["peak_mem_mib"], "loss": loss})
        return rec
    return record


def pytest_sessionfinish(session, exitstatus):
    if not _RECORDS or not _enabled(session.config):
        return
    device = _RECORDS[0]["device"]
    dev = "cuda" if device.startswith("cuda") else "cpu"
    path = write_results(_RECORDS, dev, os.environ.get("FASTWEIGHT_BENCH_RESULTS") or None)
    tr = session.config.pluginmanager.getplugin("terminalreporter")
    lines = [f"fastweight benchmark records written to {path}"]
    try:
        from benchmarks import foundation
        if any(r["case"] == foundation.FOUNDATION_CASE.name for r in _RECORDS):
            lines.append(foundation.format_summary(_RECORDS))
    except Exception as exc:  # pragma: no cover - the summary is informative only
        lines.append(f"(foundation summary failed: {exc})")
    if os.environ.get("FASTWEIGHT_BENCH_PLOT", "1") != "0":
        try:
            from benchmarks import plot
            for png in plot.plot_files([path]):
                lines.append(f"plot: {png}")
        except Exception as exc:  # pragma: no cover
            lines.append(f"(plotting failed: {exc})")
    for line in lines:
        if tr is not None:
            tr.write_line(line)
        else:
            print(line)
