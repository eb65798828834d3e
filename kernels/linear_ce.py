"""Fused linear cross-entropy on Triton: the ``impl="triton"`` linear-CE backend.

Same contract as ``fastweight.linear_ce_torch`` (see its docstring): ``forward``,
``forward_backward``, ``backward`` and the scoring fast path ``sequence_forward``.

Design (token-chunked; the (N, V) logits never exist, only a (C, V) block of them):

1. ``logits_c = x_c @ W^T (+ bias)`` by cuBLAS (``mm``/``addmm``), in the input dtype, so the
   logits are rounded exactly as a naive ``F.linear`` rounds them.
2. ``_ce_rows_kernel`` (Triton), one program per BLOCK_M rows, two sweeps over the vocabulary:
   sweep 1 reads the block once for the online logsumexp (softcap, label smoothing,
   target logit) and writes loss/lse per token; sweep 2 (gradient only) re-reads the block and
   overwrites it *in place* with d(sum_t c_t l_t)/d(raw logits), in the input dtype. With a
   saved ``lse`` (``backward``) sweep 1 is skipped. Ignored rows are never read; their
   gradient rows are written as zeros.
3. ``dx_c = G @ W`` and ``dW += G^T @ x_c`` by cuBLAS (``addmm_``, beta=1); ``db`` is a
   column sum of G in fp32.

So forward+backward costs exactly the 6*N*D*V matmul flops in cuBLAS plus about three passes
over each (C, V) block (read, read, write) in the row kernel; scoring costs 2*N*D*V plus one
read. Memory beyond inputs and gradients is one (C, V) block in the input dtype, C chosen from
``FASTWEIGHT_TRITON_CHUNK_BYTES`` (default 768 MiB) and rounded to a multiple of 128 rows, so
there are only a few chunks (the (V, D) dW accumulator is touched once per chunk, not once per
small token block). dW is accumulated in fp32 when the weight is fp32, when there is a single
chunk (one cuBLAS GEMM, fp32 accumulation inside), or when an fp32 (V, D) buffer fits in a
quarter of the budget; otherwise it is accumulated in the weight dtype, one rounding per chunk.

Losses and lse are fp32; ``lse`` is 0 at ignored tokens (only their coefficient, 0, is ever
used with it). fp64 inputs go to the PyTorch backend.
"""
from __future__ import annotations

import itertools
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .aggregation import fix_interpreter_index

fix_interpreter_index()

DEFAULT_CHUNK_BYTES = 768 << 20

# Launch configurations of the row kernel, keyed by the element size of the logits block.
# benchmarks/aot_compile.py compiles each one for sm_80 and sm_90; keep the table small.
ROW_CONFIGS = {
    2: {"BLOCK_M": 1, "BLOCK_V": 4096, "num_warps": 8},  # bf16, fp16
    4: {"BLOCK_M": 1, "BLOCK_V": 2048, "num_warps": 8},  # fp32
}

# Tests set this to NaN-fill every buffer the launchers allocate, so an unwritten element shows.
POISON = False

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _tanh_and_slope(x):
    """(tanh(x), 1 - tanh(x)^2) from e = exp(-2|x|) in (0, 1]: no overflow, no NaN, and the
    slope 4e / (1 + e)^2 keeps full relative precision where tanh saturates (no 1 - t*t
    cancellation). Interpreter-friendly (no libdevice)."""
    e = tl.exp2(tl.abs(x) * (-2.0 * _LOG2E))
    r = 1.0 / (1.0 + e)
    t = (1.0 - e) * r
    t = tl.where(x < 0, -t, t)
    return t, 4.0 * e * r * r


