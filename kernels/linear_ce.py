"""Fused linear cross-entropy on Triton: the ``impl="triton"`` linear-CE backend.

Same contract as ``fastweight.linear_ce.chunked`` (see its docstring): one function,
``linear_ce``. This module imports nothing from the rest of fastweight.

Design (token-chunked; the (N, V) logits never exist, only a (C, V) block of them):

1. ``logits_c = x_c @ W^T (+ bias)`` by cuBLAS (``mm``/``addmm``), in the input dtype, so the
   logits are rounded exactly as a naive ``F.linear`` rounds them.
2. ``_ce_rows_kernel`` (Triton), one program per BLOCK_M rows, two sweeps over the vocabulary:
   sweep 1 reads the block once for the online logsumexp (softcap, label smoothing,
   target logit) and writes loss/lse per token (NaN loss for an invalid label, whose target
   logit is never read); sweep 2 (gradient only) re-reads the block, backwards so that the
   tiles read last come first, possibly from L2, and
   overwrites it *in place* with d(sum_t c_t l_t)/d(raw logits), in the input dtype. With a
   saved ``lse`` (``backward``) sweep 1 is skipped. Ignored rows are never read; their
   gradient rows are written as zeros. A softcap makes the kernel bound by instruction issue
   and the special-function unit rather than by memory, so its path is lean: tanh from one
   exp2 and one reciprocal (``rcp.approx`` on CUDA), and for caps up to
   :data:`BOUNDED_SOFTCAP` a logsumexp with no running maximum and no per-tile reductions,
   and, opt-in for bf16 (:data:`FAST_TANH`), the hardware's ``tanh.approx``
   (``python -m benchmarks.aot_compile`` reports the instructions per logit of each variant).
3. ``dx_c = G @ W`` and ``dW += G^T @ x_c`` by cuBLAS (``addmm_``, beta=1); ``db`` is a
   column sum of G in fp32.

So forward+backward costs exactly the 6*N*D*V matmul flops in cuBLAS plus about three passes
over each (C, V) block (read, read, write) in the row kernel; scoring costs 2*N*D*V plus one
read. Memory beyond inputs and gradients is one (C, V) block in the input dtype, C chosen from
``chunk_bytes`` (default :data:`DEFAULT_CHUNK_BYTES`, 1008 MiB) and rounded to a multiple of
128 rows, so there are only a few chunks (the (V, D) dW accumulator is touched once per chunk,
not once per small token block), plus, when there are several chunks and it takes at most a
quarter of the budget, an fp32 dW accumulator and each chunk's product before it is added
(:func:`plan`): they share the budget. With a single chunk dW is one cuBLAS GEMM (fp32
accumulation inside); otherwise, without the fp32 accumulator, it is accumulated in the weight
dtype, the running sum rounded once per chunk.

Only the gradients asked for are computed: a frozen head (``needs[1]`` False) costs 4*N*D*V,
with no dW buffer. Losses and lse are fp32; ``lse`` is 0 at ignored tokens (only their
coefficient, 0, is ever used with it). fp16, bf16 and fp32 only: the registry sends fp64
elsewhere.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

# Larger chunks are faster (on an H200 at the Gemma head, 2 GiB chunks beat 768 MiB ones by
# 10%: the dW GEMM reads and writes all of dW once per chunk, so fewer chunks, less traffic).
# 1008 MiB is the 1 GiB goal above inputs and gradients less 16 MiB for the small buffers (the
# H200 baseline measured nothing above them but the logits block): 4 chunks of 2048 rows at the
# Gemma-2 head (V=256000), 2 of 4096 at the Llama-3 head (V=128256), where 896 MiB took 5 and 3.
DEFAULT_CHUNK_BYTES = 1008 << 20
# The default of ``linear_ce(overlap=None)``: the two-stream schedule halves every chunk, so it
# must win back more than the larger chunks give; it is off until a GPU run shows it does
# (benchmarks/gpu_bench.py times it as "fastweight_overlap").
OVERLAP = False

# Launch configurations of the row kernel, keyed by the element size of the logits block.
# benchmarks/aot_compile.py compiles each one for sm_80 and sm_90; keep the table small.
ROW_CONFIGS = {
    2: {"BLOCK_M": 1, "BLOCK_V": 4096, "num_warps": 8},  # bf16, fp16
    4: {"BLOCK_M": 1, "BLOCK_V": 2048, "num_warps": 8},  # fp32
}
ROW_CONFIGS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# The largest softcap whose logsumexp runs without a running maximum (``BOUNDED``): every term
# exp2((t - 1) * cap * log2(e)) stays above 2^-115, inside fp32's normal (non-flushed) range.
BOUNDED_SOFTCAP = 40.0
# Inline PTX (``rcp.approx``, ``tanh.approx``) only where it compiles: NVIDIA GPUs, not ROCm's
# "cuda" devices.
_NVIDIA = torch.version.hip is None
# The default of the row kernel's fast tanh (``config["FAST_TANH"]`` overrides it): under a
# softcap up to BOUNDED_SOFTCAP, bf16 logits only, the capped logits come from the hardware's
# ``tanh.approx.f32``, one special-function operation instead of two. Its relative error,
# FAST_TANH_ERROR (PTX ISA: 2^-10.987), is a quarter of bf16's rounding of the logits it reads
# (2^-9); fp16 (2^-11) and fp32 logits keep the exact tanh. Off until a GPU run shows it faster
# (benchmarks/gpu_bench.py times it as "fastweight_fast_tanh").
FAST_TANH = False
FAST_TANH_ERROR = 2.0 ** -10.987
_FAST_TANH_ERROR = tl.constexpr(FAST_TANH_ERROR)


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _reciprocal(x, PTX: tl.constexpr):
    """1 / x. ``PTX`` (CUDA only): one ``rcp.approx.ftz.f32`` (1 ulp), where ``/`` compiles to
    ``div.full.f32``: the same reciprocal plus range checks that operands in [1, 2] never need."""
    if PTX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _tanh_approx(u, PTX: tl.constexpr):
    """tanh(u) in one special-function operation, ``tanh.approx.f32`` (CUDA), whose relative
    error is up to :data:`FAST_TANH_ERROR`. Off CUDA (the interpreter) it is the exact tanh
    shrunk by that worst case, so that tests without a GPU exercise the fast path's error budget."""
    if PTX:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        e = tl.exp2(tl.abs(u) * (-2.0 * _LOG2E))
        t = (1.0 - e) / (1.0 + e) * (1.0 - _FAST_TANH_ERROR)
        return tl.where(u < 0, -t, t)


