"""The reusable core of fastweight's benchmarks: cases, implementations, timing, the GEMM floor,
peak memory and JSON results.

Everything here is plain functions so that the pytest-benchmark suite, the standalone foundation
benchmark and a GPU script can share it:

    case = Case("N4096-V32000", B=8, T=512, D=512, V=32000)
    floor = measure_floor(case, "fwd_bwd", device)           # three GEMMs alone, same run
    rec = run_case(case, "fwd_bwd", "fastweight_torch", device, floor_ms=floor, memory=True)
    write_results([rec, ...], device)                        # benchmarks/results/<device>-<date>.json
    print(format_table(records))                             # a short table

benchmarks/gpu_bench.py (the one-call GPU check) is a thin driver over this module: its cases are
GPU_CASES / GPU_DRY_CASES, its floor comes from ``matmul_rates`` and ``floor_at_rate``, and it
runs ``run_cases`` with a time budget.

Conventions
-----------
- ``op`` is "fwd_bwd" (weighted mean loss + backward to hidden and weight), "score"
  (per-sample mean token loss under no_grad, the FLOW scoring pass) or "agg" (the aggregation
  ops; their timing lives in the aggregation bench, the record format is shared).
- The floor is the matmul work alone, timed at the case's shape in the same run:
  X @ W.T, G @ W and G.T @ X for fwd_bwd (6*N*D*V flops), X @ W.T for score (2*N*D*V).
  ``frac_of_floor`` = floor_ms / ms (1.0 = as fast as the GEMMs alone). Alternatively the floor
  is the flops over the best rate of ``matmul_rates`` (a square GEMM and each case's GEMMs).
- A case may carry a logit ``softcap`` (Gemma-2's 30): every implementation that supports it
  applies it; one that cannot says so in the record's ``note``.
- Failures are records, not exceptions: ``error`` is "unavailable: ..." (not installed / not
  supported here), "OOM: ...", "skipped: ..." (time budget, or skipped by the caller) or the
  exception; ``ms`` is then null.
- Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what the inputs hold. On the CPU
  every (case, op, impl) runs in its own process (``python -m benchmarks.harness
  --measure-memory``): inputs are built, the implementation is warmed up (a tiny shape, or the
  real one for torch.compile, so that compilation is not counted), memory is released and the
  kernel's resident high-water mark is reset (``/proc/self/clear_refs``; falls back to
  ``ru_maxrss`` where that is unavailable); the result is the high-water mark minus the resident
  size just before the measured call. glibc's mmap threshold is pinned so freed blocks go back
  to the OS and cannot hide allocations. Records carry both ``peak_mem_mib`` and
  ``peak_mem_gib``; with ``exclude_grads`` (the GPU check) the gradients the call leaves in
  ``.grad`` are not counted.
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
import traceback
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
    softcap: float | None = None
    logit_std: float = 1.0  # the weight's scale: the logits' standard deviation

    @property
    def N(self) -> int:
        return self.B * self.T

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "Case":
        return Case(**json.loads(text))


def make_case(N: int, D: int, V: int, dtype: str = "fp32", T: int = 512, name: str | None = None,
              prompt_frac: float = 0.0, seed: int = 0, softcap: float | None = None,
              logit_std: float = 1.0) -> Case:
    """A case of N tokens in samples of T tokens (T shrinks when N < T)."""
    T = min(T, N)
    if N % T:
        raise ValueError(f"N={N} must be a multiple of T={T}")
    return Case(name or f"N{N}-D{D}-V{V}-{dtype}", B=N // T, T=T, D=D, V=V, dtype=dtype,
                prompt=int(T * prompt_frac), seed=seed, softcap=softcap, logit_std=logit_std)


@dataclasses.dataclass
class Inputs:
    hidden: torch.Tensor          # (B, T, D)
    weight: torch.Tensor          # (V, D)
    labels: torch.Tensor          # (B, T) int64, -100 on the prompt
    sample_weights: torch.Tensor  # (B,) fp32, FLOW-style exp(-f / median f)
    softcap: float | None = None  # the case's logit softcap


def build_inputs(case: Case, device: str | torch.device = "cpu") -> Inputs:
    """Deterministic inputs, created in place (no temporaries, so no RSS spike on the CPU).
    Logits come out with a standard deviation of about ``case.logit_std``."""
    dtype = DTYPES[case.dtype]
    g = torch.Generator(device="cpu").manual_seed(case.seed)
    hidden = torch.empty(case.B, case.T, case.D, dtype=dtype)
    hidden.normal_(0.0, 1.0, generator=g)
    weight = torch.empty(case.V, case.D, dtype=dtype)
    weight.normal_(0.0, case.logit_std / math.sqrt(case.D), generator=g)
    labels = torch.randint(0, case.V, (case.B, case.T), generator=g)
    labels[:, : case.prompt] = -100
    losses = torch.rand(case.B, generator=g) * 4 + 1
    sample_weights = torch.exp(-losses / losses.median())
    return Inputs(hidden.to(device), weight.to(device), labels.to(device), sample_weights.to(device),
                  case.softcap)


# ----------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------
# A builder takes (inputs, op, device) and returns a zero-argument callable that does the work
# and returns the loss tensor (a scalar for fwd_bwd, (B,) for score). For fwd_bwd the callable
# clears .grad and runs backward to hidden and weight; it carries ``.grads`` (the leaf tensors
# whose .grad it fills). A callable may carry ``.note``: a deviation from the case (e.g. no
# softcap). A builder raises ``Unavailable`` when the implementation is not installed or not
# supported here.

NOTES = {
    "naive": "materialised logits hidden @ W.T -> fp32 (-> softcap) + F.cross_entropy(reduction='none'), "
             "weighted sum of token losses / valid tokens (the same weights as fastweight)",
    "compiled": "torch.compile of the naive function",
    "torch_chunked": "F.linear_cross_entropy(options=LinearCrossEntropyOptions()); it has no "
                     "per-sample weights: fwd_bwd is timed with reduction='mean' (unweighted)",
    "fastweight_torch": "fastweight.weighted_ce(impl='torch'), chunked PyTorch path, FLOW sample "
                        "weights, mean over tokens; score: fastweight.sequence_losses(impl='torch')",
    "fastweight_triton": "fastweight.weighted_ce(impl='triton'), FLOW sample weights, mean over "
                         "tokens; score: fastweight.sequence_losses(impl='triton') under no_grad",
    "liger": "Liger-Kernel LigerFusedLinearCrossEntropyLoss; no per-sample weights: "
             "fwd_bwd timed with reduction='mean' (unweighted)",
    "cce": "cut-cross-entropy linear_cross_entropy (default filter_eps); no per-sample weights: "
           "fwd_bwd timed with reduction='mean' (unweighted)",
}
# Other names for an implementation (the GPU check calls fastweight's Triton path "fastweight").
ALIASES = {"fastweight": "fastweight_triton"}


class Unavailable(Exception):
    """The implementation is not installed or not supported here: recorded, not raised."""


def _coefficients(labels: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
    """(B, T) c_t = w_s(t) / #valid tokens, 0 on ignored tokens (sample_reduction='token')."""
    valid = labels != -100
    c = sample_weights[:, None].expand_as(labels) * valid
    return c / valid.sum().clamp_min(1)


