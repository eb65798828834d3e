"""The tolerance rule itself (conftest.assert_close_to_ref and its floors, DESIGN.md "Testing
rules"): it passes correct results wherever their rounding lands, and still fails real errors."""
from __future__ import annotations

import zlib

import pytest
import torch

import fastweight as fw
from conftest import assert_close_to_ref, eps, rounding_floor
from helpers import expected, random_batch, weighted_ce_floors
from test_weighted_ce import OPTIONS, _inputs, _run


def _double(kw):
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}


def _amd_failing_case():
    """test_weighted_ce's [all-packed-sum-token-token-fp32] case, which failed on an AMD EPYC under
    the old fixed atol (error 1.729e-06 vs bound 1.357e-06): (fast, ref, naive, floor)."""
    seed = zlib.crc32(b"allpackedsumtokentoken") % 10_000
    hidden, weight, labels, kw = _inputs("packed", OPTIONS["all"], torch.float32, "sum", "token", seed)
    kw["sample_reduction"] = "token"
    ref, _ = _run(expected, hidden.double(), weight.double(), labels, _double(kw))
    naive, _ = _run(fw.weighted_ce, hidden, weight, labels, dict(kw, impl="reference"))
    fast, _ = _run(fw.weighted_ce, hidden, weight, labels,
                   dict(kw, impl="torch", chunk_bytes=7 * weight.shape[0] * 10))
    _, floor = weighted_ce_floors(hidden, weight, labels, kw, None, ref)
    return fast, ref, naive, floor


def test_loss_sum_passes_and_a_1e5_relative_perturbation_fails():
    fast, ref, naive, floor = _amd_failing_case()
    margins = assert_close_to_ref(fast, ref, naive, floor=floor, name="loss")
    assert margins["max"] < 1
    bound = 2 * (naive.double() - ref).abs() + floor
    # The bound is a few ulps of the loss, far from the perturbation it has to catch.
    assert bound < 1e-5 * ref.abs() / 4, (bound.item(), ref.item())
    for factor in (1 + 1e-5, 1 - 1e-5):
        with pytest.raises(AssertionError, match="loss"):
            assert_close_to_ref(fast * factor, ref, naive, floor=floor, name="loss")


def _problem(dtype, seed=5):
    """(fast, naive, ref64, floors) of weighted_ce(reduction="none") with a non-uniform upstream
    gradient: the PyTorch chunked path (several chunks) vs the reference path in ``dtype``."""
    hidden, weight, labels, _, bias = random_batch("single", B=7, T=9, D=37, V=211, dtype=dtype, bias=True,
                                                  seed=seed)
    kw = dict(bias=bias, softcap=20.0, label_smoothing=0.1, reduction="none")
    up = torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 0.5
    ref = _run(expected, hidden.double(), weight.double(), labels, _double(kw), up.double())
    naive = _run(fw.weighted_ce, hidden, weight, labels, dict(kw, impl="reference"), up)
    fast = _run(fw.weighted_ce, hidden, weight, labels, dict(kw, impl="torch", chunk_bytes=17 * 211 * 10), up)
    floors, _ = weighted_ce_floors(hidden, weight, labels, kw, up, ref[0])
    return fast, naive, ref, floors


def _rows_detected(fast, ref, naive, floor, factor):
    """For every row with a non-zero reference: does scaling that row of ``fast`` by ``factor`` fail?"""
    detected = []
    for i in range(fast.shape[0]):
        if ref[i].abs().max() == 0:
            continue
        bad = fast.clone()
        bad[i] = (bad[i].double() * factor).to(bad.dtype)
        try:
            assert_close_to_ref(bad, ref, naive, floor=floor, name="perturbed")
            detected.append(False)
        except AssertionError:
            detected.append(True)
    return detected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_gradient_with_one_row_scaled_fails(dtype):
    """One row of dX or dW scaled by 1.01 (10 fp16 eps) fails. In bf16 1.01 is 1.3 eps, within
    the output's own rounding: the row is scaled by 1.04 there (5 bf16 eps) instead."""
    factor = 1.01 if dtype == torch.float16 else 1.04
    (_, (f_dx, f_dw, _)), (_, (n_dx, n_dw, _)), (_, (r_dx, r_dw, _)), floors = _problem(dtype)
    for name, f, n, r, floor in (("dx", f_dx, n_dx, r_dx, floors.dx(r_dx)), ("dw", f_dw, n_dw, r_dw, floors.dw(r_dw))):
        assert f.dtype == dtype
        assert_close_to_ref(f, r, n, floor=floor, name=name)           # the correct result passes
        big = int(r.norm(dim=1).argmax())                               # the row with the largest gradient
        bad = f.clone()
        bad[big] = (bad[big].double() * factor).to(dtype)
        assert not torch.equal(bad, f)
        with pytest.raises(AssertionError, match=name):
            assert_close_to_ref(bad, r, n, floor=floor, name=name)


