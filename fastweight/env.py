"""Every environment variable fastweight reads, declared in one place.

``python -m fastweight info`` lists them with their current values; code reads them only
through :func:`get`, so this table cannot fall behind the code.
"""
from __future__ import annotations

import os

VARIABLES: dict[str, str] = {
    "FASTWEIGHT_IMPL": "overrides impl='auto' of weighted_ce: triton | torch (chunked PyTorch) | reference",
    "FASTWEIGHT_AGG_IMPL": "overrides the aggregation ops' 'auto': ext (C++/CUDA) | triton | torch",
    "FASTWEIGHT_CHUNK_BYTES": "working-memory budget of the linear-CE backends (bytes); "
                              "default per backend, see `chunk_bytes` in weighted_ce",
    "FASTWEIGHT_CHECK_VALUES": "0 turns off the value checks (label range, weights, cu_seqlens, num_items)",
    "FASTWEIGHT_BUILD_EXT": "0: never build or load the C++/CUDA extension fastweight._C",
    "FASTWEIGHT_EXT_PREBUILT": "0: ignore a prebuilt fastweight._C and JIT-build instead",
    "FASTWEIGHT_CACHE": "folder of JIT builds (default $XDG_CACHE_HOME/fastweight or ~/.cache/fastweight)",
}


def get(name: str, default: str | None = None) -> str | None:
    """The value of a declared variable, stripped; ``default`` when unset or empty."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not a declared fastweight environment variable")
    value = os.environ.get(name, "").strip()
    return value or default


def flag(name: str, default: bool = True) -> bool:
    """A declared on/off variable: 0, false, no and off read as False."""
    value = get(name)
    if value is None:
        return default
    return value.lower() not in ("0", "false", "no", "off")


def current() -> dict[str, str | None]:
    """Every declared variable and its value (None when unset)."""
    return {name: os.environ.get(name) for name in VARIABLES}
