"""Measurements: wall time, the matmul floor, and peak memory.

- ``time_fn``: device-synchronised wall times of repeated calls.
- ``kernel_breakdown``: where those times go (GEMMs, the row kernel, the rest), by torch.profiler.
- The floor is the matmul work of an op: the logits GEMM X @ W.T (2*N*D*V flops) for "score";
  plus the dX GEMM G @ W for "fwd_bwd" with a frozen head (4*N*D*V); plus the dW GEMM G.T @ X
  for "fwd_bwd" (6*N*D*V). ``measure_floor`` times those GEMMs at the case's shape now;
  ``floor_at_rate`` divides the flops by a rate (e.g. the best of ``matmul_rates``).
- Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what is allocated before the
  call (optionally less the gradients it leaves). On the CPU each (case, op, impl) runs in its
  own process (``python -m benchmarks.measure --measure-memory``): inputs are built, the
  implementation is warmed up (a tiny shape, or the real one for torch.compile, so that
  compilation is not counted), memory is released and the resident high-water mark is reset
  (``/proc/self/clear_refs``, else ``ru_maxrss``); the result is the high-water mark minus the
  resident size just before the call. glibc's mmap threshold is pinned so that freed blocks go
  back to the OS and cannot hide allocations.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.cases import DTYPES, OPS, Case, build_inputs, tiny_case
from benchmarks.peers import build

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024.0 * 1024.0
CUDA_MEM_METHOD = "torch.cuda.max_memory_allocated - inputs"


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device="cpu", warmup: int = 1, repeats: int = 3) -> list[float]:
    """Wall times in ms of ``repeats`` calls after ``warmup`` calls (device-synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


# Kernel groups of a profile, first match wins: fastweight's Triton kernels by name, then the
# GEMMs (cuBLAS/CUTLASS kernel names on CUDA, the ATen matmul ops on the CPU).
KERNEL_GROUPS = (
    ("row_kernel", re.compile(r"_ce_rows_kernel")),
    ("aggregation", re.compile(r"_coefficients_kernel|_segment_mean")),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|aten::(mm|addmm|bmm|matmul|linear)\b", re.I)),
)


def kernel_breakdown(fn: Callable[[], object], device="cpu", calls: int = 3) -> dict:
    """Where the time of ``fn`` goes, per call, from ``torch.profiler`` over ``calls`` calls
    (after one unprofiled call): {"wall_ms", "kernel_ms", "busy", "groups": {group: ms},
    "top": [[name, ms], ...]}. On CUDA these are the kernels' device times, and ``busy`` =
    kernel_ms / wall_ms is above 1 when kernels overlap (streams) and below when the GPU idles
    (wall_ms is taken under the profiler, so it includes the profiler's own overhead).
    On the CPU they are the ATen ops' self CPU times: a rough view only."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / calls
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        else:
            us = event.self_cpu_time_total
        if us > 0:
            times[event.key] = times.get(event.key, 0.0) + us / 1e3 / calls
    if not times:
        raise RuntimeError("the profiler recorded no " + ("CUDA kernels" if cuda else "CPU ops"))
    groups = {name: 0.0 for name, _ in KERNEL_GROUPS} | {"other": 0.0}
    for name, ms in times.items():
        group = next((g for g, pattern in KERNEL_GROUPS if pattern.search(name)), "other")
        groups[group] += ms
    kernel_ms = sum(times.values())
    top = sorted(times.items(), key=lambda kv: -kv[1])[:8]
    return {"wall_ms": wall_ms, "kernel_ms": kernel_ms, "busy": kernel_ms / wall_ms if wall_ms else None,
            "groups": groups, "top": [[name[:120], ms] for name, ms in top],
            "method": "torch.profiler " + ("CUDA kernel device times" if cuda else "CPU self times of ATen ops")}


# ----------------------------------------------------------------------------------------------
# The floor
# ----------------------------------------------------------------------------------------------
def gemm_names(case: Case, op: str) -> tuple[str, ...]:
    """The GEMMs an op cannot avoid: logits; dX for a backward; dW unless the head is frozen."""
    if op != "fwd_bwd":
        return ("logits",)
    return ("logits", "dx") if case.frozen_head else ("logits", "dx", "dw")


def floor_flops(case: Case, op: str) -> float:
    """2*N*D*V per GEMM of ``gemm_names``: 2, 4 (frozen head) or 6 N*D*V."""
    return 2.0 * len(gemm_names(case, op)) * case.N * case.D * case.V


def gemm_fns(case: Case, op: str, device, rows: int | None = None) -> dict[str, Callable[[], torch.Tensor]]:
    """The case's GEMMs alone (``gemm_names``), with preallocated outputs so that only the GEMM
    is timed. ``rows`` caps N (a chunk of the tokens: the rate without the whole (N, V) block)."""
    dtype = DTYPES[case.dtype]
    n = min(case.N, rows) if rows else case.N
    x = torch.randn(n, case.D, dtype=dtype, device=device)
    w = torch.randn(case.V, case.D, dtype=dtype, device=device)
    logits = torch.empty(n, case.V, dtype=dtype, device=device)
    dx = torch.empty(n, case.D, dtype=dtype, device=device)
    dw = torch.empty(case.V, case.D, dtype=dtype, device=device)
    every = {"logits": lambda: torch.mm(x, w.t(), out=logits),
             "dx": lambda: torch.mm(logits, w, out=dx),
             "dw": lambda: torch.mm(logits.t(), x, out=dw)}
    return {name: every[name] for name in gemm_names(case, op)}


def time_gemms(case: Case, op: str, device="cpu", warmup: int = 1, repeats: int = 3,
               rows: int | None = None) -> dict[str, dict]:
    """{gemm name: {"shape": [n, D, V], "ms", "tflops"}}: each GEMM timed now (median)."""
    n = min(case.N, rows) if rows else case.N
    out = {}
    for name, fn in gemm_fns(case, op, device, rows).items():
        ms = statistics.median(time_fn(fn, device, warmup, repeats))
        out[name] = {"shape": [n, case.D, case.V], "ms": ms, "tflops": 2.0 * n * case.D * case.V / ms / 1e9}
    release_memory(device)
    return out


def measure_floor(case: Case, op: str, device="cpu", warmup: int = 1, repeats: int = 3) -> float:
    """floor_ms: the sum of the median times of the case's GEMMs, measured now."""
    if op == "agg":
        return float("nan")
    return sum(g["ms"] for g in time_gemms(case, op, device, warmup, repeats).values())


def matmul_rates(cases: list[Case], device="cpu", square: int = 8192, rows: int | None = 2048,
                 warmup: int = 1, repeats: int = 5) -> dict[str, dict]:
    """Matmul rates (TFLOP/s) in the cases' dtype: a square GEMM of side ``square`` and each
    case's three GEMMs (on ``rows`` tokens). Keys "square" and "<case>:<gemm>"."""
    dtype = cases[0].dtype if cases else "fp32"
    square_case = Case("square", B=1, T=square, D=square, V=square, dtype=dtype)
    rates = {"square": time_gemms(square_case, "score", device, warmup + 1, 2 * repeats)["logits"]}
    shapes = {(c.N, c.D, c.V, c.dtype): c for c in cases}.values()  # a frozen head shares its shape
    for case in shapes:
        for name, rate in time_gemms(case, "fwd_bwd", device, warmup, repeats, rows).items():
            rates[f"{case.name}:{name}"] = rate
    return rates


def best_rate(rates: dict[str, dict]) -> float:
    return max(r["tflops"] for r in rates.values())


def floor_at_rate(case: Case, op: str, tflops: float) -> float:
    """floor_ms: the op's matmul flops at ``tflops``."""
    return floor_flops(case, op) / (tflops * 1e9)


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            match = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def rss_bytes() -> int:
    """The resident set size now."""
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # best effort


def reset_hwm() -> bool:
    """Reset the resident high-water mark (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int:
    """The resident high-water mark (VmHWM, else ru_maxrss)."""
    kib = _proc_status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def release_memory(device=None) -> None:
    """Collect garbage and hand freed memory back (CUDA cache, or glibc's heap)."""
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        return
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cuda_peak_bytes(fn: Callable[[], torch.Tensor], exclude_grads: bool = False) -> tuple[float, torch.Tensor]:
    """(peak bytes, the call's result): CUDA high-water mark of one call of ``fn`` above what is
    allocated before it; with ``exclude_grads``, less the gradients it leaves in ``fn.grads``."""
    grads = getattr(fn, "grads", ())
    for leaf in grads:
        leaf.grad = None
    release_memory("cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    if exclude_grads:
        peak -= sum(t.grad.numel() * t.grad.element_size() for t in grads if t.grad is not None)
    return peak, out


def measure_peak_memory_inprocess(case: Case, op: str, impl: str, device="cpu") -> dict:
    """Peak memory of one call, in this process (on the CPU, call it in a fresh process:
    ``measure_peak_memory``)."""
    # Warm torch up (threads, BLAS, allocator, lazy imports) before any baseline.
    warm_inputs = build_inputs(case if impl == "compiled" else tiny_case(case), device)
    warm_loss = float(build(impl, warm_inputs, op, device)().float().sum())
    del warm_inputs
    fn = build(impl, build_inputs(case, device), op, device)
    release_memory()
    if torch.device(device).type == "cuda":
        peak, loss = cuda_peak_bytes(fn)
        method = CUDA_MEM_METHOD
    else:
        reset = reset_hwm()
        base = rss_bytes()
        hwm_before = hwm_bytes()
        loss = fn()
        peak = hwm_bytes() - (base if reset else max(base, hwm_before))
        method = ("VmHWM (reset via clear_refs) - RSS after inputs" if reset
                  else "ru_maxrss - max(RSS, earlier high-water mark)")
    return {"peak_mem_mib": peak / MIB, "loss": float(loss.float().sum()), "mem_method": method,
            "warmup_loss": warm_loss}


def measure_peak_memory(case: Case, op: str, impl: str, device="cpu", timeout: float = 900.0,
                        chunk_bytes: int | None = None) -> dict:
    """Peak memory of (case, op, impl). CUDA: in-process. CPU: in a fresh subprocess.
    Returns {"peak_mem_mib", "loss", "mem_method"} or {"peak_mem_mib": nan, "error": ...}."""
    if torch.device(device).type == "cuda":
        return measure_peak_memory_inprocess(case, op, impl, device)
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # no dynamic threshold: frees go to the OS
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if chunk_bytes is not None:
        env["FASTWEIGHT_CHUNK_BYTES"] = str(chunk_bytes)
    cmd = [sys.executable, "-m", "benchmarks.measure", "--measure-memory", "--case", case.to_json(),
           "--op", op, "--impl", impl, "--device", str(device)]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"peak_mem_mib": float("nan"), "error": f"timeout after {timeout}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"peak_mem_mib": float("nan"), "error": f"rc={proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def _main(argv=None) -> int:
    """The child of ``measure_peak_memory``: one (case, op, impl), one JSON line."""
    parser = argparse.ArgumentParser(description="measure the peak memory of one call (child process)")
    parser.add_argument("--measure-memory", action="store_true", required=True)
    parser.add_argument("--case", required=True, help="Case as JSON")
    parser.add_argument("--op", default="fwd_bwd", choices=OPS)
    parser.add_argument("--impl", default="fastweight_torch")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        out = measure_peak_memory_inprocess(Case.from_json(args.case), args.op, args.impl, args.device)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out = {"peak_mem_mib": None, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    print(json.dumps(out), flush=True)  # Python's json reads back NaN
    return 0


if __name__ == "__main__":
    sys.exit(_main())