@triton.jit
def _ce_rows_kernel(
    logits_ptr, stride_row,
    targets_ptr, coeff_ptr, lse_in_ptr,
    loss_ptr, lse_ptr,
    n_rows, n_cols,
    softcap, smoothing,
    SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
    GRAD: tl.constexpr, LSE_GIVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per-row CE over a (n_rows, n_cols) logits block; optionally its gradient, in place."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    tgt = tl.load(targets_ptr + rows, mask=row_in, other=-1)
    live = row_in & (tgt >= 0)
    row_ptr = logits_ptr + rows.to(tl.int64) * stride_row
    cols0 = tl.arange(0, BLOCK_V)
    inv_cap = 1.0 / softcap

    if LSE_GIVEN:
        lse = tl.load(lse_in_ptr + rows, mask=live, other=0.0)
    else:
        m = tl.full([BLOCK_M], -1.0e30, tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        zsum = tl.zeros([BLOCK_M], tl.float32)
        for v0 in range(0, n_cols, BLOCK_V):
            cols = v0 + cols0
            cmask = cols < n_cols
            mask = live[:, None] & cmask[None, :]
            z = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                z = softcap * _tanh_and_slope(z * inv_cap)[0]
            if SMOOTH:
                zsum += tl.sum(tl.where(mask, z, 0.0), axis=1)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            s = s * tl.exp2((m - m_new) * _LOG2E) + tl.sum(tl.exp2((z - m_new[:, None]) * _LOG2E), axis=1)
            m = m_new
        lse = m + tl.log2(tl.where(live, s, 1.0)) * _LN2
        y = tl.where(live, tgt, 0)
        zy = tl.load(row_ptr + y, mask=live, other=0.0).to(tl.float32)
        if SOFTCAP:
            zy = softcap * _tanh_and_slope(zy * inv_cap)[0]
        loss = lse - zy
        if SMOOTH:
            loss = (1.0 - smoothing) * loss + smoothing * (lse - zsum / n_cols)
        lse = tl.where(live, lse, 0.0)
        tl.store(loss_ptr + rows, tl.where(live, loss, 0.0), mask=row_in)
        tl.store(lse_ptr + rows, lse, mask=row_in)

    if GRAD:
        c = tl.load(coeff_ptr + rows, mask=live, other=0.0).to(tl.float32)
        c = tl.where(live, c, 0.0)
        if SMOOTH:
            c_hit = c * (1.0 - smoothing)
            c_flat = c * (smoothing / n_cols)
        else:
            c_hit = c
        for v0 in range(0, n_cols, BLOCK_V):
            cols = v0 + cols0
            cmask = cols < n_cols
            mask = live[:, None] & cmask[None, :]
            z = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                t, slope = _tanh_and_slope(z * inv_cap)
                z = softcap * t
            p = tl.exp2((z - lse[:, None]) * _LOG2E)
            g = c[:, None] * p
            if SMOOTH:
                g -= c_flat[:, None]
            g = tl.where(cols[None, :] == tgt[:, None], g - c_hit[:, None], g)
            if SOFTCAP:
                g *= slope
            g = tl.where(mask, g, 0.0)
            tl.store(row_ptr[:, None] + cols[None, :], g.to(logits_ptr.dtype.element_ty),
                     mask=row_in[:, None] & cmask[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def row_config(dtype: torch.dtype) -> dict:
    """The default launch configuration of ``_ce_rows_kernel`` for logits of ``dtype``."""
    return dict(ROW_CONFIGS[torch.empty((), dtype=dtype).element_size()])


def _alloc(shape, dtype, device) -> Tensor:
    if POISON:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _chunk_rows(n: int, vocab: int, itemsize: int, chunk_tokens: int | None) -> int:
    """Rows per chunk: all of them if the (N, V) block fits the budget, else equal chunks
    rounded up to a multiple of 128 rows (for the GEMM tiles) when that still fits."""
    if chunk_tokens is not None:
        return max(1, min(n, int(chunk_tokens)))
    budget = int(os.environ.get("FASTWEIGHT_TRITON_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
    max_rows = max(1, budget // max(1, vocab * itemsize))
    if n <= max_rows:
        return max(n, 1)
    n_chunks = math.ceil(n / max_rows)
    rows = math.ceil(n / n_chunks)
    rounded = math.ceil(rows / 128) * 128
    return rounded if rounded <= max_rows else rows


def _launch_rows(z: Tensor, targets, coeff, lse_in, loss, lse, softcap, label_smoothing,
                 grad: bool, config: dict | None):
    rows, vocab = z.shape
    if rows == 0:
        return
    cfg = row_config(z.dtype)
    if config:
        cfg.update(config)
    block_m = cfg["BLOCK_M"]
    dummy = loss
    _ce_rows_kernel[(triton.cdiv(rows, block_m),)](
        z, z.stride(0),
        targets,
        coeff if coeff is not None else dummy,
        lse_in if lse_in is not None else dummy,
        loss, lse,
        rows, vocab,
        float(softcap) if softcap is not None else 1.0, float(label_smoothing),
        SOFTCAP=softcap is not None, SMOOTH=bool(label_smoothing),
        GRAD=grad, LSE_GIVEN=lse_in is not None,
        BLOCK_M=block_m, BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
    )


def _run(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, coeff: Tensor | None,
         lse_in: Tensor | None, softcap, label_smoothing, chunk_tokens, config, dw_fp32_acc):
    """One pass over the token chunks. Returns (loss, lse, grads or None)."""
    n, d = x.shape
    vocab = weight.shape[0]
    dev = x.device
    x = x.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    targets = targets.contiguous().to(torch.int64)
    grad = coeff is not None
    if grad:
        coeff = coeff.to(torch.float32).contiguous()
    if lse_in is not None:
        lse_in = lse_in.to(torch.float32).contiguous()
    loss = _alloc((n,), torch.float32, dev)
    lse = _alloc((n,), torch.float32, dev)

    step = _chunk_rows(n, vocab, x.element_size(), chunk_tokens)
    n_chunks = math.ceil(n / step) if n else 0
    dx = dw = dw_acc = db32 = None
    if grad:
        dx = _alloc((n, d), x.dtype, dev)
        dw = _alloc((vocab, d), weight.dtype, dev)
        if dw_fp32_acc is None:
            budget = int(os.environ.get("FASTWEIGHT_TRITON_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
            dw_fp32_acc = weight.dtype != torch.float32 and n_chunks > 1 and vocab * d * 4 <= budget // 4
        dw_acc = torch.zeros(vocab, d, dtype=torch.float32, device=dev) if dw_fp32_acc else dw
        if n_chunks == 0:
            dw_acc.zero_()
        db32 = torch.zeros(vocab, dtype=torch.float32, device=dev) if bias is not None else None
    buf = _alloc((min(step, n), vocab), x.dtype, dev) if n else None

    for i, start in enumerate(range(0, n, step)):
        stop = min(start + step, n)
        xc = x[start:stop]
        z = buf[: stop - start]
        if bias is None:
            torch.mm(xc, weight.t(), out=z)
        else:  # the bias in the GEMM epilogue: one rounding, as F.linear does
            torch.addmm(bias, xc, weight.t(), out=z)
        _launch_rows(z, targets[start:stop],
                     coeff[start:stop] if grad else None,
                     lse_in[start:stop] if lse_in is not None else None,
                     loss[start:stop], lse[start:stop], softcap, label_smoothing, grad, config)
        if not grad:
            continue
        torch.mm(z, weight, out=dx[start:stop])
        if dw_acc is dw:
            if i == 0:
                torch.mm(z.t(), xc, out=dw)
            else:
                dw.addmm_(z.t(), xc)
        else:
            dw_acc.add_(torch.mm(z.t(), xc))
        if db32 is not None:
            db32.add_(z.sum(0, dtype=torch.float32))
    if not grad:
        return loss, lse, None
    if dw_acc is not dw:
        dw.copy_(dw_acc)
    db = db32.to(bias.dtype) if bias is not None else None
    return loss, lse, (dx, dw, db)


def _torch_backend():
    from fastweight import linear_ce_torch

    return linear_ce_torch


def forward(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
            softcap: float | None = None, label_smoothing: float = 0.0,
            chunk_tokens: int | None = None, config: dict | None = None, **_) -> tuple[Tensor, Tensor]:
    """Per-token (loss, lse), both (N,) fp32; no gradient state. lse is 0 at ignored tokens."""
    if x.dtype == torch.float64:
        return _torch_backend().forward(x, weight, bias, targets, softcap=softcap, label_smoothing=label_smoothing)
    loss, lse, _ = _run(x, weight, bias, targets, None, None, softcap, label_smoothing,
                        chunk_tokens, config, None)
    return loss, lse


def forward_backward(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, coeff: Tensor, *,
                     softcap: float | None = None, label_smoothing: float = 0.0,
                     chunk_tokens: int | None = None, config: dict | None = None,
                     dw_fp32_acc: bool | None = None, **_):
    """Per-token loss (N,) fp32 and the gradients (dx, dw, db) of sum_t coeff_t * loss_t, in one
    pass over the vocabulary (6*N*D*V matmul flops). db is None without bias."""
    if x.dtype == torch.float64:
        return _torch_backend().forward_backward(x, weight, bias, targets, coeff, softcap=softcap,
                                                 label_smoothing=label_smoothing)
    loss, _, (dx, dw, db) = _run(x, weight, bias, targets, coeff, None, softcap, label_smoothing,
                                 chunk_tokens, config, dw_fp32_acc)
    return loss, dx, dw, db


def backward(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, coeff: Tensor,
             lse: Tensor | None = None, *, softcap: float | None = None, label_smoothing: float = 0.0,
             chunk_tokens: int | None = None, config: dict | None = None,
             dw_fp32_acc: bool | None = None, **_):
    """Gradients (dx, dw, db) of sum_t coeff_t * loss_t. With the forward's ``lse`` the row
    kernel makes one read+write sweep per logits block instead of two reads and a write."""
    if x.dtype == torch.float64:
        return _torch_backend().backward(x, weight, bias, targets, coeff, lse, softcap=softcap,
                                         label_smoothing=label_smoothing)
    _, _, grads = _run(x, weight, bias, targets, coeff, lse, softcap, label_smoothing,
                       chunk_tokens, config, dw_fp32_acc)
    return grads


def sequence_forward(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, cu_seqlens: Tensor, *,
                     softcap: float | None = None, label_smoothing: float = 0.0,
                     chunk_tokens: int | None = None, config: dict | None = None, **_) -> Tensor:
    """(B,) fp32: mean loss over the valid tokens of each sequence (0 for none); forward only.
    Per-token losses stay on the device ((N,) fp32) and are reduced by the Triton segment-mean
    kernel; nothing is kept for a backward."""
    from . import aggregation

    with torch.no_grad():
        loss, _ = forward(x, weight, bias, targets, softcap=softcap, label_smoothing=label_smoothing,
                          chunk_tokens=chunk_tokens, config=config)
        means, _ = aggregation.segment_mean(loss, cu_seqlens, targets >= 0)
    return means


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specs (benchmarks/aot_compile.py)
# --------------------------------------------------------------------------------------------
_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def aot_specs():
    """Every (kernel, dtype, launch config, constexpr variant) the launchers can use: the
    default config of each dtype, each mode (forward, fwd_bwd, backward with saved lse), every
    combination of the softcap / label-smoothing flags, with and without the 16-byte alignment
    specialisation Triton applies at launch (aligned buffers, V a multiple of 16)."""
    specs = []
    modes = {"forward": (False, False), "fwd_bwd": (True, False), "backward": (True, True)}
    for dtype, ty in _TRITON_DTYPES.items():
        cfg = row_config(dtype)
        for (mode, (grad, lse_given)), cap, smooth, aligned in itertools.product(
                modes.items(), (False, True), (False, True), (False, True)):
            signature = {
                "logits_ptr": f"*{ty}", "stride_row": "i32", "targets_ptr": "*i64", "coeff_ptr": "*fp32",
                "lse_in_ptr": "*fp32", "loss_ptr": "*fp32", "lse_ptr": "*fp32",
                "n_rows": "i32", "n_cols": "i32", "softcap": "fp32", "smoothing": "fp32",
            }
            constexprs = {"SOFTCAP": cap, "SMOOTH": smooth, "GRAD": grad, "LSE_GIVEN": lse_given,
                          "BLOCK_M": cfg["BLOCK_M"], "BLOCK_V": cfg["BLOCK_V"]}
            # What Triton specialises at launch for 16-byte aligned buffers and V % 16 == 0.
            div16 = [k for k, v in signature.items() if v.startswith("*")] + ["stride_row", "n_cols"]
            signature.update({k: "constexpr" for k in constexprs})
            specs.append({
                "kernel": "_ce_rows_kernel", "fn": _ce_rows_kernel, "dtype": ty,
                "variant": mode + ("+softcap" if cap else "") + ("+smooth" if smooth else "")
                + ("+aligned" if aligned else ""),
                "config": dict(cfg), "signature": signature, "constexprs": constexprs,
                "divisible_by_16": div16 if aligned else [],
                "num_warps": cfg["num_warps"], "default": True,
            })
    return specs
