"""The reusable core of fastweight's benchmarks: cases, implementations, timing, the GEMM floor,
peak memory and JSON results.

Everything here is plain functions so that the pytest-benchmark suite, the standalone foundation
benchmark and a GPU script can share it:

    case = Case("N4096-V32000", B=8, T=512, D=512, V=32000)
    floor = measure_floor(case, "fwd_bwd", device)           # three GEMMs alone, same run
    rec = run_case(case, "fwd_bwd", "fastweight_torch", device, floor_ms=floor, memory=True)
    write_results([rec, ...], device)                        # benchmarks/results/<device>-<date>.json

Conventions
-----------
- ``op`` is "fwd_bwd" (weighted mean loss + backward to hidden and weight), "score"
  (per-sample mean token loss under no_grad, the FLOW scoring pass) or "agg" (the aggregation
  ops; their timing lives in the aggregation bench, the record format is shared).
- The floor is the matmul work alone, timed at the case's shape in the same run:
  X @ W.T, G @ W and G.T @ X for fwd_bwd (6*N*D*V flops), X @ W.T for score (2*N*D*V).
  ``frac_of_floor`` = floor_ms / ms (1.0 = as fast as the GEMMs alone).
- Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what the inputs hold. On the CPU
  every (case, op, impl) runs in its own process (``python -m benchmarks.harness
  --measure-memory``): inputs are built, the implementation is warmed up (a tiny shape, or the
  real one for torch.compile, so that compilation is not counted), memory is released and the
  kernel's resident high-water mark is reset (``/proc/self/clear_refs``; falls back to
  ``ru_maxrss`` where that is unavailable); the result is the high-water mark minus the resident
  size just before the measured call. glibc's mmap threshold is pinned so freed blocks go back
  to the OS and cannot hide allocations.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
OPS = ("fwd_bwd", "score", "agg")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One shape. N = B * T tokens, packed as B samples of T tokens; the first ``prompt`` tokens
    of each sample are ignored (label -100), as FLOW masks the prompt."""
    name: str
    B: int
    T: int
    D: int
    V: int
    dtype: str = "fp32"
    prompt: int = 0
    seed: int = 0

    @property
    def N(self) -> int:
        return self.B * self.T

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "Case":
        return Case(**json.loads(text))


def make_case(N: int, D: int, V: int, dtype: str = "fp32", T: int = 512, name: str | None = None,
              prompt_frac: float = 0.0, seed: int = 0) -> Case:
    """A case of N tokens in samples of T tokens (T shrinks when N < T)."""
    T = min(T, N)
    if N % T:
        raise ValueError(f"N={N} must be a multiple of T={T}")
    return Case(name or f"N{N}-D{D}-V{V}-{dtype}", B=N // T, T=T, D=D, V=V, dtype=dtype,
                prompt=int(T * prompt_frac), seed=seed)


@dataclasses.dataclass
class Inputs:
    hidden: torch.Tensor          # (B, T, D)
    weight: torch.Tensor          # (V, D)
    labels: torch.Tensor          # (B, T) int64, -100 on the prompt
    sample_weights: torch.Tensor  # (B,) fp32, FLOW-style exp(-f / median f)


def build_inputs(case: Case, device: str | torch.device = "cpu") -> Inputs:
    """Deterministic inputs, created in place (no temporaries, so no RSS spike on the CPU).
    Logits come out with a standard deviation of about 1."""
    dtype = DTYPES[case.dtype]
    g = torch.Generator(device="cpu").manual_seed(case.seed)
    hidden = torch.empty(case.B, case.T, case.D, dtype=dtype)
    hidden.normal_(0.0, 1.0, generator=g)
    weight = torch.empty(case.V, case.D, dtype=dtype)
    weight.normal_(0.0, 1.0 / math.sqrt(case.D), generator=g)
    labels = torch.randint(0, case.V, (case.B, case.T), generator=g)
    labels[:, : case.prompt] = -100
    losses = torch.rand(case.B, generator=g) * 4 + 1
    sample_weights = torch.exp(-losses / losses.median())
    return Inputs(hidden.to(device), weight.to(device), labels.to(device), sample_weights.to(device))


# ----------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------
# A builder takes (inputs, op, device) and returns a zero-argument callable that does the work
# and returns the loss tensor (a scalar for fwd_bwd, (B,) for score). For fwd_bwd the callable
# clears .grad and runs backward to hidden and weight.

