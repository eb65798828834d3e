"""Loss-aggregation ops on Triton: same three functions and contract as
``fastweight.aggregation.reference``, accumulating in fp32 (the registry sends fp64 elsewhere).
This module imports nothing from the rest of fastweight.

One program per segment (sample): it loops over the segment's tokens in blocks of BLOCK, so no
segment-id array is built and nothing is synchronised with the host (sizes come from tensor
shapes; segment bounds are read inside the kernels). Sums are in fp32, counts in int64.
Weights and values are read in their own float dtype and converted to fp32 in the kernel.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# One launch configuration for all three kernels (they are tiny and memory-bound).
CONFIG = {"BLOCK": 1024, "num_warps": 4}


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


def new_buffer(shape, dtype: torch.dtype, device) -> Tensor:
    """Every output the launchers allocate comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _floats(t: Tensor) -> Tensor:
    """A contiguous float tensor the kernels can read (fp64, ints and, in the interpreter, bf16 -> fp32)."""
    if t.dtype == torch.float64 or (t.dtype == torch.bfloat16 and _interpreting()) or not t.dtype.is_floating_point:
        t = t.to(torch.float32)
    return t.contiguous()


def _mask(valid: Tensor) -> Tensor:
    valid = valid.contiguous()
    return valid.view(torch.uint8) if valid.dtype == torch.bool else valid


def coefficients(valid: Tensor, cu_seqlens: Tensor, sample_weights: Tensor | None,
                 token_weights: Tensor | None, per_sample_mean: bool,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """c_t = valid_t * w[s(t)] * u_t (/ n_s(t) when ``per_sample_mean``); (c (N,) fp32, counts (B,) int64)."""
    if dtype != torch.float32:
        raise ValueError(f"the Triton aggregation kernels compute fp32 coefficients, not {dtype}")
    n = valid.numel()
    num_segments = cu_seqlens.numel() - 1
    dev = valid.device
    c = new_buffer((n,), torch.float32, dev)
    counts = new_buffer((num_segments,), torch.int64, dev)
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
    """Mean of ``values`` over the valid tokens of each segment: (means (B,) fp32, counts (B,) int64)."""
    num_segments = cu_seqlens.numel() - 1
    dev = values.device
    means = new_buffer((max(num_segments, 0),), torch.float32, dev)
    counts = new_buffer((max(num_segments, 0),), torch.int64, dev)
    if num_segments <= 0:
        return means, counts
    _segment_mean_kernel[(num_segments,)](
        _floats(values), _mask(valid), cu_seqlens.contiguous(), means, counts,
        BLOCK=CONFIG["BLOCK"], num_warps=CONFIG["num_warps"],
    )
    return means, counts


def segment_mean_backward(grad_means: Tensor, cu_seqlens: Tensor, counts: Tensor, valid: Tensor) -> Tensor:
    """(N,) fp32: grad_means[s(t)] / n_s(t) on valid tokens, 0 elsewhere."""
    n = valid.numel()
    num_segments = cu_seqlens.numel() - 1
    out = new_buffer((n,), torch.float32, valid.device)
    if num_segments <= 0:
        return out
    _segment_mean_backward_kernel[(num_segments,)](
        _floats(grad_means), counts.contiguous(), _mask(valid), cu_seqlens.contiguous(), out,
        BLOCK=CONFIG["BLOCK"], num_warps=CONFIG["num_warps"],
    )
    return out