def _segment_mean(tok: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    valid = (labels != -100).to(tok.dtype)
    return (tok * valid).sum(1) / valid.sum(1).clamp_min(1)


def _naive_token_losses(hidden, weight, labels, softcap=None):
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels.reshape(-1), reduction="none", ignore_index=-100)


def naive_weighted_loss(hidden, weight, labels, coeff, softcap=None):
    """Materialised logits + F.cross_entropy, the per-token losses weighted by ``coeff``."""
    return (_naive_token_losses(hidden, weight, labels, softcap) * coeff.reshape(-1)).sum()


def naive_sequence_losses(hidden, weight, labels, softcap=None):
    tok = _naive_token_losses(hidden, weight, labels, softcap)
    return _segment_mean(tok.view(labels.shape), labels)


def _fwd_bwd(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inp: Inputs, note: str = ""):
    h = inp.hidden.detach().requires_grad_(True)
    w = inp.weight.detach().requires_grad_(True)

    def run():
        h.grad = None
        w.grad = None
        loss = loss_fn(h, w)
        loss.backward()
        return loss.detach()
    run.grads = (h, w)
    run.note = note
    return run


def _score(score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inp: Inputs, note: str = ""):
    def run():
        with torch.no_grad():
            return score_fn(inp.hidden, inp.weight)
    run.grads = ()
    run.note = note
    return run