def test_fp32_gradient_with_one_row_off_by_1e3_fails():
    """1e-3 relative on any one row of an fp32 dX or dW fails, whichever row it is."""
    (_, (f_dx, f_dw, _)), (_, (n_dx, n_dw, _)), (_, (r_dx, r_dw, _)), floors = _problem(torch.float32)
    for name, f, n, r, floor in (("dx", f_dx, n_dx, r_dx, floors.dx(r_dx)), ("dw", f_dw, n_dw, r_dw, floors.dw(r_dw))):
        assert_close_to_ref(f, r, n, floor=floor, name=name)
        detected = _rows_detected(f, r, n, floor, 1 + 1e-3)
        assert len(detected) > 5 and all(detected), (name, detected)


def _old_elementwise_rule(fast, ref, naive, atol):
    """The rule this file replaces: |fast - ref| <= 2 |naive - ref| + atol, element by element."""
    err = (fast.double() - ref).abs()
    bound = 2 * (naive.double() - ref).abs() + atol + eps(fast.dtype) * ref.abs()
    assert (err <= bound).all(), f"{int((err > bound).sum())} elements above the element-wise bound"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rounding_on_other_elements_passes(dtype):
    """dW = G^T X in 16-bit as ONE GEMM (naive) vs the sum of two chunk GEMMs (fast, as a chunked
    kernel computes it): equally accurate, but the roundings land on other elements. The aggregate
    rule passes it; the old element-wise comparison with naive fails it."""
    g = torch.Generator().manual_seed(3)
    n, v, d = 301, 97, 67
    G = (torch.randn(n, v, generator=g) * 0.3).to(dtype)
    X = torch.randn(n, d, generator=g).to(dtype)
    ref = G.double().t() @ X.double()                        # exact products of the 16-bit inputs
    naive = G.t() @ X
    fast = ((G[:150].t() @ X[:150]).float() + (G[150:].t() @ X[150:]).float()).to(dtype)
    floor = rounding_floor(ref, G.double().abs().t() @ X.double().abs(), n, dtype, dtype)
    assert not torch.equal(fast, naive)
    assert_close_to_ref(fast, ref, naive, floor=floor, name="dW")
    with pytest.raises(AssertionError, match="element-wise"):
        _old_elementwise_rule(fast, ref, naive, atol={torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype])
    # A simulation of the same: naive's errors, moved to other elements, pass as well.
    err = naive.double() - ref
    moved = (ref + err.reshape(-1)[torch.randperm(err.numel(), generator=g)].reshape(err.shape)).to(dtype)
    assert_close_to_ref(moved, ref, naive, floor=floor, name="dW moved")
    # ... and a real error on top of it does not.
    moved[int(ref.norm(dim=1).argmax())] *= 1.05
    with pytest.raises(AssertionError, match="dW moved"):
        assert_close_to_ref(moved, ref, naive, floor=floor, name="dW moved")


def test_floor_is_required_and_never_negative():
    ref = torch.ones(3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="floor must be a tensor"):
        assert_close_to_ref(ref.float(), ref, None, floor=1e-3, name="x")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_ref(torch.tensor([1.0, float("nan"), 1.0]), ref, None, floor=torch.ones(3), name="x")
