"""fastweight: loss-weighted fine-tuning (FLOW) with a fused linear cross-entropy that never
materialises the (N, V) logits.

The public names are imported on first use (PEP 562), so that ``fastweight --help`` and the
other command-line parsers start without importing torch.
"""
from __future__ import annotations

from fastweight.lazy import lazy_attributes

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "weighted_ce": "fastweight.api",
    "sequence_losses": "fastweight.api",
    "flow_weights": "fastweight.flow",
    "flow_temperature": "fastweight.flow",
    "WeightedCrossEntropy": "fastweight.module",
    "token_coefficients": "fastweight.aggregation",
    "segment_mean": "fastweight.aggregation",
    "set_value_checks": "fastweight._validate",
}

__all__ = [*_PUBLIC, "__version__"]


__getattr__, __dir__ = lazy_attributes(__name__, _PUBLIC)