def _build_naive(inp: Inputs, op: str, device):
    cap = inp.softcap
    if op == "fwd_bwd":
        coeff = _coefficients(inp.labels, inp.sample_weights)
        return _fwd_bwd(lambda h, w: naive_weighted_loss(h, w, inp.labels, coeff, cap), inp)
    return _score(lambda h, w: naive_sequence_losses(h, w, inp.labels, cap), inp)


_COMPILED: dict = {}


def _build_compiled(inp: Inputs, op: str, device):
    cap = inp.softcap
    if op == "fwd_bwd":
        fn = _COMPILED.setdefault("fwd_bwd", torch.compile(naive_weighted_loss, dynamic=False))
        coeff = _coefficients(inp.labels, inp.sample_weights)
        return _fwd_bwd(lambda h, w: fn(h, w, inp.labels, coeff, cap), inp)
    fn = _COMPILED.setdefault("score", torch.compile(naive_sequence_losses, dynamic=False))
    return _score(lambda h, w: fn(h, w, inp.labels, cap), inp)


def _build_torch_chunked(inp: Inputs, op: str, device):
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
    opts = torch.nn.LinearCrossEntropyOptions()
    labels = inp.labels.reshape(-1)
    note = "no softcap support: timed without softcap" if inp.softcap is not None else ""
    if op == "fwd_bwd":
        return _fwd_bwd(lambda h, w: F.linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), w, labels, reduction="mean", ignore_index=-100,
            options=opts), inp, note)

    def score(h, w):
        tok = F.linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, labels, reduction="none",
                                     ignore_index=-100, options=opts)
        return _segment_mean(tok.float().view(inp.labels.shape), inp.labels)
    return _score(score, inp, note)


def _fastweight_builder(impl: str, chunk_bytes: int | None = None):
    def build(inp: Inputs, op: str, device):
        import fastweight
        if op == "fwd_bwd":
            return _fwd_bwd(lambda h, w: fastweight.weighted_ce(
                h, w, inp.labels, inp.sample_weights, reduction="mean", impl=impl,
                softcap=inp.softcap, chunk_bytes=chunk_bytes), inp)
        return _score(lambda h, w: fastweight.sequence_losses(
            h, w, inp.labels, impl=impl, softcap=inp.softcap, chunk_bytes=chunk_bytes), inp)
    return build


def _import_peer(module: str, device):
    try:
        mod = __import__(module, fromlist=["_"])
    except Exception as exc:
        raise Unavailable(f"{module.split('.')[0]} not importable ({type(exc).__name__})") from exc
    if torch.device(device).type != "cuda":
        raise Unavailable("needs CUDA")
    return mod


def _build_liger(inp: Inputs, op: str, device):
    Loss = _import_peer("liger_kernel.transformers", device).LigerFusedLinearCrossEntropyLoss
    labels = inp.labels.reshape(-1)
    note = ""

    def make(reduction):
        nonlocal note
        try:
            return Loss(reduction=reduction, ignore_index=-100, softcap=inp.softcap)
        except TypeError:  # an old version without softcap
            if inp.softcap is not None:
                note = "no softcap support: timed without softcap"
            return Loss(reduction=reduction, ignore_index=-100)
    if op == "fwd_bwd":
        mod = make("mean")
        return _fwd_bwd(lambda h, w: mod(w, h.reshape(-1, h.shape[-1]), labels), inp, note)
    mod = make("none")
    return _score(lambda h, w: _segment_mean(
        mod(w, h.reshape(-1, h.shape[-1]), labels).float().view(inp.labels.shape), inp.labels),
        inp, note)


def _build_cce(inp: Inputs, op: str, device):
    lce = _import_peer("cut_cross_entropy", device).linear_cross_entropy
    if op == "fwd_bwd":
        return _fwd_bwd(lambda h, w: lce(h, w, inp.labels, softcap=inp.softcap, reduction="mean"), inp)
    return _score(lambda h, w: _segment_mean(
        lce(h, w, inp.labels, softcap=inp.softcap, reduction="none").float(), inp.labels), inp)


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
    return IMPLEMENTATIONS[ALIASES.get(impl, impl)](inp, op, device)


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


