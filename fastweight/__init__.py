"""fastweight: loss-weighted fine-tuning (FLOW) with a fused linear cross-entropy that never
materialises the (N, V) logits."""
from fastweight._validate import set_value_checks
from fastweight.aggregation import segment_mean, token_coefficients
from fastweight.api import sequence_losses, weighted_ce
from fastweight.flow import flow_temperature, flow_weights
from fastweight.module import WeightedCrossEntropy

__version__ = "0.1.0"

__all__ = [
    "weighted_ce",
    "sequence_losses",
    "flow_weights",
    "flow_temperature",
    "WeightedCrossEntropy",
    "token_coefficients",
    "segment_mean",
    "set_value_checks",
    "__version__",
]
