"""fastweight: loss-weighted fine-tuning (FLOW) with a fused linear cross-entropy that never
materialises the (N, V) logits.

The public API is below. It is imported on first use, so that ``import fastweight`` (and the
``fastweight`` command's ``--help``) does not pay for torch and Triton.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "weighted_ce": "fastweight.api",
    "sequence_losses": "fastweight.api",
    "WeightedCEOutput": "fastweight.api",
    "flow_weights": "fastweight.flow",
    "flow_temperature": "fastweight.flow",
    "WeightedCrossEntropy": "fastweight.module",
    "token_coefficients": "fastweight.aggregation",
    "segment_mean": "fastweight.aggregation",
    "set_value_checks": "fastweight.validation",
    "retain_graph_safe": "fastweight.linear_ce.ops",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # static tools see the real imports
    from fastweight.aggregation import segment_mean, token_coefficients
    from fastweight.api import WeightedCEOutput, sequence_losses, weighted_ce
    from fastweight.flow import flow_temperature, flow_weights
    from fastweight.linear_ce.ops import retain_graph_safe
    from fastweight.module import WeightedCrossEntropy
    from fastweight.validation import set_value_checks


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastweight' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