def gemm_fns(case: Case, op: str, device, rows: int | None = None) -> list[Callable[[], torch.Tensor]]:
    """The matmuls alone at the case's shape: X@W.T (N,V); for fwd_bwd also G@W (N,D) and
    G.T@X (V,D), with preallocated outputs so only the GEMM is timed. ``rows`` caps N (a chunk
    of the tokens: the rate without holding the whole (N, V) block)."""
    dtype = DTYPES[case.dtype]
    n = min(case.N, rows) if rows else case.N
    x = torch.randn(n, case.D, dtype=dtype, device=device)
    w = torch.randn(case.V, case.D, dtype=dtype, device=device)
    logits = torch.empty(n, case.V, dtype=dtype, device=device)
    fns = [lambda: torch.mm(x, w.t(), out=logits)]
    if op == "fwd_bwd":
        dx = torch.empty(n, case.D, dtype=dtype, device=device)
        dw = torch.empty(case.V, case.D, dtype=dtype, device=device)
        fns += [lambda: torch.mm(logits, w, out=dx), lambda: torch.mm(logits.t(), x, out=dw)]
    return fns


def time_gemms(case: Case, op: str, device="cpu", warmup: int = 1, repeats: int = 3,
               rows: int | None = None) -> dict[str, dict]:
    """{"logits"|"dx"|"dw": {"shape": [n, D, V], "ms", "tflops"}}: each GEMM of ``gemm_fns``
    timed (median), measured now."""
    n = min(case.N, rows) if rows else case.N
    fns = gemm_fns(case, op, device, rows)
    out = {}
    for name, fn in zip(("logits", "dx", "dw"), fns):
        ms = statistics.median(time_fn(fn, device, warmup, repeats))
        out[name] = {"shape": [n, case.D, case.V], "ms": ms, "tflops": 2.0 * n * case.D * case.V / ms / 1e9}
    del fns
    _release_memory(device)
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
    sq = Case("square", B=1, T=square, D=square, V=square, dtype=dtype)
    rates = {"square": time_gemms(sq, "score", device, warmup + 1, 2 * repeats)["logits"]}
    for case in cases:
        for name, r in time_gemms(case, "fwd_bwd", device, warmup, repeats, rows).items():
            rates[f"{case.name}:{name}"] = r
    return rates


def best_rate(rates: dict[str, dict]) -> float:
    return max(r["tflops"] for r in rates.values())


def floor_at_rate(case: Case, op: str, tflops: float) -> float:
    """floor_ms: the op's matmul flops at ``tflops`` (e.g. ``best_rate(matmul_rates(...))``)."""
    return floor_flops(case, op) / (tflops * 1e9)


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------
_MIB = 1024.0 * 1024.0
CUDA_MEM_METHOD = "torch.cuda.max_memory_allocated - inputs"


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def rss_bytes() -> int:
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # best effort


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int:
    kib = _proc_status_kib("VmHWM")
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return (kib if kib is not None else ru) * 1024