@triton.jit
def _capped_tanh(z, k, inv_cap, PTX: tl.constexpr, FAST: tl.constexpr):
    """(tanh(z / cap), (1 - tanh(z / cap)^2) / 4) for ``k = -2 log2(e) / cap``,
    ``inv_cap = 1 / cap``, from e = exp(-2|z| / cap) in (0, 1]: no overflow, no NaN, and the
    quarter slope e / (1 + e)^2 keeps full relative precision where tanh saturates (no
    1 - t*t cancellation). The slope comes as a quarter so that callers fold the 4 into a
    per-row factor; a caller that uses only t does not compute the slope (dead code).

    Exact (``FAST`` off): t and the slope from e and r = 1 / (1 + e), two special-function
    operations (exp2, and ``rcp.approx`` when ``PTX``). ``FAST``: t by :func:`_tanh_approx`, one
    operation; the slope, when used, from e and 1 / (1 + e) = (1 + |t|) / 2, which needs no
    reciprocal and keeps the slope's relative error near t's (in [1, 2], 1 + |t| does not
    cancel)."""
    if FAST:
        t = _tanh_approx(z * inv_cap, PTX)
        e = tl.exp2(tl.abs(z) * k)
        h = 0.5 + 0.5 * tl.abs(t)
        return t, e * h * h
    else:
        e = tl.exp2(tl.abs(z) * k)
        r = _reciprocal(1.0 + e, PTX)
        t = r - e * r
        return tl.where(z < 0, -t, t), e * r * r


