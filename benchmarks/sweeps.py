"""The sweeps that choose fastweight's Triton defaults, run by ``gpu_bench.py`` after its cases.

- ``row_kernel_sweep``: the row kernel alone on one (rows, V) logits block, at each launch
  configuration of ``ROW_SWEEP_CONFIGS``, forward (one read of the block) and fwd_bwd (read, read,
  write), in ms and in TB/s of those passes. Chooses ``kernels/linear_ce.py``'s ``ROW_CONFIGS``
  and ``FAST_TANH``.
- ``chunk_sweep``: a whole case through the public API at each chunk budget, with the one- and
  the two-stream schedule. Chooses ``DEFAULT_CHUNK_BYTES`` and ``OVERLAP``.

Each returns records (dicts); a failure is a record with ``error``, and so is a measurement
skipped because ``deadline`` (a ``time.perf_counter()`` value) has passed.
"""
from __future__ import annotations

import statistics
import time

import torch

from benchmarks.cases import DTYPES, Case, build_inputs
from benchmarks.measure import release_memory, synchronize, time_fn
from benchmarks.peers import fastweight_builder

# The default first; then the neighbours the H200 baseline sweep found close; then, under a
# bounded softcap only (elsewhere they would repeat the exact ones), the fast tanh.
ROW_SWEEP_CONFIGS = (
    {"BLOCK_M": 1, "BLOCK_V": 4096, "num_warps": 8},
    {"BLOCK_M": 1, "BLOCK_V": 4096, "num_warps": 16},
    {"BLOCK_M": 1, "BLOCK_V": 8192, "num_warps": 16},
    {"BLOCK_M": 1, "BLOCK_V": 8192, "num_warps": 8},
    {"BLOCK_M": 1, "BLOCK_V": 2048, "num_warps": 4},
    {"BLOCK_M": 2, "BLOCK_V": 4096, "num_warps": 8},
    {"BLOCK_M": 1, "BLOCK_V": 4096, "num_warps": 8, "FAST_TANH": True},
    {"BLOCK_M": 1, "BLOCK_V": 4096, "num_warps": 16, "FAST_TANH": True},
)
CHUNK_SWEEP_BYTES = (512 << 20, 896 << 20, 1008 << 20, 2048 << 20)


def _time_launch(launch, restore, device, repeats: int) -> list[float]:
    """ms of ``launch()`` alone, ``restore()`` (untimed) before each call."""
    cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(repeats):
        restore()
        synchronize(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            launch()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            launch()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _settings(config: dict, dtype: torch.dtype) -> dict:
    """What the row kernel's launcher runs with ``config`` for logits of ``dtype``."""
    from fastweight.kernels import linear_ce as K
    return {**K.row_config(dtype), "FAST_TANH": K.fast_tanh_default(dtype), **config}


def _late(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() > deadline


def row_kernel_sweep(vocab: int, softcap: float | None, device, rows: int = 2048, dtype: str = "bf16",
                     configs=ROW_SWEEP_CONFIGS, repeats: int = 10, name: str = "",
                     deadline: float | None = None) -> list[dict]:
    """Time ``_ce_rows_kernel`` on a (rows, vocab) block of logits (std 3, every row counted)
    at each config, forward and fwd_bwd."""
    from fastweight.kernels import linear_ce as K

    torch_dtype = DTYPES[dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    source = (torch.randn(rows, vocab, generator=g) * 3).to(device, torch_dtype)
    logits = torch.empty_like(source)
    targets = torch.randint(0, vocab, (rows,), generator=g).to(device)
    coeff = torch.full((rows,), 1.0 / rows, device=device)
    loss, lse = (torch.empty(rows, device=device) for _ in range(2))
    block_bytes = rows * vocab * source.element_size()
    bounded = softcap is not None and 0 < softcap <= K.BOUNDED_SOFTCAP
    configs = [c for c in configs if bounded or not c.get("FAST_TANH")]
    records = []
    for mode, grad, passes in (("forward", False, 1), ("fwd_bwd", True, 3)):
        for config in configs:
            record = {"name": name, "vocab": vocab, "softcap": softcap, "rows": rows, "dtype": dtype, "mode": mode,
                      "config": dict(config), "default": _settings(config, torch_dtype) == _settings({}, torch_dtype)}
            if _late(deadline):
                records.append({**record, "error": "skipped: time budget"})
                continue
            try:
                def launch():
                    K._launch_rows(logits, targets, coeff if grad else None, None, loss, lse, None, softcap,
                                   0.0, 0.0, grad, config)
                launch()  # compile
                times = _time_launch(launch, lambda: logits.copy_(source), device, repeats)
                ms = statistics.median(times)
                record.update(ms=ms, times_ms=times, tbps=passes * block_bytes / (ms * 1e-3) / 1e12)
            except Exception as exc:  # noqa: BLE001 - a config that fails is a result too
                record["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            records.append(record)
    del source, logits
    release_memory(device)
    return records


def chunk_sweep(case: Case, device, budgets=CHUNK_SWEEP_BYTES, overlaps=(False, True),
                ops=("fwd_bwd", "score"), repeats: int = 3, deadline: float | None = None) -> list[dict]:
    """Time ``case`` through fastweight's public API (impl="triton") at each chunk budget, with
    each stream schedule."""
    inputs = build_inputs(case, device)
    records = []
    for op in case.timed_ops(list(ops)):
        for budget in budgets:
            for overlap in overlaps:
                record = {"case": case.name, "op": op, "chunk_bytes": budget, "chunk_mib": budget / 2**20,
                          "overlap": overlap}
                if _late(deadline):
                    records.append({**record, "error": "skipped: time budget"})
                    continue
                try:
                    fn = fastweight_builder("triton", chunk_bytes=budget, defaults={"OVERLAP": overlap})(inputs, op, device)
                    record["loss"] = float(fn().float().sum())
                    times = time_fn(fn, device, warmup=1, repeats=repeats)
                    record.update(ms=statistics.median(times), times_ms=times)
                except Exception as exc:  # noqa: BLE001 - an out-of-memory is a result too
                    record["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                records.append(record)
                release_memory(device)
    del inputs
    release_memory(device)
    return records


def format_row_sweep(records: list[dict]) -> str:
    lines = []
    for r in records:
        cfg = r["config"]
        label = (f"M{cfg['BLOCK_M']} V{cfg['BLOCK_V']} w{cfg['num_warps']}" + (" tanh.approx" if cfg.get("FAST_TANH") else "")
                 + (" (default)" if r["default"] else ""))
        figure = f"{r['ms']:.3f} ms, {r['tbps']:.2f} TB/s" if "ms" in r else r["error"][:80]
        lines.append(f"row sweep {r['name'] or r['vocab']} {r['mode']:7} {label:22} {figure}")
    return "\n".join(lines)


def format_chunk_sweep(records: list[dict]) -> str:
    return "\n".join(f"chunk sweep {r['case']} {r['op']:7} {r['chunk_mib']:8.3f} MiB "
                     f"{'two streams' if r['overlap'] else 'one stream ':11} "
                     + (f"{r['ms']:.2f} ms" if "ms" in r else r["error"][:80]) for r in records)