def _release_memory(device=None) -> None:
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        return
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def cuda_peak_bytes(fn: Callable[[], torch.Tensor], exclude_grads: bool = False):
    """(peak bytes, the call's result): CUDA high-water mark of one call of ``fn`` above what is
    allocated before it; with ``exclude_grads``, less the gradients it leaves in ``fn.grads``."""
    grads = getattr(fn, "grads", ())
    for t in grads:
        t.grad = None
    _release_memory("cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    if exclude_grads:
        peak -= sum(t.grad.numel() * t.grad.element_size() for t in grads if t.grad is not None)
    return peak, out


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
def device_slug(device="cpu") -> str:
    """The card's or the CPU's model as a slug: 'nvidia-h100-80gb-hbm3', 'intel-xeon'."""
    dev = torch.device(device)
    model = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    return re.sub(r"-?(r|tm|cpu|processor)-?(?=-|$)", "", slug).strip("-") or "unknown"


def device_name(device="cpu") -> str:
    """'cpu-<model-slug>' or 'cuda-<card-slug>', used in file names and records."""
    return f"{torch.device(device).type}-{device_slug(device)}"


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
    for mod in ("triton", "fastweight", "liger_kernel", "cut_cross_entropy"):
        with contextlib.suppress(Exception):
            info[mod] = getattr(__import__(mod), "__version__", "importable")
    for var in ("FASTWEIGHT_CHUNK_BYTES", "FASTWEIGHT_TRITON_CHUNK_BYTES"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def make_record(device, case: Case, op: str, impl: str, ms: float, floor_ms: float,
                peak_mem_mib: float = float("nan"), loss: float | None = None, **extra) -> dict:
    rec = {
        "device": device_name(device), "case": case.name, "op": op, "impl": impl,
        "N": case.N, "D": case.D, "V": case.V, "dtype": case.dtype,
        "softcap": case.softcap,
        "ms": ms, "peak_mem_mib": peak_mem_mib,
        "peak_mem_gib": peak_mem_mib / 1024.0 if peak_mem_mib is not None else None,
        "floor_ms": floor_ms,
        "frac_of_floor": floor_ms / ms if ms and ms > 0 and floor_ms == floor_ms else None,
        "ratio_to_naive": None, "loss": loss,
    }
    note = NOTES.get(impl) or NOTES.get(ALIASES.get(impl, impl))
    deviation = extra.pop("note", None)
    if deviation:
        note = f"{note}; {deviation}" if note else deviation
    if note:
        rec["note"] = note
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


def results_path(device="cpu", directory: Path | str | None = None, date: str | None = None,
                 prefix: str | None = None) -> Path:
    """<directory>/<device>-<date>.json, or <prefix>-<model-slug>-<date>.json (e.g. the GPU
    check's gpu-<card>-<date>.json)."""
    date = date or _dt.date.today().isoformat()
    stem = f"{prefix}-{device_slug(device)}" if prefix else device_name(device)
    return Path(directory or RESULTS_DIR) / f"{stem}-{date}.json"


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


def _ok(r: dict) -> bool:
    return r.get("ms") is not None and r["ms"] == r["ms"]


def format_progress(rec: dict) -> str:
    """One line per record, while a run goes."""
    ms = f"{rec['ms']:10.2f} ms" if _ok(rec) else "         - ms"
    mem = rec.get("peak_mem_mib")
    mem = f"  mem {mem:8.1f} MiB" if mem is not None and mem == mem else ""
    err = f"  {rec['error'][:100]}" if rec.get("error") else ""
    return (f"  {rec['case']:16} {rec['op']:8} {rec['impl']:18} {ms}  floor {rec['floor_ms']:9.4g} ms"
            f"{mem}{err}")


def format_table(records: list[dict], ref: str = "fastweight", label: str = "fw") -> str:
    """A short table: ms, % of the floor, peak GiB, ratio to ``ref`` (the first impl whose name
    starts with it, per (case, op); headed "vs <label>"), and the loss or the error."""
    lines = [f"{'case':16} {'op':8} {'impl':18} {'ms':>9} {'floor%':>7} {'GiB':>6} {'vs ' + label:>6}  "
             "loss / error"]
    for r in records:
        base = next((p for p in records if p["case"] == r["case"] and p["op"] == r["op"]
                     and p["impl"].startswith(ref) and _ok(p)), None)
        head = f"{r['case']:16} {r['op']:8} {r['impl']:18}"
        if not _ok(r):
            lines.append(f"{head} {'-':>9} {'-':>7} {'-':>6} {'-':>6}  {(r.get('error') or '')[:60]}")
            continue
        gib = r.get("peak_mem_gib")
        mem = f"{gib:.2f}" if gib is not None and gib == gib else "-"
        frac = f"{100 * r['frac_of_floor']:6.1f}%" if r.get("frac_of_floor") else f"{'-':>7}"
        vs = f"{r['ms'] / base['ms']:.2f}" if base else "-"
        loss = r.get("loss")
        loss = f"{loss:.5g}" if loss is not None else ""
        lines.append(f"{head} {r['ms']:9.2f} {frac} {mem:>6} {vs:>6}  {loss}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# One case end to end (standalone and GPU scripts)
# ----------------------------------------------------------------------------------------------
def run_case(case: Case, op: str, impl: str, device="cpu", floor_ms: float | None = None,
             warmup: int = 1, repeats: int = 3, memory: bool = True, inputs: Inputs | None = None,
             exclude_grads: bool = False) -> dict:
    """Time (case, op, impl), measure its peak memory and return a record. The first call
    (compilation, autotuning) gives the loss and is not timed; ``warmup - 1`` more calls are not
    timed either. ``inputs``: reuse these (built from ``case``) instead of building them.
    Memory: on CUDA the same callable, in-process (``exclude_grads``: less the gradients it
    leaves); on the CPU a fresh process. Failures (not installed, no C++ compiler for
    torch.compile, out of memory) become a record with ``error``."""
    if floor_ms is None:
        floor_ms = measure_floor(case, op, device)
    cuda = torch.device(device).type == "cuda"
    t0 = time.perf_counter()
    fn = inp = None
    mem: dict = {}
    failure = None
    try:
        inp = inputs if inputs is not None else build_inputs(case, device)
        fn = build(impl, inp, op, device)
        loss = float(fn().float().sum())
        times = time_fn(fn, device, warmup=max(warmup - 1, 0), repeats=repeats)
        if memory and cuda:
            peak, _ = cuda_peak_bytes(fn, exclude_grads)
            mem = {"peak_mem_mib": peak / _MIB, "mem_method": CUDA_MEM_METHOD
                   + (" - gradients" if exclude_grads and fn.grads else "")}
        note = getattr(fn, "note", "")
    except Unavailable as exc:
        failure = {"error": f"unavailable: {exc}"}
    except torch.cuda.OutOfMemoryError as exc:
        failure = {"error": f"OOM: {(str(exc).splitlines() or [''])[0][:300]}"}
    except Exception as exc:  # noqa: BLE001 - a failed implementation is a result too
        failure = {"error": f"{type(exc).__name__}: {str(exc)[:500]}",
                   "traceback": traceback.format_exc()[-2000:]}
    del fn, inp
    _release_memory(device)
    if failure:
        return make_record(device, case, op, impl, float("nan"), floor_ms,
                           wall_s=round(time.perf_counter() - t0, 2), **failure)
    if memory and not cuda:
        mem = measure_peak_memory(case, op, impl, device)
    return make_record(device, case, op, impl, statistics.median(times), floor_ms,
                       mem.get("peak_mem_mib", float("nan")), loss, times_ms=times, note=note,
                       wall_s=round(time.perf_counter() - t0, 2),
                       **({"mem_method": mem["mem_method"]} if "mem_method" in mem else {}),
                       **({"mem_error": mem["error"]} if "error" in mem else {}))


def run_cases(cases: list[Case], ops=("fwd_bwd", "score"), impls: list[str] | None = None,
              device="cpu", warmup: int = 1, repeats: int = 3, memory: bool = True,
              log=print, floor: Callable[[Case, str], float] | None = None,
              budget_s: float | None = None, keep: tuple[str, ...] = (),
              skip: dict[str, str] | None = None, exclude_grads: bool = False) -> list[dict]:
    """run_case over cases x ops x impls, each case's inputs built once.
    floor(case, op) -> floor_ms (default ``measure_floor``). Once ``budget_s`` seconds have
    passed, the remaining implementations are recorded as "skipped: time budget", except those
    in ``keep``. ``skip`` {impl: reason}: recorded as "unavailable: <reason>" without running."""
    impls = impls or available_impls(device)
    floor = floor or (lambda c, o: measure_floor(c, o, device))
    skip = skip or {}
    t_start = time.perf_counter()
    records = []
    for case in cases:
        inputs = build_inputs(case, device)
        for op in ops:
            floor_ms = floor(case, op)
            for impl in impls:
                if impl in skip:
                    rec = make_record(device, case, op, impl, float("nan"), floor_ms,
                                      error=f"unavailable: {skip[impl]}")
                elif budget_s is not None and impl not in keep and time.perf_counter() - t_start > budget_s:
                    rec = make_record(device, case, op, impl, float("nan"), floor_ms,
                                      error="skipped: time budget")
                else:
                    rec = run_case(case, op, impl, device, floor_ms, warmup, repeats, memory,
                                   inputs, exclude_grads)
                records.append(rec)
                if log:
                    log(format_progress(rec))
        del inputs
        _release_memory(device)
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


# The one-call GPU check (issue 3 item 7, benchmarks/gpu_bench.py): two real LM heads in bf16,
# logits of standard deviation ~3 (a real head's spread, so the softcap matters a little).
GPU_CASES = [
    Case("gemma2-2b-head", B=8, T=1024, D=2304, V=256000, dtype="bf16", softcap=30.0, logit_std=3.0),
    Case("llama3-8b-head", B=8, T=1024, D=4096, V=128256, dtype="bf16", logit_std=3.0),
]
# Its dry run on the CPU (the Triton interpreter; its bf16 is broken, hence fp32).
GPU_DRY_CASES = [
    Case("tiny-softcap", B=3, T=16, D=24, V=301, softcap=30.0, logit_std=3.0),
    Case("tiny", B=4, T=10, D=32, V=257, logit_std=3.0),
]
