"""The one-call GPU benchmark: fastweight's Triton path against its peers, in bf16, in one run.

Cases (``benchmarks.cases.GPU_CASES``): the Gemma-2-2B head (N=8192, D=2304, V=256000,
softcap 30) and the Llama-3-8B head (N=8192, D=4096, V=128256), each "fwd_bwd" (FLOW-weighted
mean loss + backward to hidden and weight) and "score" (per-sample mean losses under no_grad);
and the Llama head frozen (``weight.requires_grad=False``: hidden gets a gradient, the head
none), "fwd_bwd" only. Implementations: fastweight (public API, impl="triton") and three
variants of it that are not peers (``fastweight_overlap``: two streams, half-size chunks;
``fastweight_fast_tanh``: the hardware tanh, under Gemma's softcap only; ``fastweight_2gib``:
2 GiB chunks), torch.compile'd naive, Liger-Kernel, cut-cross-entropy,
naive PyTorch (the library's reference), PyTorch's chunked F.linear_cross_entropy, each when
available; a failure or an out-of-memory is a record. Then fastweight and its overlap and
fast-tanh variants are profiled (``benchmarks.measure.kernel_breakdown``): GEMM, row-kernel and other kernel time
per call, and how busy the GPU was. Last, ``benchmarks.sweeps``: the row kernel alone at
several launch configs, and each head at several chunk budgets with one and two streams.

The floor is the matmul work (6*N*D*V for fwd_bwd, 4*N*D*V with a frozen head, 2*N*D*V for
score) at the best bf16 matmul rate measured in this run (a square 8192^3 GEMM and the cases'
own GEMMs). peak_mem_gib is the CUDA high-water mark above the inputs and the gradients.

Writes ``benchmarks/results/gpu-<card>-<date>.json`` ({"machine", "matmul", "records",
"verdicts", "profiles", "sweeps", "total_s"}, rewritten after each case) and a PNG beside it, then prints a table and,
last, one PASS/SHORT line per (case, op) against the speed goal (``benchmarks.goals``).

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
# fastweight and its own variants (never cut by the time budget), then the strongest peers
# first, so that the budget cuts the weakest.
IMPLS = ("fastweight", "fastweight_overlap", "fastweight_fast_tanh", "fastweight_2gib", "compiled", "liger", "cce",
         "naive", "torch_chunked")
# Profiled per (case, op) after the timings, where they apply: where their time goes.
PROFILED = ("fastweight", "fastweight_overlap", "fastweight_fast_tanh")


def profile_case(case, ops, impls, device) -> list[dict]:
    """``kernel_breakdown`` of each impl on each op of ``case`` (a failure is a record too; an
    impl that does not apply to the case is left out), each printed as one line."""
    from benchmarks.cases import build_inputs
    from benchmarks.measure import kernel_breakdown, release_memory
    from benchmarks.peers import Unavailable, build

    inputs = build_inputs(case, device)
    out = []
    for op in case.timed_ops(ops):
        for impl in impls:
            record = {"case": case.name, "op": op, "impl": impl}
            try:
                run = build(impl, inputs, op, device)
            except Unavailable:  # a variant that does not apply here (its timing record says why)
                continue
            try:
                record.update(kernel_breakdown(run, device))
                groups = ", ".join(f"{k} {v:.2f}" for k, v in record["groups"].items())
                print(f"profile {case.name} {op} {impl}: {groups} ms; kernels {record['kernel_ms']:.2f} ms "
                      f"in {record['wall_ms']:.2f} ms wall (busy {record['busy']:.2f})", flush=True)
            except Exception as exc:  # noqa: BLE001 - a failed profile is a record, not the end
                record["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"profile {case.name} {op} {impl}: failed: {record['error']}", flush=True)
            out.append(record)
            release_memory(device)
    del inputs
    release_memory(device)
    return out


def run_sweeps(cases, device, dry_run: bool, deadline: float | None = None) -> dict:
    """``benchmarks.sweeps`` on each head of ``cases`` (frozen-head cases share their head's
    row kernel): row-kernel launch configs, then chunk budgets x stream schedules; what would
    start after ``deadline`` (a perf_counter value) is recorded as skipped."""
    from benchmarks import sweeps

    heads = [c for c in cases if not c.frozen_head]
    rows, repeats = (16, 1) if dry_run else (2048, 10)
    configs = sweeps.ROW_SWEEP_CONFIGS[:2] if dry_run else sweeps.ROW_SWEEP_CONFIGS
    row = []
    for case in heads:
        row += sweeps.row_kernel_sweep(case.V, case.softcap, device, rows=rows, dtype=case.dtype, configs=configs,
                                       repeats=repeats, name=case.name, deadline=deadline)
    print(sweeps.format_row_sweep(row), flush=True)
    chunks = []
    for case in heads:
        # On the CPU: budgets of a few rows, so that there are several chunks.
        budgets = (case.V * 4 * 8, case.V * 4 * 20) if dry_run else sweeps.CHUNK_SWEEP_BYTES
        chunks += sweeps.chunk_sweep(case, device, budgets=budgets, repeats=1 if dry_run else 3, deadline=deadline)
    print(sweeps.format_chunk_sweep(chunks), flush=True)
    return {"row_kernel": row, "chunks": chunks}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    parser.add_argument("--out", type=Path, help="output JSON (default benchmarks/results/gpu-<card>-<date>.json)")
    parser.add_argument("--impl", action="append", choices=IMPLS, help="only these implementations (repeatable)")
    parser.add_argument("--op", action="append", choices=("fwd_bwd", "score"), help="only these ops")
    parser.add_argument("--case", action="append", help="only these case names")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="skip the remaining peers (never fastweight) once this much time has passed")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    parser.add_argument("--no-profile", action="store_true", help="do not profile fastweight's kernels")
    parser.add_argument("--no-sweeps", action="store_true",
                        help="skip the row-kernel config and chunk-budget sweeps (benchmarks.sweeps)")
    args = parser.parse_args(argv)

    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
        return 2
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.dry_run:
        from fastweight.testing import patch_triton_interpreter
        patch_triton_interpreter()  # the interpreter runs the kernels here, as in the test suite
    from benchmarks import goals, plot
    from benchmarks.cases import GPU_CASES, GPU_DRY_CASES
    from benchmarks.measure import best_rate, floor_at_rate, matmul_rates
    from benchmarks.results import format_table, results_path, write_results
    from benchmarks.runner import run_cases

    device = "cpu" if args.dry_run else "cuda"
    cases = [c for c in (GPU_DRY_CASES if args.dry_run else GPU_CASES) if not args.case or c.name in args.case]
    if not cases:
        print(f"gpu_bench: no case named {args.case}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rates = matmul_rates(cases, device, square=256 if args.dry_run else 8192,
                         rows=None if args.dry_run else 2048, repeats=3 if args.dry_run else 5)
    best = best_rate(rates)
    print(f"matmul rate ({cases[0].dtype}): " + ", ".join(f"{k} {v['tflops']:.1f}" for k, v in rates.items())
          + " TFLOP/s", flush=True)

    out = args.out or results_path(device, prefix="gpu")
    records: list[dict] = []
    profiles: list[dict] = []
    impls = args.impl or list(IMPLS)

    def save(**extra) -> None:  # rewritten after each case: a cut-short run keeps what it measured
        write_results(records, device, out, merge=False,
                      extra={"matmul": {"best_tflops": best, "rates": rates}, "verdicts": goals.verdicts(records),
                             "profiles": profiles, **extra, "total_s": round(time.perf_counter() - start, 1)})

    for case in cases:
        remaining = None if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
        records += run_cases(
            [case], ops=args.op or ["fwd_bwd", "score"], impls=impls, device=device,
            warmup=2, repeats=args.repeats or (2 if args.dry_run else 5), memory=not args.dry_run,
            floor=lambda c, op: floor_at_rate(c, op, best), budget_s=remaining,
            keep=tuple(i for i in IMPLS if i.startswith("fastweight")),
            exclude_grads=True, log=lambda line: print(line, flush=True),
            skip={"compiled": "skipped in the dry run (needs a C++ toolchain and minutes)"} if args.dry_run else None)
        if not args.no_profile:
            profiles += profile_case(case, args.op or ["fwd_bwd", "score"],
                                     [i for i in PROFILED if i in impls], device)
        save()

    # The sweeps come after every case is judged, and only within the time budget, so that the
    # verdict lines are still printed, last, before gpu_check.sh's timeout.
    over_budget = args.budget_s is not None and time.perf_counter() - start > args.budget_s
    if over_budget and not args.no_sweeps:
        print("gpu_bench: sweeps skipped: time budget", flush=True)
    if not args.no_sweeps and not over_budget:
        # gpu_check.sh gives the bench budget_s + 60 s: leave 20 of them for the plot and the verdicts.
        deadline = None if args.budget_s is None else start + args.budget_s + 40
        save(sweeps=run_sweeps(cases, device, args.dry_run, deadline))

    print(f"\nwrote {out}  (floor at {best:.4g} TFLOP/s, {time.perf_counter() - start:.1f} s)")
    if not args.no_plot:
        try:
            for png in plot.plot_files([out]):
                print(f"plot: {png}")
        except Exception as exc:  # noqa: BLE001 - the JSON is the result; a plot is a view of it
            print(f"gpu_bench: plotting failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(format_table(records, ref="fastweight"))
    print("\n".join(goals.format_verdict(v) for v in goals.verdicts(records)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
