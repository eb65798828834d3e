"""Loss-aggregation ops on Triton: same three functions and contract as
``fastweight.aggregation_torch`` (the reference).

One program per segment (sample): it loops over the segment's tokens in blocks of BLOCK, so no
segment-id array is built and nothing is synchronised with the host (sizes come from tensor
shapes; segment bounds are read inside the kernels). Sums are in fp32, counts in int64.
Weights and values are read in their own float dtype and converted to fp32 in the kernel.
"""
from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# One launch configuration for all three kernels (they are tiny and memory-bound).
CONFIG = {"BLOCK": 1024, "num_warps": 4}

# Tests set this to poison (NaN / -7) every output buffer the launchers allocate.
POISON = False


def fix_interpreter_index() -> None:
    """Make loops with runtime bounds work under TRITON_INTERPRET=1 with numpy >= 2.4.

    Triton 3.6's interpreter turns a scalar into a Python int with ``int(array_of_shape_1)``,
    which numpy 2.4 rejects (triton-lang/triton#9171), so ``range(0, n, BLOCK)`` fails there.
    This wraps the interpreter's tensor patching to convert via ``reshape(-1)[0]``. It only
    touches the interpreter module, is idempotent, and does nothing if the layout changed.
    """
    try:
        from triton.runtime import interpreter as interp
    except Exception:  # pragma: no cover - no interpreter in this Triton
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_fastweight_index_fix", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._fastweight_index_fix = True
    interp._patch_lang_tensor = patched


fix_interpreter_index()


@triton.jit
def _coefficients_kernel(valid_ptr, cu_ptr, sw_ptr, tw_ptr, c_ptr, counts_ptr,
                         HAS_SW: tl.constexpr, HAS_TW: tl.constexpr, PER_SAMPLE_MEAN: tl.constexpr,
                         BLOCK: tl.constexpr):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    cnt = tl.zeros([BLOCK], tl.int64)
    if PER_SAMPLE_MEAN:
        for i0 in range(start, end, BLOCK):
            idx = i0 + offs
            v = tl.load(valid_ptr + idx, mask=idx < end, other=0)
            cnt += (v != 0).to(tl.int64)
    else:
        for i0 in range(start, end, BLOCK):
            idx = i0 + offs
            msk = idx < end
            v = tl.load(valid_ptr + idx, mask=msk, other=0)
            cnt += (v != 0).to(tl.int64)
            c = (v != 0).to(tl.float32)
            if HAS_SW:
                c = c * tl.load(sw_ptr + b).to(tl.float32)
            if HAS_TW:
                c = c * tl.load(tw_ptr + idx, mask=msk, other=0.0).to(tl.float32)
            tl.store(c_ptr + idx, c, mask=msk)
    count = tl.sum(cnt, axis=0)
    tl.store(counts_ptr + b, count)
    if PER_SAMPLE_MEAN:
        denom = tl.maximum(count, 1).to(tl.float32)
        for i0 in range(start, end, BLOCK):
            idx = i0 + offs
            msk = idx < end
            v = tl.load(valid_ptr + idx, mask=msk, other=0)
            c = (v != 0).to(tl.float32)
            if HAS_SW:
                c = c * tl.load(sw_ptr + b).to(tl.float32)
            if HAS_TW:
                c = c * tl.load(tw_ptr + idx, mask=msk, other=0.0).to(tl.float32)
            tl.store(c_ptr + idx, c / denom, mask=msk)


