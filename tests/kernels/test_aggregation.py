"""The Triton loss-aggregation ops (fastweight.kernels.aggregation) against the PyTorch reference
(fastweight.aggregation.reference). Under TRITON_INTERPRET=1 on a CPU-only machine."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import assert_close_to_ref, rounding_floor  # noqa: E402
from fastweight.aggregation import reference as R  # noqa: E402
from fastweight.kernels import aggregation as K  # noqa: E402
from fastweight.testing import poison_buffers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison():
    with poison_buffers():
        yield


def batch(lengths, seed=0, valid_frac=0.7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    n = int(cu[-1])
    valid = torch.rand(n, generator=g) < valid_frac
    sw = (torch.rand(len(lengths), generator=g) * 3).to(dtype)
    tw = (torch.rand(n, generator=g) * 2).to(dtype)
    values = torch.randn(n, generator=g).to(dtype)
    return [t.to(DEVICE) for t in (cu, valid, sw, tw, values)]


# Odd lengths, an empty segment, one longer than the kernel block (1024) so it loops.
LENGTHS = [5, 0, 13, 1, 1031, 7]


def _eq(a, b, name, exact=False, truth=None, floor=None):
    """``a`` (kernel) has ``b``'s (the PyTorch reference's) shape and dtype and no unwritten
    element; then it equals ``b`` (exact), or passes DESIGN.md's rule against the float64
    ``truth`` with ``b`` as the same-dtype naive run and an eps-scaled ``floor``."""
    assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
    assert not (a.isnan().any() if a.dtype.is_floating_point else (a == -7).any()), f"{name}: unwritten"
    if exact:
        assert torch.equal(a.cpu(), b.cpu()), name
    else:
        assert_close_to_ref(a.cpu(), truth.cpu(), b.cpu(), floor=floor.cpu(), name=name)


def _eq_c(c, c_ref, valid, cu, sw, tw, per_sample_mean):
    """Coefficients valid * sw * tw / n: three roundings of the exact product, then the result's."""
    c64, _ = R.coefficients(valid, cu, sw, tw, per_sample_mean, dtype=torch.float64)
    _eq(c, c_ref, "c", truth=c64, floor=rounding_floor(c64, c64.abs(), 3, c.dtype))


def _eq_means(means, means_ref, values, cu, valid):
    """A mean of n values: (n + 1) eps(acc) mean|v| + eps(out)|mean|, acc being the result's dtype."""
    m64, counts = R.segment_mean(values.double(), cu, valid)
    mabs, _ = R.segment_mean(values.double().abs(), cu, valid)
    _eq(means, means_ref, "means", truth=m64,
        floor=rounding_floor(m64, mabs, (counts + 1).double(), means.dtype))


def _eq_grad(g, g_ref, grad, cu, counts, valid):
    """grad / n: one rounding, then the result's."""
    t64 = R.segment_mean_backward(grad.double(), cu, counts, valid)
    _eq(g, g_ref, "grad", truth=t64, floor=rounding_floor(t64, t64.abs(), 1, g.dtype))


@pytest.mark.parametrize("per_sample_mean", [False, True], ids=["token", "mean"])
@pytest.mark.parametrize("weights", ["none", "sample", "token", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_coefficients(per_sample_mean, weights, dtype):
    cu, valid, sw, tw, _ = batch(LENGTHS, seed=1, dtype=dtype)
    valid[cu[2]:cu[3]] = False  # a segment with tokens but none valid: c = 0, not NaN
    sw_ = sw if weights in ("sample", "both") else None
    tw_ = tw if weights in ("token", "both") else None
    c, counts = K.coefficients(valid, cu, sw_, tw_, per_sample_mean)
    c_ref, counts_ref = R.coefficients(valid, cu, sw_, tw_, per_sample_mean)
    _eq(counts, counts_ref, "counts", exact=True)
    _eq_c(c, c_ref, valid, cu, sw_, tw_, per_sample_mean)
    assert (c[~valid] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=["fp32", "fp16", "fp64"])
def test_segment_mean_and_backward(dtype):
    cu, valid, _, _, values = batch(LENGTHS, seed=2, dtype=dtype)
    values[~valid] = float("nan")  # ignored positions must not leak in
    means, counts = K.segment_mean(values, cu, valid)
    # The kernels accumulate in fp32 whatever they read (fp64 runs go to the reference backend).
    means_ref, counts_ref = R.segment_mean(values.float() if dtype == torch.float64 else values, cu, valid)
    _eq(counts, counts_ref, "counts", exact=True)
    _eq_means(means, means_ref, values, cu, valid)
    # Non-uniform upstream, and the stride-0 one that .sum() gives.
    for grad in (torch.randn(len(LENGTHS), device=DEVICE), torch.ones((), device=DEVICE).expand(len(LENGTHS))):
        g = K.segment_mean_backward(grad, cu, counts, valid)
        _eq_grad(g, R.segment_mean_backward(grad, cu, counts_ref, valid), grad, cu, counts_ref, valid)


def test_int32_cu_seqlens_and_empty():
    cu, valid, sw, tw, values = batch([3, 4], seed=3)
    c, counts = K.coefficients(valid, cu.to(torch.int32), sw, tw, True)
    c_ref, counts_ref = R.coefficients(valid, cu, sw, tw, True)
    _eq_c(c, c_ref, valid, cu, sw, tw, True)
    _eq(counts, counts_ref, "counts", exact=True)
    # No segments at all, and segments with no tokens.
    empty_cu = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    none = torch.zeros(0, dtype=torch.bool, device=DEVICE)
    c, counts = K.coefficients(none, empty_cu, None, None, False)
    assert c.shape == (0,) and counts.shape == (0,)
    m, counts = K.segment_mean(torch.zeros(0, device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE), none)
    assert m.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]
    assert K.segment_mean_backward(torch.ones(2, device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE),
                                   counts, none).shape == (0,)


@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6), seed=st.integers(0, 2 ** 16),
       per_sample_mean=st.booleans())
def test_random_layouts(lengths, seed, per_sample_mean):
    cu, valid, sw, tw, values = batch(lengths, seed=seed)
    c, counts = K.coefficients(valid, cu, sw, tw, per_sample_mean)
    c_ref, counts_ref = R.coefficients(valid, cu, sw, tw, per_sample_mean)
    _eq_c(c, c_ref, valid, cu, sw, tw, per_sample_mean)
    _eq(counts, counts_ref, "counts", exact=True)
    means, _ = K.segment_mean(values, cu, valid)
    _eq_means(means, R.segment_mean(values, cu, valid)[0], values, cu, valid)


@pytest.mark.gpu
def test_bf16_weights_and_values():
    cu, valid, sw, tw, values = batch(LENGTHS, seed=4, dtype=torch.bfloat16)
    c, counts = K.coefficients(valid, cu, sw, tw, True)
    c_ref, counts_ref = R.coefficients(valid, cu, sw, tw, True)
    _eq_c(c, c_ref, valid, cu, sw, tw, True)
    means, _ = K.segment_mean(values, cu, valid)
    _eq_means(means, R.segment_mean(values, cu, valid)[0], values, cu, valid)
