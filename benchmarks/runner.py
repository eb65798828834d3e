"""Run cases end to end: build each implementation, time it, measure its memory, keep a record.

    floor = measure_floor(case, "fwd_bwd", device)                  # benchmarks.measure
    record = run_case(case, "fwd_bwd", "fastweight_torch", device, floor_ms=floor)
    records = run_cases([case], impls=["naive", "fastweight_torch"], device="cpu")

A failed implementation (not installed, no C++ compiler for torch.compile, out of memory) is
a record with ``error``, never an exception.
"""
from __future__ import annotations

import statistics
import time
import traceback
from typing import Callable

import torch

from benchmarks.cases import Case, Inputs, build_inputs
from benchmarks.measure import (CUDA_MEM_METHOD, MIB, cuda_peak_bytes, measure_floor, measure_peak_memory,
                                release_memory, time_fn)
from benchmarks.peers import Unavailable, available_impls, build
from benchmarks.results import add_ratios, format_progress, make_record


def _failure(exc: BaseException) -> dict:
    if isinstance(exc, Unavailable):
        return {"error": f"unavailable: {exc}"}
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return {"error": f"OOM: {(str(exc).splitlines() or [''])[0][:300]}"}
    return {"error": f"{type(exc).__name__}: {str(exc)[:500]}", "traceback": traceback.format_exc()[-2000:]}


def run_case(case: Case, op: str, impl: str, device="cpu", floor_ms: float | None = None,
             warmup: int = 1, repeats: int = 3, memory: bool = True, inputs: Inputs | None = None,
             exclude_grads: bool = False) -> dict:
    """Time (case, op, impl), measure its peak memory and return a record. The first call
    (compilation, autotuning) gives the loss and is not timed; ``warmup - 1`` more calls are not
    timed either. ``inputs``: reuse these (built from ``case``). Memory: on CUDA the same
    callable, in-process (``exclude_grads``: less the gradients it leaves); on the CPU a fresh
    process."""
    if floor_ms is None:
        floor_ms = measure_floor(case, op, device)
    cuda = torch.device(device).type == "cuda"
    start = time.perf_counter()
    fn = None
    mem: dict = {}
    try:
        fn = build(impl, inputs if inputs is not None else build_inputs(case, device), op, device)
        loss = float(fn().float().sum())
        times = time_fn(fn, device, warmup=max(warmup - 1, 0), repeats=repeats)
        if memory and cuda:
            peak, _ = cuda_peak_bytes(fn, exclude_grads)
            mem = {"peak_mem_mib": peak / MIB,
                   "mem_method": CUDA_MEM_METHOD + (" - gradients" if exclude_grads and fn.grads else "")}
        note = getattr(fn, "note", "")
    except Exception as exc:  # noqa: BLE001 - a failed implementation is a result too
        failure = _failure(exc)
        del fn
        release_memory(device)
        return make_record(device, case, op, impl, float("nan"), floor_ms,
                           wall_s=round(time.perf_counter() - start, 2), **failure)
    del fn
    release_memory(device)
    if memory and not cuda:
        mem = measure_peak_memory(case, op, impl, device)
    extra = {key: mem[src] for key, src in (("mem_method", "mem_method"), ("mem_error", "error")) if src in mem}
    return make_record(device, case, op, impl, statistics.median(times), floor_ms,
                       mem.get("peak_mem_mib", float("nan")), loss, times_ms=times, note=note,
                       wall_s=round(time.perf_counter() - start, 2), **extra)


def run_cases(cases: list[Case], ops=("fwd_bwd", "score"), impls: list[str] | None = None,
              device="cpu", warmup: int = 1, repeats: int = 3, memory: bool = True,
              log: Callable[[str], None] | None = print, floor: Callable[[Case, str], float] | None = None,
              budget_s: float | None = None, keep: tuple[str, ...] = (),
              skip: dict[str, str] | None = None, exclude_grads: bool = False) -> list[dict]:
    """run_case over cases x ops (``Case.timed_ops``) x impls, each case's inputs built once.
    floor(case, op) -> floor_ms (default ``measure_floor``). Once ``budget_s`` seconds have
    passed, the remaining implementations are recorded as "skipped: time budget", except those
    in ``keep``. ``skip`` {impl: reason}: recorded as "unavailable: <reason>" without running."""
    impls = impls or available_impls(device)
    floor = floor or (lambda c, o: measure_floor(c, o, device))
    skip = skip or {}
    start = time.perf_counter()
    records = []
    for case in cases:
        inputs = build_inputs(case, device)
        for op in case.timed_ops(ops):
            floor_ms = floor(case, op)
            for impl in impls:
                if impl in skip:
                    record = make_record(device, case, op, impl, float("nan"), floor_ms,
                                         error=f"unavailable: {skip[impl]}")
                elif budget_s is not None and impl not in keep and time.perf_counter() - start > budget_s:
                    record = make_record(device, case, op, impl, float("nan"), floor_ms,
                                         error="skipped: time budget")
                else:
                    record = run_case(case, op, impl, device, floor_ms, warmup, repeats, memory,
                                      inputs, exclude_grads)
                records.append(record)
                if log:
                    log(format_progress(record))
        del inputs
        release_memory(device)
    return add_ratios(records)