@triton.jit
def _segment_mean_kernel(values_ptr, valid_ptr, cu_ptr, means_ptr, counts_ptr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    cnt = tl.zeros([BLOCK], tl.int64)
    for i0 in range(start, end, BLOCK):
        idx = i0 + offs
        msk = idx < end
        ok = tl.load(valid_ptr + idx, mask=msk, other=0) != 0
        x = tl.load(values_ptr + idx, mask=msk & ok, other=0.0).to(tl.float32)
        acc += tl.where(ok, x, 0.0)
        cnt += ok.to(tl.int64)
    count = tl.sum(cnt, axis=0)
    tl.store(counts_ptr + b, count)
    tl.store(means_ptr + b, tl.sum(acc, axis=0) / tl.maximum(count, 1).to(tl.float32))


@triton.jit
def _segment_mean_backward_kernel(grad_ptr, counts_ptr, valid_ptr, cu_ptr, out_ptr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    g = tl.load(grad_ptr + b).to(tl.float32) / tl.maximum(tl.load(counts_ptr + b), 1).to(tl.float32)
    for i0 in range(start, end, BLOCK):
        idx = i0 + offs
        msk = idx < end
        ok = tl.load(valid_ptr + idx, mask=msk, other=0) != 0
        tl.store(out_ptr + idx, tl.where(ok, g, 0.0), mask=msk)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _alloc(shape, dtype, device) -> Tensor:
    if POISON:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _floats(t: Tensor) -> Tensor:
    """A contiguous float tensor the kernels can read (fp64, ints and, in the interpreter, bf16 -> fp32)."""
    if t.dtype == torch.float64 or (t.dtype == torch.bfloat16 and _interpreting()) or not t.dtype.is_floating_point:
        t = t.to(torch.float32)
    return t.contiguous()


def _mask(valid: Tensor) -> Tensor:
    valid = valid.contiguous()
    return valid.view(torch.uint8) if valid.dtype == torch.bool else valid


def _reference():
    from fastweight import aggregation_torch

    return aggregation_torch


def coefficients(valid: Tensor, cu_seqlens: Tensor, sample_weights: Tensor | None,
                 token_weights: Tensor | None, per_sample_mean: bool,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """c_t = valid_t * w[s(t)] * u_t (/ n_s(t) when ``per_sample_mean``); (c (N,) fp32, counts (B,) int64).
    A ``dtype`` other than fp32 (fp64 ground-truth runs) goes to the PyTorch backend."""
    if dtype != torch.float32:
        return _reference().coefficients(valid, cu_seqlens, sample_weights, token_weights, per_sample_mean, dtype)
    n = valid.numel()
    num_segments = cu_seqlens.numel() - 1
    dev = valid.device
    c = _alloc((n,), torch.float32, dev)
    counts = _alloc((num_segments,), torch.int64, dev)
    if num_segments <= 0:
        return c, counts
    cu = cu_seqlens.contiguous()
    sw = _floats(sample_weights) if sample_weights is not None else None
    tw = _floats(token_weights) if token_weights is not None else None
    _coefficients_kernel[(num_segments,)](
        _mask(valid), cu, sw if sw is not None else c, tw if tw is not None else c, c, counts,
        HAS_SW=sw is not None, HAS_TW=tw is not None, PER_SAMPLE_MEAN=bool(per_sample_mean),
        BLOCK=CONFIG["BLOCK"], num_warps=CONFIG["num_warps"],
    )
    return c, counts


def segment_mean(values: Tensor, cu_seqlens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` over the valid tokens of each segment: (means (B,) fp32, counts (B,) int64).
    fp64 values (ground-truth runs) go to the PyTorch backend and give fp64 means."""
    if values.dtype == torch.float64:
        return _reference().segment_mean(values, cu_seqlens, valid)
    num_segments = cu_seqlens.numel() - 1
    dev = values.device
    means = _alloc((max(num_segments, 0),), torch.float32, dev)
    counts = _alloc((max(num_segments, 0),), torch.int64, dev)
    if num_segments <= 0:
        return means, counts
    _segment_mean_kernel[(num_segments,)](
        _floats(values), _mask(valid), cu_seqlens.contiguous(), means, counts,
        BLOCK=CONFIG["BLOCK"], num_warps=CONFIG["num_warps"],
    )
    return means, counts


def segment_mean_backward(grad_means: Tensor, cu_seqlens: Tensor, counts: Tensor, valid: Tensor) -> Tensor:
    """(N,) fp32: grad_means[s(t)] / n_s(t) on valid tokens, 0 elsewhere (fp64 in, fp64 out, by PyTorch)."""
    if grad_means.dtype == torch.float64:
        return _reference().segment_mean_backward(grad_means, cu_seqlens, counts, valid)
    n = valid.numel()
    num_segments = cu_seqlens.numel() - 1
    out = _alloc((n,), torch.float32, valid.device)
    if num_segments <= 0:
        return out
    _segment_mean_backward_kernel[(num_segments,)](
        _floats(grad_means), counts.contiguous(), _mask(valid), cu_seqlens.contiguous(), out,
        BLOCK=CONFIG["BLOCK"], num_warps=CONFIG["num_warps"],
    )
    return out


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specs (benchmarks/aot_compile.py)
# --------------------------------------------------------------------------------------------
def aot_specs():
    """Every kernel at its launch configuration, for bf16/fp16/fp32 weights or values, and every
    combination of the coefficient kernel's flags."""
    specs = []
    cfg = {"BLOCK": CONFIG["BLOCK"], "num_warps": CONFIG["num_warps"]}
    for ty in ("bf16", "fp16", "fp32"):
        for psm, sw, tw in itertools.product((False, True), repeat=3):
            sig = {"valid_ptr": "*u8", "cu_ptr": "*i64", "sw_ptr": f"*{ty}", "tw_ptr": f"*{ty}",
                   "c_ptr": "*fp32", "counts_ptr": "*i64"}
            ce = {"HAS_SW": sw, "HAS_TW": tw, "PER_SAMPLE_MEAN": psm, "BLOCK": cfg["BLOCK"]}
            sig.update({k: "constexpr" for k in ce})
            specs.append({"kernel": "_coefficients_kernel", "fn": _coefficients_kernel, "dtype": ty,
                          "variant": ("mean" if psm else "token") + ("+sw" if sw else "") + ("+tw" if tw else ""),
                          "config": cfg, "signature": sig, "constexprs": ce,
                          "num_warps": cfg["num_warps"], "default": True})
        sig = {"values_ptr": f"*{ty}", "valid_ptr": "*u8", "cu_ptr": "*i64", "means_ptr": "*fp32",
               "counts_ptr": "*i64", "BLOCK": "constexpr"}
        specs.append({"kernel": "_segment_mean_kernel", "fn": _segment_mean_kernel, "dtype": ty, "variant": "",
                      "config": cfg, "signature": sig, "constexprs": {"BLOCK": cfg["BLOCK"]},
                      "num_warps": cfg["num_warps"], "default": True})
        sig = {"grad_ptr": f"*{ty}", "counts_ptr": "*i64", "valid_ptr": "*u8", "cu_ptr": "*i64",
               "out_ptr": "*fp32", "BLOCK": "constexpr"}
        specs.append({"kernel": "_segment_mean_backward_kernel", "fn": _segment_mean_backward_kernel,
                      "dtype": ty, "variant": "", "config": cfg, "signature": sig,
                      "constexprs": {"BLOCK": cfg["BLOCK"]}, "num_warps": cfg["num_warps"], "default": True})
    return specs
