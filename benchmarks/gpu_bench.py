"""The GPU benchmark of issue 3: fastweight's Triton path against its peers, in bf16, in one run.

For each case (Gemma-2-2B head: N=8192, D=2304, V=256000, softcap 30; Llama-3-8B head: N=8192,
D=4096, V=128256) and each op ("fwd_bwd": weighted mean loss + backward to hidden and weight;
"score": per-sample mean losses under no_grad), times fastweight (through the public API,
impl="triton"), naive PyTorch, torch.compile'd naive, PyTorch's chunked F.linear_cross_entropy,
Liger-Kernel and cut-cross-entropy (when importable). Each peer is wrapped so that a failure or
an out-of-memory is recorded, not fatal.

The floor is the matmul work (6*N*D*V for fwd_bwd, 2*N*D*V for score) over the best bf16 matmul
rate measured in this run (a square 8192^3 GEMM and the case's own three GEMMs).
peak_mem_gib is the CUDA high-water mark above the inputs and the gradients.

Writes benchmarks/results/gpu-<card>-<date>.json ({"machine", "matmul", "records"}) and
prints a table last.

    python benchmarks/gpu_bench.py                    # on a GPU (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_bench.py --dry-run --out /tmp/x.json   # tiny shapes on the CPU
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    {"case": "gemma2-2b-head", "N": 8192, "D": 2304, "V": 256000, "softcap": 30.0, "B": 8},
    {"case": "llama3-8b-head", "N": 8192, "D": 4096, "V": 128256, "softcap": None, "B": 8},
]
DRY_CASES = [
    {"case": "tiny-softcap", "N": 48, "D": 24, "V": 301, "softcap": 30.0, "B": 3},
    {"case": "tiny", "N": 40, "D": 32, "V": 257, "softcap": None, "B": 4},
]
IMPLS = ("fastweight", "naive", "torch_chunked", "liger", "cce", "compiled")
NOTES = {
    "fastweight": "fastweight.weighted_ce(impl='triton'), FLOW sample weights, mean over tokens; "
                  "score: fastweight.sequence_losses(impl='triton') under no_grad",
    "naive": "materialised logits (bf16) -> fp32 -> softcap -> cross_entropy, same weights as fastweight",
    "compiled": "torch.compile of the naive function",
    "torch_chunked": "F.linear_cross_entropy(options=LinearCrossEntropyOptions()); unweighted mean",
    "liger": "Liger-Kernel LigerFusedLinearCrossEntropyLoss; unweighted mean",
    "cce": "cut-cross-entropy linear_cross_entropy (default filter_eps); unweighted mean",
}


class Unavailable(Exception):
    """The implementation is not installed / not supported here: recorded as skipped."""


# ------------------------------------------------------------------------------------------------
# inputs and implementations
# ------------------------------------------------------------------------------------------------
def make_inputs(case, dtype, device, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    n, d, v, b = case["N"], case["D"], case["V"], case["B"]
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    # Logits of standard deviation ~3: a real head's spread, so the softcap matters a little.
    weight = (torch.randn(v, d, generator=g) * (3.0 / math.sqrt(d))).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    f = torch.rand(b, generator=g) * 4 + 1
    sample_weights = torch.exp(-f / f.median()).to(device)
    return hidden, weight, labels, sample_weights


def _seq_mean(tok, b):
    return tok.float().view(b, -1).mean(1)


def _naive_tokens(h, w, labels, softcap):
    import torch.nn.functional as F

    z = (h @ w.t()).float()
    if softcap is not None:
        z = softcap * (z / softcap).tanh()
    return F.cross_entropy(z, labels, reduction="none")


def _naive_weighted(h, w, labels, coeff, softcap):
    return (_naive_tokens(h, w, labels, softcap) * coeff).sum()


def _naive_score(h, w, labels, softcap, b):
    return _seq_mean(_naive_tokens(h, w, labels, softcap), b)


_COMPILED = {}


def build(impl, op, case, inputs, dry_run):
    """A zero-argument callable doing the work (for fwd_bwd: zero grads, loss, backward) and
    returning the loss, plus a note on deviations from the case (e.g. no softcap)."""
    import torch
    import torch.nn.functional as F

    hidden, weight, labels, sw = inputs
    cap, b = case["softcap"], case["B"]
    t = case["N"] // b
    coeff = (sw[:, None].expand(b, t).reshape(-1) / case["N"]).contiguous()
    note = ""

    if impl == "fastweight":
        import fastweight

        h3, l2 = hidden.view(b, t, -1), labels.view(b, t)
        if hasattr(fastweight, "weighted_ce"):
            loss_fn = lambda h, w: fastweight.weighted_ce(h.view(b, t, -1), w, l2, sw, softcap=cap, impl="triton")  # noqa: E731
            score_fn = lambda: fastweight.sequence_losses(h3, weight, l2, softcap=cap, impl="triton")  # noqa: E731
        else:  # before the public API existed: the backend directly
            from fastweight.kernels import linear_ce as K

            note = "backend called directly (no fastweight.weighted_ce)"

            class _F(torch.autograd.Function):
                @staticmethod
                def forward(ctx, h, w):
                    loss, dx, dw, _ = K.forward_backward(h, w, None, labels, coeff, softcap=cap)
                    ctx.save_for_backward(dx, dw)
                    return torch.dot(loss, coeff)

                @staticmethod
                def backward(ctx, g):
                    dx, dw = ctx.saved_tensors
                    return dx * g, dw * g

            loss_fn = _F.apply
            cu = torch.arange(0, case["N"] + 1, t, device=hidden.device)
            score_fn = lambda: K.sequence_forward(hidden, weight, None, labels, cu, softcap=cap)  # noqa: E731
    elif impl == "naive":
        loss_fn = lambda h, w: _naive_weighted(h, w, labels, coeff, cap)  # noqa: E731
        score_fn = lambda: _naive_score(hidden, weight, labels, cap, b)  # noqa: E731
    elif impl == "compiled":
        if dry_run:
            raise Unavailable("skipped in the dry run (needs a C++ toolchain and minutes)")
        fwd = _COMPILED.setdefault("fwd_bwd", torch.compile(_naive_weighted, dynamic=False))
        sc = _COMPILED.setdefault("score", torch.compile(_naive_score, dynamic=False))
        loss_fn = lambda h, w: fwd(h, w, labels, coeff, cap)  # noqa: E731
        score_fn = lambda: sc(hidden, weight, labels, cap, b)  # noqa: E731
    elif impl == "torch_chunked":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
        opts = torch.nn.LinearCrossEntropyOptions()
        if cap is not None:
            note = "no softcap support: timed without softcap"
        loss_fn = lambda h, w: F.linear_cross_entropy(h, w, labels, reduction="mean", options=opts)  # noqa: E731
        score_fn = lambda: _seq_mean(F.linear_cross_entropy(hidden, weight, labels, reduction="none",  # noqa: E731
                                                            options=opts), b)
    elif impl == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as exc:
            raise Unavailable(f"liger_kernel not importable ({type(exc).__name__})") from exc
        if hidden.device.type != "cuda":
            raise Unavailable("needs CUDA")

        def make(reduction):
            try:
                return LigerFusedLinearCrossEntropyLoss(reduction=reduction, softcap=cap)
            except TypeError:  # an old version without softcap
                return LigerFusedLinearCrossEntropyLoss(reduction=reduction)
        mean_mod, none_mod = make("mean"), make("none")
        loss_fn = lambda h, w: mean_mod(w, h, labels)  # noqa: E731
        score_fn = lambda: _seq_mean(none_mod(weight, hidden, labels), b)  # noqa: E731
    elif impl == "cce":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:
            raise Unavailable(f"cut_cross_entropy not importable ({type(exc).__name__})") from exc
        if hidden.device.type != "cuda":
            raise Unavailable("needs CUDA")
        loss_fn = lambda h, w: linear_cross_entropy(h, w, labels, softcap=cap, reduction="mean")  # noqa: E731
        score_fn = lambda: _seq_mean(linear_cross_entropy(hidden, weight, labels, softcap=cap,  # noqa: E731
                                                          reduction="none"), b)
    else:
        raise ValueError(impl)

    if op == "score":
        def run():
            with torch.no_grad():
                return score_fn()
        return run, note, None

    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)

    def run():
        h.grad = None
        w.grad = None
        loss = loss_fn(h, w)
        loss.backward()
        return loss.detach()
    return run, note, (h, w)


# ------------------------------------------------------------------------------------------------
# timing, memory, matmul rate
# ------------------------------------------------------------------------------------------------
def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def matmul_rates(cases, device, dtype, dry_run):
    """bf16 matmul rates (TFLOP/s): a square GEMM and each case's three GEMMs."""
    import torch

    rates = {}
    n = 256 if dry_run else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    bm = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    ms = statistics.median(time_ms(lambda: torch.mm(a, bm, out=c), device, 2, 3 if dry_run else 10))
    rates["square"] = {"shape": [n, n, n], "ms": ms, "tflops": 2 * n ** 3 / ms / 1e9}
    del a, bm, c
    for case in cases:
        N, D, V = case["N"], case["D"], case["V"]
        x = torch.randn(N, D, device=device, dtype=dtype)
        w = torch.randn(V, D, device=device, dtype=dtype)
        z = torch.empty(N, V, device=device, dtype=dtype) if dry_run else None
        if z is None:  # the (N, V) block is what the naive peers hold anyway; use a chunk for the rate
            z = torch.empty(min(N, 2048), V, device=device, dtype=dtype)
        xc = x[: z.shape[0]]
        dx = torch.empty_like(xc)
        dw = torch.empty_like(w)
        rows = z.shape[0]
        for name, fn in (("logits", lambda: torch.mm(xc, w.t(), out=z)), ("dx", lambda: torch.mm(z, w, out=dx)),
                         ("dw", lambda: torch.mm(z.t(), xc, out=dw))):
            ms = statistics.median(time_ms(fn, device, 1, 3 if dry_run else 5))
            rates[f"{case['case']}:{name}"] = {"shape": [rows, D, V], "ms": ms, "tflops": 2 * rows * D * V / ms / 1e9}
        del x, w, z, xc, dx, dw
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rates


