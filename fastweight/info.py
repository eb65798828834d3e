"""``fastweight info``: which backend each op will use on each device, and why."""
from __future__ import annotations

import argparse
import os

import torch

from fastweight import __version__, dispatch


def report() -> list[tuple[str, str, str, str]]:
    """Rows (op, device, backend, reason)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        name, why = dispatch.resolve_linear_ce("auto", device)
        rows.append(("weighted_ce / sequence_losses", device.type, name, why))
        try:
            agg, agg_why = dispatch.resolve_aggregation(device)
        except Exception as exc:  # a bad FASTWEIGHT_AGG_IMPL is worth showing, not crashing on
            agg, agg_why = "error", str(exc)
        for op in ("token_coefficients", "segment_mean"):
            rows.append((op, device.type, agg, agg_why))
    return rows


def run(args: argparse.Namespace) -> int:
    print(f"fastweight {__version__}, torch {torch.__version__}, "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    for var in ("FASTWEIGHT_IMPL", "FASTWEIGHT_AGG_IMPL", "FASTWEIGHT_CHUNK_BYTES",
                "FASTWEIGHT_CHECK_VALUES", "FASTWEIGHT_BUILD_EXT", "TRITON_INTERPRET"):
        if var in os.environ:
            print(f"  {var}={os.environ[var]}")
    rows = report()
    widths = [max(len(r[i]) for r in rows + [("op", "device", "backend", "why")]) for i in range(3)]
    print(f"{'op':<{widths[0]}}  {'device':<{widths[1]}}  {'backend':<{widths[2]}}  why")
    for op, dev, name, why in rows:
        print(f"{op:<{widths[0]}}  {dev:<{widths[1]}}  {name:<{widths[2]}}  {why}")
    return 0
