"""``fastweight info``: which backend each op will use on each device, and why."""
from __future__ import annotations

import argparse


OPS = {"linear_ce": "weighted_ce / sequence_losses", "aggregation": "token_coefficients / segment_mean"}


def report() -> list[tuple[str, str, str, str, str]]:
    """Rows (op, device, dtype, backend, reason): the registry's decision for "auto"."""
    import torch

    from fastweight import backends

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for op, label in OPS.items():
            # aggregation backends are chosen by accumulation dtype: fp32, or fp64 for fp64 runs
            dtypes = (torch.bfloat16, torch.float32, torch.float64) if op == "linear_ce" else (torch.float32, torch.float64)
            for dtype in dtypes:
                try:
                    backend, why = backends.resolve(op, "auto", device, dtype)
                    name = backend.name
                except (RuntimeError, ValueError) as exc:  # worth showing, not crashing on
                    name, why = "error", str(exc)
                rows.append((label, device.type, str(dtype).removeprefix("torch."), name, why))
    return rows


def run(args: argparse.Namespace) -> int:
    """Print the versions, every FASTWEIGHT_* variable and the backend of each op."""
    import os

    import torch

    from fastweight import __version__, env

    print(f"fastweight {__version__}, torch {torch.__version__}, "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    print("environment:")
    for var, value in env.current().items():
        print(f"  {var}={'' if value is None else value}  ({'unset: ' if value is None else ''}{env.VARIABLES[var]})")
    print(f"  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
    rows = report()
    header = ("op", "device", "dtype", "backend", "why")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    for row in [header] + rows:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row[:4], widths)) + "  " + row[4])
    return 0
