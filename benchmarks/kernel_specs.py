"""What the AOT compile check compiles: every Triton kernel at every launch configuration and
constexpr variant its launcher can use, built from the kernels' public launch configurations
(``linear_ce.ROW_CONFIGS`` / ``row_config()``, ``linear_ce.SCALE_CONFIG``, ``aggregation.CONFIG``).

Test-only code: production modules never import it. A kernel's arguments are read from its
``@triton.jit`` signature; each non-constexpr argument takes its type from the tables below, and
each constexpr its value from the variant (or the kernel's default). A kernel argument missing
from a table is an error that names it, so a changed kernel cannot be compiled with a stale
signature.
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools

import torch

from fastweight.kernels import aggregation, linear_ce

TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# Argument types; "{dtype}" is the dtype of the spec (the logits', the weights' or the values').
ROW_ARG_TYPES = {
    "logits_ptr": "*{dtype}", "stride_row": "i32", "targets_ptr": "*i64", "coeff_ptr": "*fp32",
    "lse_in_ptr": "*fp32", "loss_ptr": "*fp32", "lse_ptr": "*fp32",
    "hit_ptr": "*i64",  # the targets stand in when no hits are written; *i8 with HIT
    "n_rows": "i32", "n_cols": "i32", "softcap": "fp32", "smoothing": "fp32", "z_loss": "fp32",
}
SCALE_ARG_TYPES = {"t_ptr": "*{dtype}", "n": "i64", "s_ptr": "*fp32"}
AGGREGATION_ARG_TYPES = {
    "valid_ptr": "*u8", "cu_ptr": "*i64", "sw_ptr": "*{dtype}", "tw_ptr": "*{dtype}", "c_ptr": "*fp32",
    "counts_ptr": "*i64", "values_ptr": "*{dtype}", "means_ptr": "*fp32", "grad_ptr": "*{dtype}",
    "out_ptr": "*fp32",
}
# The row kernel's modes: (GRAD, LSE_GIVEN).
ROW_MODES = {"forward": (False, False), "fwd_bwd": (True, False), "backward": (True, True)}
# Its optional features, as sets of flags compiled in each mode: every softcap / smoothing
# combination, z-loss alone and with them, and (where a forward sweep runs, so that hits can
# be written) the hit flag alone and with everything on: the variant with the most live values.
# A softcap up to linear_ce.BOUNDED_SOFTCAP (Gemma's 30) runs the BOUNDED sweep, a larger one
# the running-maximum sweep: both are compiled, and the bounded one with the fast tanh too.
ROW_FEATURES = ((), ("SOFTCAP",), ("SOFTCAP", "BOUNDED"), ("SOFTCAP", "BOUNDED", "FAST_TANH"), ("SMOOTH",),
                ("SOFTCAP", "SMOOTH"), ("SOFTCAP", "SMOOTH", "BOUNDED"), ("ZLOSS",), ("SOFTCAP", "SMOOTH", "ZLOSS"),
                ("SOFTCAP", "SMOOTH", "ZLOSS", "BOUNDED"), ("SOFTCAP", "SMOOTH", "ZLOSS", "BOUNDED", "FAST_TANH"))
ROW_FORWARD_FEATURES = (("HIT",), ("SOFTCAP", "SMOOTH", "ZLOSS", "HIT"), ("SOFTCAP", "SMOOTH", "ZLOSS", "HIT", "BOUNDED"),
                        ("SOFTCAP", "SMOOTH", "ZLOSS", "HIT", "BOUNDED", "FAST_TANH"))
ROW_FLAGS = ("SOFTCAP", "SMOOTH", "ZLOSS", "HIT", "BOUNDED", "FAST_TANH")


class KernelSpecError(LookupError):
    """A kernel argument this module does not know how to type or set."""


@dataclasses.dataclass
class KernelSpec:
    """One compilation: a kernel, its argument types and constexprs, and its launch options."""
    kernel: str
    fn: object  # the triton.runtime.jit.JITFunction
    dtype: str
    variant: str
    config: dict
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    divisible_by_16: list[str] = dataclasses.field(default_factory=list)
    default: bool = True  # the launcher's default configuration (spills there fail the check)


def _parameters(fn) -> list[inspect.Parameter]:
    """The parameters of a ``@triton.jit`` kernel, compiled or interpreted (both wrap the Python
    function as ``.fn``)."""
    return list(inspect.signature(fn.fn).parameters.values())


def make_spec(fn, dtype: str, variant: str, config: dict, arg_types: dict[str, str],
              constexprs: dict[str, object], aligned: bool = False) -> KernelSpec:
    """A spec of ``fn`` from its own parameter list. ``aligned``: the 16-byte divisibility
    Triton specialises on at launch for aligned pointers and integers that are multiples of 16
    (pointers, and the integer arguments named in ``config["divisible_by_16"]``)."""
    name = fn.__name__
    signature: dict[str, str] = {}
    values = dict(constexprs)
    for param in _parameters(fn):
        if "constexpr" in str(param.annotation):
            if param.name not in values:
                if param.default is inspect.Parameter.empty:
                    raise KernelSpecError(f"{name}: no value for constexpr {param.name!r} "
                                          "(update benchmarks/kernel_specs.py)")
                values[param.name] = param.default
            signature[param.name] = "constexpr"
        elif param.name in arg_types:
            signature[param.name] = arg_types[param.name].format(dtype=dtype)
        else:
            raise KernelSpecError(f"{name}: no type for argument {param.name!r} (update benchmarks/kernel_specs.py)")
    unknown = set(values) - set(signature)
    if unknown:
        raise KernelSpecError(f"{name}: constexprs {sorted(unknown)} are not parameters of the kernel")
    divisible = []
    if aligned:
        divisible = [k for k, ty in signature.items()
                     if ty.startswith("*") or k in config.get("divisible_by_16", ())]
    launch = {k: v for k, v in config.items() if k != "divisible_by_16"}
    return KernelSpec(name, fn, dtype, variant, launch, signature, values, int(config["num_warps"]),
                      divisible)


def row_kernel_specs() -> list[KernelSpec]:
    """``_ce_rows_kernel`` at the default config of each logits dtype (``row_config``), in every
    mode with the feature sets of ``ROW_FEATURES`` (and ``ROW_FORWARD_FEATURES`` where the
    forward sweep runs), with and without 16-byte alignment."""
    specs = []
    for torch_dtype, dtype in TRITON_DTYPES.items():
        config = linear_ce.row_config(torch_dtype)
        blocks = {k: v for k, v in config.items() if k.startswith("BLOCK")}
        for mode, (grad, lse_given) in ROW_MODES.items():
            feature_sets = ROW_FEATURES + (() if lse_given else ROW_FORWARD_FEATURES)
            for features, aligned in itertools.product(feature_sets, (False, True)):
                flags = {flag: flag in features for flag in ROW_FLAGS}
                variant = mode + "".join(f"+{flag.lower()}" for flag in features) + "+aligned" * aligned
                arg_types = {**ROW_ARG_TYPES, **({"hit_ptr": "*i8"} if flags["HIT"] else {})}
                specs.append(make_spec(
                    linear_ce._ce_rows_kernel, dtype, variant,
                    {**config, "divisible_by_16": ("stride_row", "n_cols")}, arg_types,
                    {**flags, "GRAD": grad, "LSE_GIVEN": lse_given, "PTX": True, **blocks}, aligned))
    return specs


def aggregation_kernel_specs() -> list[KernelSpec]:
    """The three aggregation kernels at ``aggregation.CONFIG``, for bf16 / fp16 / fp32 weights or
    values, and every combination of the coefficient kernel's flags."""
    config = dict(aggregation.CONFIG)
    blocks = {k: v for k, v in config.items() if k.startswith("BLOCK")}
    specs = []
    for dtype in TRITON_DTYPES.values():
        for per_sample_mean, has_sw, has_tw in itertools.product((False, True), repeat=3):
            variant = ("mean" if per_sample_mean else "token") + "+sw" * has_sw + "+tw" * has_tw
            specs.append(make_spec(aggregation._coefficients_kernel, dtype, variant, config, AGGREGATION_ARG_TYPES,
                                   {"HAS_SW": has_sw, "HAS_TW": has_tw, "PER_SAMPLE_MEAN": per_sample_mean,
                                    **blocks}))
        for fn in (aggregation._segment_mean_kernel, aggregation._segment_mean_backward_kernel):
            specs.append(make_spec(fn, dtype, "", config, AGGREGATION_ARG_TYPES, dict(blocks)))
    return specs


def scale_kernel_specs() -> list[KernelSpec]:
    """``_scale_kernel`` (the in-place scaling of precomputed gradients) at ``SCALE_CONFIG``."""
    config = {k: v for k, v in linear_ce.SCALE_CONFIG.items() if k != "max_programs"}
    return [make_spec(linear_ce._scale_kernel, dtype, "", config, SCALE_ARG_TYPES, {"BLOCK": config["BLOCK"]})
            for dtype in TRITON_DTYPES.values()]


def all_specs() -> list[KernelSpec]:
    return row_kernel_specs() + scale_kernel_specs() + aggregation_kernel_specs()