NOTES = {
    "naive": "materialised logits hidden @ W.T + F.cross_entropy(reduction='none'), "
             "weighted sum of token losses / valid tokens",
    "compiled": "torch.compile of the naive function",
    "torch_chunked": "F.linear_cross_entropy(options=LinearCrossEntropyOptions()); it has no "
                     "per-sample weights: fwd_bwd is timed with reduction='mean' (unweighted)",
    "fastweight_torch": "fastweight.weighted_ce(impl='torch'), chunked PyTorch path",
    "fastweight_triton": "fastweight.weighted_ce(impl='triton')",
    "liger": "Liger-Kernel LigerFusedLinearCrossEntropyLoss; no per-sample weights: "
             "fwd_bwd timed with reduction='mean' (unweighted)",
    "cce": "cut-cross-entropy linear_cross_entropy; no per-sample weights: fwd_bwd timed with "
           "reduction='mean' (unweighted)",
}


def _coefficients(labels: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
    """(B, T) c_t = w_s(t) / #valid tokens, 0 on ignored tokens (sample_reduction='token')."""
    valid = labels != -100
    c = sample_weights[:, None].expand_as(labels) * valid
    return c / valid.sum().clamp_min(1)


def _segment_mean(tok: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    valid = (labels != -100).to(tok.dtype)
    return (tok * valid).sum(1) / valid.sum(1).clamp_min(1)


def naive_weighted_loss(hidden, weight, labels, coeff):
    """Materialised logits + F.cross_entropy, the per-token losses weighted by ``coeff``."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    tok = F.cross_entropy(logits.float(), labels.reshape(-1), reduction="none", ignore_index=-100)
    return (tok * coeff.reshape(-1)).sum()


def naive_sequence_losses(hidden, weight, labels):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    tok = F.cross_entropy(logits.float(), labels.reshape(-1), reduction="none", ignore_index=-100)
    return _segment_mean(tok.view(labels.shape), labels)


def _fwd_bwd(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inp: Inputs):
    h = inp.hidden.detach().requires_grad_(True)
    w = inp.weight.detach().requires_grad_(True)

    def run():
        h.grad = None
        w.grad = None
        loss = loss_fn(h, w)
        loss.backward()
        return loss.detach()
    return run


def _score(score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inp: Inputs):
    def run():
        with torch.no_grad():
            return score_fn(inp.hidden, inp.weight)
    return run


def _build_naive(inp: Inputs, op: str, device):
    if op == "fwd_bwd":
        coeff = _coefficients(inp.labels, inp.sample_weights)
        return _fwd_bwd(lambda h, w: naive_weighted_loss(h, w, inp.labels, coeff), inp)
    return _score(lambda h, w: naive_sequence_losses(h, w, inp.labels), inp)


_COMPILED: dict = {}


def _build_compiled(inp: Inputs, op: str, device):
    if op == "fwd_bwd":
        fn = _COMPILED.setdefault("fwd_bwd", torch.compile(naive_weighted_loss, dynamic=False))
        coeff = _coefficients(inp.labels, inp.sample_weights)
        return _fwd_bwd(lambda h, w: fn(h, w, inp.labels, coeff), inp)
    fn = _COMPILED.setdefault("score", torch.compile(naive_sequence_losses, dynamic=False))
    return _score(lambda h, w: fn(h, w, inp.labels), inp)


def _build_torch_chunked(inp: Inputs, op: str, device):
    opts = torch.nn.LinearCrossEntropyOptions()
    labels = inp.labels.reshape(-1)
    if op == "fwd_bwd":
        return _fwd_bwd(lambda h, w: F.linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), w, labels, reduction="mean", ignore_index=-100,
            options=opts), inp)

    def score(h, w):
        tok = F.linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, labels, reduction="none",
                                     ignore_index=-100, options=opts)
        return _segment_mean(tok.float().view(inp.labels.shape), inp.labels)
    return _score(score, inp)


def _fastweight_builder(impl: str, chunk_bytes: int | None = None):
    def build(inp: Inputs, op: str, device):
        import fastweight
        if op == "fwd_bwd":
            return _fwd_bwd(lambda h, w: fastweight.weighted_ce(
                h, w, inp.labels, inp.sample_weights, reduction="mean", impl=impl,
                chunk_bytes=chunk_bytes), inp)
        return _score(lambda h, w: fastweight.sequence_losses(
            h, w, inp.labels, impl=impl, chunk_bytes=chunk_bytes), inp)
    return build


def _build_liger(inp: Inputs, op: str, device):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    labels = inp.labels.reshape(-1)
    if op == "fwd_bwd":
        mod = LigerFusedLinearCrossEntropyLoss(reduction="mean", ignore_index=-100)
        return _fwd_bwd(lambda h, w: mod(w, h.reshape(-1, h.shape[-1]), labels), inp)
    mod = LigerFusedLinearCrossEntropyLoss(reduction="none", ignore_index=-100)
    return _score(lambda h, w: _segment_mean(
        mod(w, h.reshape(-1, h.shape[-1]), labels).float().view(inp.labels.shape), inp.labels), inp)


def _build_cce(inp: Inputs, op: str, device):
    from cut_cross_entropy import linear_cross_entropy
    if op == "fwd_bwd":
        return _fwd_bwd(lambda h, w: linear_cross_entropy(h, w, inp.labels, reduction="mean"), inp)
    return _score(lambda h, w: _segment_mean(
        linear_cross_entropy(h, w, inp.labels, reduction="none").float(), inp.labels), inp)


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


IMPLEMENTATIONS: dict[str, Callable] = {
    "naive": _build_naive,
    "compiled": _build_compiled,
    "torch_chunked": _build_torch_chunked,
    "fastweight_torch": _fastweight_builder("torch"),
    "fastweight_triton": _fastweight_builder("triton"),
    "liger": _build_liger,
    "cce": _build_cce,
}


def available_impls(device: str | torch.device) -> list[str]:
    """Implementations worth timing on ``device``: Triton and the GPU-only peers only on CUDA
    (the Triton interpreter is far too slow to time on the CPU)."""
    names = ["naive", "compiled", "torch_chunked", "fastweight_torch"]
    if torch.device(device).type == "cuda":
        if _importable("triton"):
            names.append("fastweight_triton")
        if _importable("liger_kernel.transformers"):
            names.append("liger")
        if _importable("cut_cross_entropy"):
            names.append("cce")
    return names


def build(impl: str, inp: Inputs, op: str, device) -> Callable[[], torch.Tensor]:
    return IMPLEMENTATIONS[impl](inp, op, device)


# ----------------------------------------------------------------------------------------------
# Timing and the floor
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
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def floor_flops(case: Case, op: str) -> float:
    return (6.0 if op == "fwd_bwd" else 2.0) * case.N * case.D * case.V


def gemm_fns(case: Case, op: str, device) -> list[Callable[[], torch.Tensor]]:
    """The matmuls alone at the case's shape: X@W.T (N,V); for fwd_bwd also G@W (N,D) and
    G.T@X (V,D), with preallocated outputs so only the GEMM is timed."""
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.N, case.D, dtype=dtype, device=device)
    w = torch.randn(case.V, case.D, dtype=dtype, device=device)
    logits = torch.empty(case.N, case.V, dtype=dtype, device=device)
    fns = [lambda: torch.mm(x, w.t(), out=logits)]
    if op == "fwd_bwd":
        dx = torch.empty(case.N, case.D, dtype=dtype, device=device)
        dw = torch.empty(case.V, case.D, dtype=dtype, device=device)
        fns += [lambda: torch.mm(logits, w, out=dx), lambda: torch.mm(logits.t(), x, out=dw)]
    return fns


def measure_floor(case: Case, op: str, device="cpu", warmup: int = 1, repeats: int = 3) -> float:
    """floor_ms: the sum of the median times of the case's GEMMs, measured now."""
    if op == "agg":
        return float("nan")
    fns = gemm_fns(case, op, device)
    total = sum(statistics.median(time_fn(f, device, warmup, repeats)) for f in fns)
    del fns
    gc.collect()
    return total


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------
_MIB = 1024.0 * 1024.0


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # best effort


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int:
    kib = _proc_status_kib("VmHWM")
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return (kib if kib is not None else ru) * 1024


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def tiny_case(case: Case) -> Case:
    return dataclasses.replace(case, name="warmup", B=1, T=min(case.T, 64), V=min(case.V, 1000),
                               prompt=min(case.prompt, 8))


def measure_peak_memory_inprocess(case: Case, op: str, impl: str, device="cpu") -> dict:
    """Peak memory of one call, in this process. On the CPU call it in a fresh process
    (``measure_peak_memory``); on CUDA it is reliable in-process."""
    dev = torch.device(device)
    # Warm torch up (threads, BLAS, allocator, lazy imports) before any baseline.
    warm_case = case if impl == "compiled" else tiny_case(case)
    warm = build_inputs(warm_case, device)
    out = build(impl, warm, op, device)()
    loss_warm = float(out.float().sum())
    del warm, out
    inp = build_inputs(case, device)
    fn = build(impl, inp, op, device)
    _release_memory()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        method = "torch.cuda.max_memory_allocated - inputs"
    else:
        reset = _reset_hwm()
        base = _rss_bytes()
        hwm_before = _hwm_bytes()
        loss = fn()
        peak = _hwm_bytes() - (base if reset else max(base, hwm_before))
        method = ("VmHWM (reset via clear_refs) - RSS after inputs" if reset
                  else "ru_maxrss - max(RSS, earlier high-water mark)")
    return {"peak_mem_mib": peak / _MIB, "loss": float(loss.float().sum()), "mem_method": method,
            "warmup_loss": loss_warm}


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
    cmd = [sys.executable, "-m", "benchmarks.harness", "--measure-memory", "--case", case.to_json(),
           "--op", op, "--impl", impl, "--device", str(device)]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"peak_mem_mib": float("nan"), "error": f"timeout after {timeout}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"peak_mem_mib": float("nan"),
            "error": f"rc={proc.returncode}: {proc.stderr.strip()[-2000:]}"}


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------
def device_name(device="cpu") -> str:
    """'cpu-<model-slug>' or 'cuda-<card-slug>', used in file names and records."""
    dev = torch.device(device)
    if dev.type == "cuda":
        model = torch.cuda.get_device_name(dev)
    else:
        model = cpu_model()
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    slug = re.sub(r"-?(r|tm|cpu|processor)-?(?=-|$)", "", slug).strip("-") or "unknown"
    return f"{dev.type}-{slug}"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
        return commit
    except Exception:
        return None


def machine_info(device="cpu") -> dict:
    info = {
        "device": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": None,
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with contextlib.suppress(Exception):
        import triton
        info["triton"] = triton.__version__
    with contextlib.suppress(Exception):
        import fastweight
        info["fastweight"] = fastweight.__version__
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def make_record(device, case: Case, op: str, impl: str, ms: float, floor_ms: float,
                peak_mem_mib: float = float("nan"), loss: float | None = None, **extra) -> dict:
    rec = {
        "device": device_name(device), "case": case.name, "op": op, "impl": impl,
        "N": case.N, "D": case.D, "V": case.V, "dtype": case.dtype,
        "ms": ms, "peak_mem_mib": peak_mem_mib, "floor_ms": floor_ms,
        "frac_of_floor": floor_ms / ms if ms and ms > 0 and floor_ms == floor_ms else None,
        "ratio_to_naive": None, "loss": loss,
    }
    if impl in NOTES:
        rec["note"] = NOTES[impl]
    rec.update(extra)
    return rec


def add_ratios(records: list[dict]) -> list[dict]:
    """Fill ratio_to_naive (ms / naive ms) and ratios {other impl: ms / other ms} among records
    of the same (device, case, op)."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r.get("ms") is not None and r["ms"] == r["ms"]:
            groups.setdefault((r["device"], r["case"], r["op"]), {})[r["impl"]] = r["ms"]
    for r in records:
        peers = groups.get((r["device"], r["case"], r["op"]), {})
        if r.get("ms") is None or r["ms"] != r["ms"]:
            continue
        naive = peers.get("naive")
        r["ratio_to_naive"] = r["ms"] / naive if naive else None
        r["ratios"] = {k: r["ms"] / v for k, v in peers.items() if k != r["impl"] and v}
    return records


def _json_safe(obj):
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def results_path(device="cpu", directory: Path | str | None = None, date: str | None = None) -> Path:
    date = date or _dt.date.today().isoformat()
    return Path(directory or RESULTS_DIR) / f"{device_name(device)}-{date}.json"


def write_results(records: list[dict], device="cpu", path: Path | str | None = None,
                  extra: dict | None = None, merge: bool = True) -> Path:
    """Write {"machine", "records"} JSON. With ``merge``, records of an existing file at the same
    path are kept unless the new ones replace the same (case, op, impl)."""
    path = Path(path) if path else results_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict] = []
    if merge and path.exists():
        with contextlib.suppress(Exception):
            old = json.loads(path.read_text()).get("records", [])
    new_keys = {(r["device"], r["case"], r["op"], r["impl"]) for r in records}
    merged = [r for r in old if (r["device"], r["case"], r["op"], r["impl"]) not in new_keys]
    merged += records
    add_ratios(merged)
    doc = {"machine": machine_info(device), "records": merged}
    if extra:
        doc.update(extra)
    path.write_text(json.dumps(_json_safe(doc), indent=1) + "\n")
    return path


def read_results(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------------------------
# One case end to end (standalone and GPU scripts)
# ----------------------------------------------------------------------------------------------
def run_case(case: Case, op: str, impl: str, device="cpu", floor_ms: float | None = None,
             warmup: int = 1, repeats: int = 3, memory: bool = True) -> dict:
    """Time (case, op, impl), measure its peak memory and return a record. Failures (e.g. no
    C++ compiler for torch.compile, out of memory) become a record with ``error``."""
    if floor_ms is None:
        floor_ms = measure_floor(case, op, device)
    try:
        inp = build_inputs(case, device)
        fn = build(impl, inp, op, device)
        loss = float(fn().float().sum())
        times = time_fn(fn, device, warmup=max(warmup - 1, 0), repeats=repeats)
        del fn, inp
        _release_memory()
    except Exception as exc:  # noqa: BLE001 - a failed implementation is a result too
        return make_record(device, case, op, impl, float("nan"), floor_ms,
                           error=f"{type(exc).__name__}: {str(exc)[:500]}")
    mem = measure_peak_memory(case, op, impl, device) if memory else {}
    return make_record(device, case, op, impl, statistics.median(times), floor_ms,
                       mem.get("peak_mem_mib", float("nan")), loss, times_ms=times,
                       **({"mem_error": mem["error"]} if "error" in mem else {}))


def run_cases(cases: list[Case], ops=("fwd_bwd", "score"), impls: list[str] | None = None,
              device="cpu", warmup: int = 1, repeats: int = 3, memory: bool = True,
              log=print) -> list[dict]:
    impls = impls or available_impls(device)
    records = []
    for case in cases:
        for op in ops:
            floor = measure_floor(case, op, device)
            for impl in impls:
                rec = run_case(case, op, impl, device, floor, warmup, repeats, memory)
                records.append(rec)
                if log:
                    log(f"{case.name:28s} {op:8s} {impl:18s} {rec['ms']:10.1f} ms  "
                        f"floor {floor:8.1f} ms  mem {rec['peak_mem_mib']:8.1f} MiB"
                        + (f"  ERROR {rec['error']}" if "error" in rec else ""))
    return add_ratios(records)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure-memory", action="store_true",
                    help="child mode: measure one (case, op, impl), print one JSON line")
    ap.add_argument("--case", help="Case as JSON")
    ap.add_argument("--op", default="fwd_bwd", choices=OPS)
    ap.add_argument("--impl", default="fastweight_torch")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.measure_memory:
        case = Case.from_json(args.case)
        try:
            out = measure_peak_memory_inprocess(case, args.op, args.impl, args.device)
        except Exception as exc:  # noqa: BLE001
            out = {"peak_mem_mib": None, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        print(json.dumps(_json_safe(out)), flush=True)
        return 0
    ap.error("nothing to do (use --measure-memory, or python -m benchmarks.foundation)")
    return 2


if __name__ == "__main__":
    sys.exit(_main())


# ----------------------------------------------------------------------------------------------
# The standard cases
# ----------------------------------------------------------------------------------------------
# Issue 2 item 7: 8 samples x 512 tokens, D=512, V=32000, fp32, FLOW-weighted mean, fwd+bwd.
FOUNDATION_CASE = make_case(4096, 512, 32000, "fp32", T=512)
FOUNDATION_IMPLS = ("fastweight_torch", "naive", "torch_chunked")


def sweep_cases(device="cpu") -> list[Case]:
    """The N x V sweep. On the CPU it is scaled down to fit the suite's time budget (D=512,
    N in {1k, 4k} at V=32k (N=4k, V=32k is the foundation case), V=128k only at N=1k). On CUDA: the full
    sweep N in 1k..16k x V in {32k, 128k, 256k}, D=2048, bf16."""
    if torch.device(device).type == "cuda":
        return [make_case(n, 2048, v, "bf16") for v in (32000, 128000, 256000)
                for n in (1024, 2048, 4096, 8192, 16384)]
    return [make_case(1024, 512, 32000), FOUNDATION_CASE, make_case(1024, 512, 128000)]
