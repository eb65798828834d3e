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

A thin driver: cases, implementations, timing, floor, memory, records, JSON and the table are
benchmarks/harness.py's (GPU_CASES, run_cases, matmul_rates, write_results, format_table).

    python benchmarks/gpu_bench.py                    # on a GPU (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_bench.py --dry-run --out /tmp/x.json   # tiny shapes on the CPU
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("fastweight", "naive", "torch_chunked", "liger", "cce", "compiled")


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
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton (and the harness) is imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
        return 2
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import harness as H

    device = "cpu" if args.dry_run else "cuda"
    cases = [c for c in (H.GPU_DRY_CASES if args.dry_run else H.GPU_CASES) if not args.case or c.name in args.case]
    t_start = time.perf_counter()

    rates = H.matmul_rates(cases, device, square=256 if args.dry_run else 8192,
                           rows=None if args.dry_run else 2048, repeats=3 if args.dry_run else 5)
    best = H.best_rate(rates)
    print(f"matmul rate ({cases[0].dtype if cases else '-'}): "
          + ", ".join(f"{k} {v['tflops']:.1f}" for k, v in rates.items()) + " TFLOP/s", flush=True)

    records = H.run_cases(
        cases, ops=args.op or ["fwd_bwd", "score"], impls=args.impl or list(IMPLS), device=device,
        warmup=2, repeats=args.repeats or (2 if args.dry_run else 5), memory=not args.dry_run,
        floor=lambda case, op: H.floor_at_rate(case, op, best), budget_s=args.budget_s,
        keep=("fastweight",), exclude_grads=True,
        skip={"compiled": "skipped in the dry run (needs a C++ toolchain and minutes)"} if args.dry_run else None,
        log=lambda line: print(line, flush=True))

    total_s = round(time.perf_counter() - t_start, 1)
    out = H.write_results(records, device, args.out or H.results_path(device, prefix="gpu"), merge=False,
                          extra={"matmul": {"best_tflops": best, "rates": rates}, "total_s": total_s})
    print(f"\nwrote {out}  (floor at {best:.4g} TFLOP/s, {total_s} s)")
    print(H.format_table(records, ref="fastweight"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