def peak_extra_gib(fn, device, grads):
    """High-water mark of one call above what was allocated before it, less the gradients it
    leaves (the inputs' .grad), in GiB. CUDA only."""
    import torch

    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    if grads is not None:
        for t in grads:
            t.grad = None
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in grads if t.grad is not None) if grads else 0
    return (peak - base - grad_bytes) / 2 ** 30


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def card_slug(device):
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def machine(device):
    import torch

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "chunk_bytes_env": os.environ.get("FASTWEIGHT_TRITON_CHUNK_BYTES")}
    for mod in ("triton", "liger_kernel", "cut_cross_entropy", "fastweight"):
        with contextlib.suppress(Exception):
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "importable")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    ap.add_argument("--out", type=Path, help="output JSON path (default benchmarks/results/gpu-<card>-<date>.json)")
    ap.add_argument("--impl", action="append", choices=IMPLS, help="only these implementations (repeatable)")
    ap.add_argument("--op", action="append", choices=("fwd_bwd", "score"), help="only these ops")
    ap.add_argument("--case", action="append", help="only these case names")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="skip the remaining peers (never fastweight) once this much time has passed")
    args = ap.parse_args(argv)

    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16  # the interpreter's bf16 is broken
    cases = [c for c in (DRY_CASES if args.dry_run else CASES) if not args.case or c["case"] in args.case]
    ops = args.op or ["fwd_bwd", "score"]
    impls = args.impl or list(IMPLS)
    repeats = args.repeats or (2 if args.dry_run else 5)
    t_start = time.perf_counter()

    rates = matmul_rates(cases, device, dtype, args.dry_run)
    best = max(r["tflops"] for r in rates.values())
    print(f"matmul rate ({dtype}): " + ", ".join(f"{k} {v['tflops']:.1f}" for k, v in rates.items()) + " TFLOP/s",
          flush=True)

    records = []
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for case in cases:
        inputs = make_inputs(case, dtype, device)
        for op in ops:
            flops = (6.0 if op == "fwd_bwd" else 2.0) * case["N"] * case["D"] * case["V"]
            floor_ms = flops / (best * 1e9)
            for impl in impls:
                rec = {"device": dev_name, "case": case["case"], "op": op, "impl": impl, "ms": None,
                       "peak_mem_gib": None, "floor_ms": floor_ms, "N": case["N"], "D": case["D"],
                       "V": case["V"], "softcap": case["softcap"], "dtype": str(dtype).replace("torch.", ""),
                       "note": NOTES[impl]}
                if impl != "fastweight" and time.perf_counter() - t_start > args.budget_s:
                    rec["error"] = "skipped: time budget"
                    records.append(rec)
                    continue
                t0 = time.perf_counter()
                fn = grads = None
                try:
                    fn, note, grads = build(impl, op, case, inputs, args.dry_run)
                    if note:
                        rec["note"] += "; " + note
                    first = fn()  # compiles / autotunes
                    sync(device)
                    rec["loss"] = float(first.float().sum())
                    times = time_ms(fn, device, 1, repeats)
                    rec["ms"] = statistics.median(times)
                    rec["times_ms"] = times
                    rec["frac_of_floor"] = floor_ms / rec["ms"]
                    rec["peak_mem_gib"] = peak_extra_gib(fn, device, grads)
                except Unavailable as exc:
                    rec["error"] = f"unavailable: {exc}"
                except torch.cuda.OutOfMemoryError as exc:
                    rec["error"] = f"OOM: {str(exc).splitlines()[0][:300]}"
                except Exception as exc:  # noqa: BLE001 - a failing peer is a result, not the end
                    rec["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                    rec["traceback"] = traceback.format_exc()[-2000:]
                rec["wall_s"] = round(time.perf_counter() - t0, 2)
                records.append(rec)
                del fn, grads
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                ms = f"{rec['ms']:.2f} ms" if rec["ms"] is not None else rec.get("error", "")[:80]
                print(f"  {case['case']:16} {op:8} {impl:14} {ms}", flush=True)
        del inputs
        gc.collect()

    # ratios to every other implementation of the same (case, op)
    for r in records:
        if r["ms"] is None:
            continue
        peers = {p["impl"]: p["ms"] for p in records
                 if p["case"] == r["case"] and p["op"] == r["op"] and p["ms"] and p is not r}
        r["ratios"] = {k: r["ms"] / v for k, v in peers.items()}

    out = args.out or ROOT / "benchmarks" / "results" / f"gpu-{card_slug(device)}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine(device), "matmul": {"best_tflops": best, "rates": rates},
           "total_s": round(time.perf_counter() - t_start, 1), "records": records}
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")

    print(f"\nwrote {out}  (floor at {best:.4g} TFLOP/s, {doc['total_s']} s)")
    print(f"{'case':16} {'op':8} {'impl':14} {'ms':>9} {'floor%':>7} {'GiB':>6} {'vs fw':>6}  loss / error")
    for r in records:
        fw = next((p for p in records if p["case"] == r["case"] and p["op"] == r["op"]
                   and p["impl"] == "fastweight" and p["ms"]), None)
        if r["ms"] is None:
            print(f"{r['case']:16} {r['op']:8} {r['impl']:14} {'-':>9} {'-':>7} {'-':>6} {'-':>6}  {r.get('error', '')[:60]}")
            continue
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        vs = f"{r['ms'] / fw['ms']:.2f}" if fw else "-"
        print(f"{r['case']:16} {r['op']:8} {r['impl']:14} {r['ms']:9.2f} {100 * r['frac_of_floor']:6.1f}% "
              f"{mem:>6} {vs:>6}  {r.get('loss', float('nan')):.5g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