@triton.jit
def _ce_rows_kernel(
    logits_ptr, stride_row,
    targets_ptr, coeff_ptr, lse_in_ptr,
    loss_ptr, lse_ptr, hit_ptr,
    n_rows, n_cols,
    softcap, smoothing, z_loss,
    SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr,
    GRAD: tl.constexpr, LSE_GIVEN: tl.constexpr, HIT: tl.constexpr,
    BOUNDED: tl.constexpr, PTX: tl.constexpr, FAST_TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per-row CE over a (n_rows, n_cols) logits block; optionally its gradient, in place.

    The loss of a row is (1 - smoothing) * (lse - z_y) + smoothing * (lse - mean(z))
    + z_loss * lse^2; ``hit`` is whether z_y attains the row's maximum (the argmax is right).

    ``BOUNDED`` (softcap <= ``BOUNDED_SOFTCAP``): capped logits lie in [-cap, cap], so
    exp(z - cap) lies in [exp(-2 cap), 1], in fp32's normal range: the logsumexp needs no
    running maximum. Sweep 1 then keeps element-wise partial sums in registers and reduces them
    once per row instead of twice per tile. The capped logits are carried as t = tanh(z / cap):
    exp(z - cap) = exp2((t - 1) * cap * log2(e)).

    A program whose rows are all ignored (a prompt) does no arithmetic: sweep 1 does not run and
    sweep 2 only writes zeros."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < n_rows
    tgt = tl.load(targets_ptr + rows, mask=row_in, other=-1)
    live = row_in & (tgt >= 0)
    # An invalid label (>= n_cols) reads no logit: its loss and gradient are NaN instead.
    invalid = live & (tgt >= n_cols)
    row_ptr = logits_ptr + rows.to(tl.int64) * stride_row
    cols0 = tl.arange(0, BLOCK_V)
    k = -2.0 * _LOG2E / softcap          # exp2 scale of tanh's e = exp(-2|z| / cap)
    inv_cap = 1.0 / softcap
    cap2 = softcap * _LOG2E              # a capped logit in log2 units is cap2 * t
    any_live = tl.sum(live.to(tl.int32), axis=0) > 0
    sweep_end = tl.where(any_live, n_cols, 0)

    if LSE_GIVEN:
        lse = tl.load(lse_in_ptr + rows, mask=live, other=0.0)
    elif BOUNDED:
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        t_max = tl.full([BLOCK_M, BLOCK_V], -2.0, tl.float32)
        t_sum = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for v0 in range(0, sweep_end, BLOCK_V):
            cols = v0 + cols0
            mask = live[:, None] & (cols < n_cols)[None, :]
            z = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            t = _capped_tanh(z, k, inv_cap, PTX, FAST_TANH)[0]
            acc += tl.where(mask, tl.exp2((t - 1.0) * cap2), 0.0)
            if HIT:
                t_max = tl.maximum(t_max, tl.where(mask, t, -2.0))
            if SMOOTH:
                t_sum += tl.where(mask, t, 0.0)
        lse = softcap + tl.log2(tl.where(live, tl.sum(acc, axis=1), 1.0)) * _LN2
        m = softcap * tl.max(t_max, axis=1)
        zsum = softcap * tl.sum(t_sum, axis=1)
    else:
        m = tl.full([BLOCK_M], -1.0e30, tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        zsum = tl.zeros([BLOCK_M], tl.float32)
        for v0 in range(0, sweep_end, BLOCK_V):
            cols = v0 + cols0
            mask = live[:, None] & (cols < n_cols)[None, :]
            z = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                z = softcap * _capped_tanh(z, k, inv_cap, PTX, FAST_TANH)[0]
            if SMOOTH:
                zsum += tl.sum(tl.where(mask, z, 0.0), axis=1)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            s = s * tl.exp2((m - m_new) * _LOG2E) + tl.sum(tl.exp2((z - m_new[:, None]) * _LOG2E), axis=1)
            m = m_new
        lse = m + tl.log2(tl.where(live, s, 1.0)) * _LN2

    if not LSE_GIVEN:
        y = tl.where(live & ~invalid, tgt, 0)
        zy = tl.load(row_ptr + y, mask=live & ~invalid, other=0.0).to(tl.float32)
        if SOFTCAP:
            zy = softcap * _capped_tanh(zy, k, inv_cap, PTX, FAST_TANH)[0]
        loss = lse - zy
        if SMOOTH:
            loss = (1.0 - smoothing) * loss + smoothing * (lse - zsum / n_cols)
        if ZLOSS:
            loss += z_loss * lse * lse
        if HIT:
            tl.store(hit_ptr + rows, (live & ~invalid & (zy >= m)).to(tl.int8), mask=row_in)
        lse = tl.where(live, lse, 0.0)
        loss = tl.where(invalid, float("nan"), loss)
        tl.store(loss_ptr + rows, tl.where(live, loss, 0.0), mask=row_in)
        tl.store(lse_ptr + rows, lse, mask=row_in)

    if GRAD:
        c = tl.load(coeff_ptr + rows, mask=live, other=0.0).to(tl.float32)
        c = tl.where(live, c, 0.0)
        c = tl.where(invalid, float("nan"), c)
        if SMOOTH:
            c_target = c * (1.0 - smoothing)
            c_flat = c * (smoothing / n_cols)
        else:
            c_target = c
        # d(z_loss * lse^2)/dz = 2 z_loss lse softmax(z): it only rescales the softmax term.
        c_soft = c * (1.0 + 2.0 * z_loss * lse) if ZLOSS else c
        if SOFTCAP:  # the 4 of the slope 4 * quarter_slope, once per row
            c_soft = 4.0 * c_soft
            c_target = 4.0 * c_target
            if SMOOTH:
                c_flat = 4.0 * c_flat
        y32 = tgt.to(tl.int32)  # a 32-bit compare per element, not a 64-bit one
        # An ignored row has c = 0 and a finite p (its logits read as 0, its lse is 0), so its
        # gradient comes out as exact zeros without a select.
        # Backwards over the row: the tiles sweep 1 read last are re-read first, while they may
        # still be in L2. Each element's gradient is independent of the order (bit-identical).
        last = (tl.cdiv(sweep_end, BLOCK_V) - 1) * BLOCK_V
        for v0 in range(0, sweep_end, BLOCK_V):
            cols = (last - v0) + cols0
            mask = row_in[:, None] & (cols < n_cols)[None, :]
            z = tl.load(row_ptr[:, None] + cols[None, :], mask=mask & live[:, None], other=0.0).to(tl.float32)
            # exp(z - lse): the difference first, in natural units, where it is exact or
            # rounded once; scaling both terms by log2(e) first would round each, an error
            # that grows with |lse| and cancels badly in p_y - 1 at a confident target.
            if SOFTCAP:
                t, quarter_slope = _capped_tanh(z, k, inv_cap, PTX, FAST_TANH)
                p = tl.exp2((softcap * t - lse[:, None]) * _LOG2E)
            else:
                p = tl.exp2((z - lse[:, None]) * _LOG2E)
            g = c_soft[:, None] * p
            if SMOOTH:
                g -= c_flat[:, None]
            g = tl.where(cols[None, :] == y32[:, None], g - c_target[:, None], g)
            if SOFTCAP:
                g *= quarter_slope
            tl.store(row_ptr[:, None] + cols[None, :], g.to(logits_ptr.dtype.element_ty), mask=mask)
        # All rows ignored: the loop above did not run; zeros instead.
        zeros = tl.zeros([BLOCK_M, BLOCK_V], logits_ptr.dtype.element_ty)
        for v0 in range(sweep_end, n_cols, BLOCK_V):
            cols = v0 + cols0
            tl.store(row_ptr[:, None] + cols[None, :], zeros, mask=row_in[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _scale_kernel(t_ptr, n, s_ptr, BLOCK: tl.constexpr):
    """t *= s over n elements, grid-stride; when s == 1 no program touches t. ``s`` is rounded
    to t's dtype first, as ``t.mul_(s.to(t.dtype))`` rounds it."""
    s = tl.load(s_ptr).to(t_ptr.dtype.element_ty).to(tl.float32)
    if s != 1.0:
        start = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        offs0 = tl.arange(0, BLOCK)
        for base in range(start, n, step):
            offs = base + offs0
            mask = offs < n
            v = tl.load(t_ptr + offs, mask=mask).to(tl.float32)
            tl.store(t_ptr + offs, (v * s).to(t_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def row_config(dtype: torch.dtype) -> dict:
    """The default launch configuration of ``_ce_rows_kernel`` for logits of ``dtype``."""
    return dict(ROW_CONFIGS[dtype.itemsize])


def fast_tanh_default(dtype: torch.dtype) -> bool:
    """Whether the row kernel takes the fast tanh for logits of ``dtype`` unless its config says
    otherwise (under a softcap up to BOUNDED_SOFTCAP): :data:`FAST_TANH`, for bf16 only."""
    return FAST_TANH and dtype == torch.bfloat16


def new_buffer(shape, dtype: torch.dtype, device) -> Tensor:
    """Every buffer the launchers allocate comes from here (tests NaN-fill it to catch an
    element a kernel forgets to write)."""
    return torch.empty(shape, dtype=dtype, device=device)


def chunk_rows(num_tokens: int, vocab: int, itemsize: int, chunk_bytes: int | None) -> int:
    """Rows per chunk: all of them if the (N, V) block fits the budget, else equal chunks
    rounded up to a multiple of 128 rows (for the GEMM tiles) when that still fits."""
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    max_rows = max(1, budget // max(1, vocab * itemsize))
    if num_tokens <= max_rows:
        return max(num_tokens, 1)
    n_chunks = math.ceil(num_tokens / max_rows)
    rows = math.ceil(num_tokens / n_chunks)
    rounded = math.ceil(rows / 128) * 128
    return rounded if rounded <= max_rows else rows


def fp32_accumulator_bytes(vocab: int, hidden: int, weight_dtype: torch.dtype) -> int:
    """What accumulating dW in fp32 allocates: the (V, D) fp32 accumulator, and each chunk's
    (V, D) product in the weight dtype before it is added."""
    return vocab * hidden * (4 + weight_dtype.itemsize)


def plan(num_tokens: int, vocab: int, hidden: int, itemsize: int, weight_dtype: torch.dtype,
         chunk_bytes: int | None, overlap: bool, need_w: bool = True,
         dw_fp32_accumulate: bool | None = None) -> tuple[int, bool, bool]:
    """(rows per chunk, double-buffered, dW accumulated in fp32) within ``chunk_bytes`` (default
    :data:`DEFAULT_CHUNK_BYTES`): the logits buffers and the fp32 accumulation's buffers
    (:func:`fp32_accumulator_bytes`) together. dW is accumulated in fp32 (each chunk's product is
    rounded once on its own, not the running sum once per chunk) when there are several chunks
    and that takes at most a quarter of the budget; the logits get the rest. ``overlap`` splits
    the logits' share into two buffers when there are several chunks."""
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    several = chunk_rows(num_tokens, vocab, itemsize, budget) < num_tokens
    acc_bytes = fp32_accumulator_bytes(vocab, hidden, weight_dtype)
    if not need_w:
        fp32_acc = False
    elif dw_fp32_accumulate is None:
        fp32_acc = weight_dtype != torch.float32 and several and acc_bytes <= budget // 4
    else:
        fp32_acc = dw_fp32_accumulate
    logits_budget = budget - (acc_bytes if fp32_acc else 0)  # at least one row, below
    step = chunk_rows(num_tokens, vocab, itemsize, logits_budget)
    double_buffered = overlap and step < num_tokens
    if double_buffered:
        step = chunk_rows(num_tokens, vocab, itemsize, logits_budget // 2)
    return step, double_buffered, fp32_acc


SCALE_CONFIG = {"BLOCK": 2048, "num_warps": 8, "max_programs": 1024}


def scale_(t: Tensor, s: Tensor) -> Tensor:
    """``t *= s`` in place for a 0-d tensor ``s`` (the contract's ``scale_``): the upstream
    gradient of a mean or sum loss. A mean loss's upstream is usually exactly 1; the kernel
    reads ``s`` on the device and then leaves ``t`` alone, so a (V, D) dW is not read and
    rewritten for nothing, and the host never waits for the device."""
    if not t.is_contiguous() or s.dtype != torch.float32:
        return t.mul_(s.to(t.dtype))
    n = t.numel()
    if n == 0:
        return t
    cfg = SCALE_CONFIG
    grid = (min(triton.cdiv(n, cfg["BLOCK"]), cfg["max_programs"]),)
    _scale_kernel[grid](t, n, s.reshape(1), BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return t


def _launch_rows(logits: Tensor, targets, coeff, lse_in, loss, lse, hits, softcap, label_smoothing, z_loss,
                 grad: bool, config: dict | None):
    rows, vocab = logits.shape
    if rows == 0:
        return
    cfg = row_config(logits.dtype)
    if config:
        cfg.update(config)
    block_m = cfg["BLOCK_M"]
    bounded = softcap is not None and 0.0 < softcap <= BOUNDED_SOFTCAP
    fast_tanh = cfg.get("FAST_TANH", fast_tanh_default(logits.dtype))
    _ce_rows_kernel[(triton.cdiv(rows, block_m),)](
        logits, logits.stride(0),
        targets,
        coeff if coeff is not None else loss,      # unread placeholders when absent
        lse_in if lse_in is not None else loss,
        loss, lse, hits if hits is not None else targets,
        rows, vocab,
        float(softcap) if softcap is not None else 1.0, float(label_smoothing), float(z_loss),
        SOFTCAP=softcap is not None, SMOOTH=bool(label_smoothing), ZLOSS=bool(z_loss),
        GRAD=grad, LSE_GIVEN=lse_in is not None, HIT=hits is not None,
        BOUNDED=bounded, PTX=_NVIDIA and logits.is_cuda, FAST_TANH=bool(fast_tanh) and bounded,
        BLOCK_M=block_m, BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
    )


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """One side stream per CUDA device, reused across calls."""
    key = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[key]


def linear_ce(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, coeff: Tensor | None = None, *,
              lse: Tensor | None = None, softcap: float | None = None, label_smoothing: float = 0.0,
              z_loss: float = 0.0, hits: bool = False, chunk_bytes: int | None = None,
              needs: tuple[bool, bool, bool] = (True, True, True), config: dict | None = None,
              dw_fp32_accumulate: bool | None = None, overlap: bool | None = None):
    """The linear-CE contract (``fastweight.linear_ce.chunked``): (loss, lse, hits, grads).

    When the tokens do not fit one chunk, ``overlap`` (default :data:`OVERLAP`) splits the budget into
    two half-size logits buffers and runs the row kernel and the gradient GEMMs of chunk i on a
    side stream while the logits GEMM of chunk i+1 runs on the current one; events order the
    reuse of each buffer. The arithmetic is the same as without streams at the same chunk size,
    so the results are bit-identical. ``config`` overrides the row kernel's launch
    configuration and ``dw_fp32_accumulate`` the choice of dW accumulator (tests). With a saved
    ``lse`` the row kernel skips its first sweep and the loss is None."""
    if x.dtype not in ROW_CONFIGS_DTYPES:
        raise TypeError(f"the Triton linear-CE kernels take fp16, bf16 or fp32, not {x.dtype}")
    n, d = x.shape
    vocab = weight.shape[0]
    device = x.device
    x = x.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    targets = targets.contiguous().to(torch.int64)
    grad = coeff is not None
    need_x, need_w, need_b = needs if grad else (False, False, False)
    need_b = need_b and bias is not None
    if grad:
        coeff = coeff.to(torch.float32).contiguous()
    loss = new_buffer((n,), torch.float32, device) if lse is None else None
    lse_out = new_buffer((n,), torch.float32, device) if lse is None else lse.to(torch.float32).contiguous()
    hit_out = new_buffer((n,), torch.int8, device) if hits and lse is None else None

    overlap = OVERLAP if overlap is None else overlap
    step, double_buffered, dw_fp32_accumulate = plan(
        n, vocab, d, x.element_size(), weight.dtype, chunk_bytes, overlap, need_w, dw_fp32_accumulate)
    n_chunks = math.ceil(n / step) if n else 0
    dx = new_buffer((n, d), x.dtype, device) if need_x else None
    dw = dw_acc = None
    if need_w:
        dw = new_buffer((vocab, d), weight.dtype, device)
        dw_acc = torch.zeros(vocab, d, dtype=torch.float32, device=device) if dw_fp32_accumulate else dw
        if n_chunks == 0:
            dw_acc.zero_()
    db32 = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
    buffers = [new_buffer((min(step, n), vocab), x.dtype, device) for _ in range(2 if double_buffered else 1)] \
        if n else []
    streams = double_buffered and device.type == "cuda"
    main = torch.cuda.current_stream(device) if streams else None
    side = _side_stream(device) if streams else None
    buffer_free = [None] * len(buffers)  # events: the side stream is done with buffer k

    for i, start in enumerate(range(0, n, step)):
        stop = min(start + step, n)
        xc = x[start:stop]
        k = i % len(buffers)
        z = buffers[k][: stop - start]
        if streams and buffer_free[k] is not None:
            main.wait_event(buffer_free[k])
        if bias is None:
            torch.mm(xc, weight.t(), out=z)
        else:  # the bias in the GEMM epilogue: one rounding, as F.linear does
            torch.addmm(bias, xc, weight.t(), out=z)
        with torch.cuda.stream(side) if streams else contextlib.nullcontext():
            if streams:
                side.wait_stream(main)  # the logits of this chunk are written
            # Without a saved lse the loss and lse of the chunk are written; with one, only read.
            _launch_rows(z, targets[start:stop], coeff[start:stop] if grad else None,
                         lse_out[start:stop] if lse is not None else None,
                         loss[start:stop] if loss is not None else lse_out[start:stop],
                         lse_out[start:stop], hit_out[start:stop] if hit_out is not None else None,
                         softcap, label_smoothing, z_loss, grad, config)
            if grad:
                _accumulate_gradients(z, xc, weight, dx, dw, dw_acc, db32, start, stop, first=i == 0)
            if streams:
                buffer_free[k] = side.record_event()
    if streams:
        main.wait_stream(side)
    hit_out = hit_out.bool() if hit_out is not None else None
    if not grad:
        return loss, lse_out, hit_out, None
    if need_w and dw_acc is not dw:
        dw.copy_(dw_acc)
    return loss, lse_out, hit_out, (dx, dw, db32.to(bias.dtype) if need_b else None)


def _accumulate_gradients(grad_logits: Tensor, xc: Tensor, weight: Tensor, dx, dw, dw_acc, db32,
                          start: int, stop: int, first: bool) -> None:
    """dx rows, dW and db of one chunk from its gradient of the logits (those not None)."""
    if dx is not None:
        torch.mm(grad_logits, weight, out=dx[start:stop])
    if dw is not None:
        if dw_acc is dw:
            if first:
                torch.mm(grad_logits.t(), xc, out=dw)
            else:
                dw.addmm_(grad_logits.t(), xc)
        else:
            dw_acc.add_(torch.mm(grad_logits.t(), xc))
    if db32 is not None:
        db32.add_(grad_logits.sum(0, dtype=torch.float32))
