"""Hypothesis: random shapes, masks, packings, weights and chunk sizes against the float64 truth."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastweight as fw
from conftest import assert_close_to_ref
from helpers import expected, weighted_ce_floors


@st.composite
def packed_batches(draw):
    lengths = draw(st.lists(st.integers(0, 9), min_size=1, max_size=5))
    n = sum(lengths)
    d = draw(st.integers(1, 7))
    v = draw(st.integers(2, 23))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) < draw(st.floats(0.0, 1.0))
    labels[mask] = -100
    cu = torch.tensor([0] + lengths).cumsum(0)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64)
    sw = torch.rand(len(lengths), generator=g, dtype=torch.float64) * draw(st.sampled_from([0.0, 1.0, 100.0]))
    tw = torch.rand(n, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    opts = dict(shift=draw(st.booleans()), sample_reduction=draw(st.sampled_from(["token", "mean"])),
                softcap=draw(st.sampled_from([None, 1.5])), label_smoothing=draw(st.sampled_from([0.0, 0.2])))
    return hidden, weight, labels, cu, sw, tw, opts, draw(st.integers(1, 4))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packed_batches(), st.sampled_from(["mean", "sum", "none", "sequence"]))
def test_random_packed_batches(batch, reduction):
    hidden, weight, labels, cu, sw, tw, opts, chunk = batch
    weighted = reduction in ("mean", "sum")
    kw = dict(opts, cu_seqlens=cu, reduction=reduction,
              token_weights=tw if weighted else None)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fw.weighted_ce(h, w, labels, sw if weighted else None, impl="torch",
                         chunk_bytes=chunk * 8 * weight.shape[0], **kw)
    he = hidden.clone().requires_grad_()
    we = weight.clone().requires_grad_()
    ref = expected(he, we, labels, sw if weighted else None, **kw)
    hn = hidden.clone().requires_grad_()
    wn = weight.clone().requires_grad_()
    naive = fw.weighted_ce(hn, wn, labels, sw if weighted else None, impl="reference", **kw)
    up = torch.randn(out.shape, dtype=torch.float64)
    floors, out_floor = weighted_ce_floors(hidden, weight, labels, dict(kw, sample_weights=sw if weighted else None),
                                           up if out.dim() else None, ref)
    assert_close_to_ref(out, ref, naive, floor=out_floor, name="out")
    g_fast = torch.autograd.grad(out, (h, w), up)
    g_ref = torch.autograd.grad(ref, (he, we), up, allow_unused=True)
    g_naive = torch.autograd.grad(naive, (hn, wn), up, allow_unused=True)
    for name, a, b, n, floor in zip(("d_hidden", "d_weight"), g_fast, g_ref, g_naive, (floors.dx, floors.dw)):
        b = b if b is not None else torch.zeros_like(a)
        n = n if n is not None else torch.zeros_like(a)
        assert_close_to_ref(a, b, n, floor=floor(b), name=name)


def _loss_and_grads(fn, hidden, weight, labels, sw, kw, upstream):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fn(h, w, labels, sw, kw["cu_seqlens"], kw["token_weights"])
    return out, torch.autograd.grad(out, (h, w), upstream)


# Time-boxed: each new combination of options compiles once (a few seconds on 2 cores).
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packed_batches(), st.sampled_from(["mean", "none"]), st.booleans())
def test_compiled_equals_eager_and_a_bad_label_is_nan(batch, reduction, inject_bad_label):
    hidden, weight, labels, cu, sw, tw, opts, _ = batch
    hidden, weight, sw = hidden.float(), weight.float(), sw.float()
    weighted = reduction == "mean"
    kw = dict(cu_seqlens=cu, token_weights=tw.float() if (weighted and tw is not None) else None)
    inject_bad_label = inject_bad_label and labels.numel() > 0
    if inject_bad_label:  # token 0 (unshifted) gets a label outside [0, V): its loss must be NaN
        opts = dict(opts, shift=False)
        labels = labels.clone()
        labels[0] = weight.shape[0] + 5
    options = dict(opts, reduction=reduction, impl="torch")

    def loss(h, w, y, s, cu_seqlens, token_weights):
        return fw.weighted_ce(h, w, y, s if weighted else None, cu_seqlens=cu_seqlens,
                              token_weights=token_weights, **options)

    upstream = torch.ones(()) if weighted else torch.randn(labels.shape)
    compiled = torch.compile(loss, backend="aot_eager", dynamic=True)
    got, got_grads = _loss_and_grads(compiled, hidden, weight, labels, sw, kw, upstream)
    if inject_bad_label:
        assert torch.isnan(got if weighted else got[0])
        if not weighted:  # the other tokens are untouched
            assert torch.isfinite(got[1:]).all()
        return
    want, want_grads = _loss_and_grads(loss, hidden, weight, labels, sw, kw, upstream)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
