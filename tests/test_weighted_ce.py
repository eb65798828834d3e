"""weighted_ce against the float64 ground truth: every option, layout, reduction and dtype."""
from __future__ import annotations

import zlib

import pytest
import torch

import fastweight as fw
from conftest import assert_close_to_ref
from helpers import expected, random_batch, weighted_ce_floors

LAYOUTS = ["rows", "packed", "single"]
# Option bundles: each exercises several options at once; together they cover every option.
OPTIONS = {
    "plain": dict(),
    "shift": dict(shift=True),
    "bias+softcap": dict(bias=True, softcap=2.5, shift=True),
    "smoothing": dict(label_smoothing=0.15),
    "all": dict(bias=True, softcap=4.0, label_smoothing=0.1, shift=True, ignore_index=3),
}


def _inputs(layout, opts, dtype, reduction, weights, seed):
    opts = dict(opts)
    use_bias = opts.pop("bias", False)
    ignore_index = opts.get("ignore_index", -100)
    hidden, weight, labels, cu, bias = random_batch(layout, dtype=dtype, bias=use_bias, seed=seed,
                                                    ignore_index=ignore_index)
    num_samples = cu.numel() - 1 if cu is not None else (hidden.shape[0] if hidden.dim() == 3 else 1)
    g = torch.Generator().manual_seed(seed + 1)
    kw = dict(opts, bias=bias, cu_seqlens=cu, reduction=reduction)
    if reduction in ("mean", "sum") and weights in ("sample", "both"):
        kw["sample_weights"] = torch.rand(num_samples, generator=g) * 2
    if reduction in ("mean", "sum") and weights in ("token", "both"):
        kw["token_weights"] = torch.rand(labels.shape, generator=g)
    return hidden, weight, labels, kw


def _run(fn, hidden, weight, labels, kw, upstream=None):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = kw["bias"].detach().clone().requires_grad_() if kw.get("bias") is not None else None
    out = fn(h, w, labels, **dict(kw, bias=b))
    up = upstream if upstream is not None else torch.ones_like(out)
    grads = torch.autograd.grad(out, [t for t in (h, w, b) if t is not None], up.to(out.dtype))
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction,sample_reduction,weights", [
    ("mean", "token", "both"), ("mean", "mean", "sample"), ("sum", "token", "token"),
    ("sum", "mean", "both"), ("mean", "token", "none"), ("none", "token", "none"),
    ("sequence", "token", "none"),
])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bundle", list(OPTIONS))
def test_torch_path_matches_float64(bundle, layout, reduction, sample_reduction, weights, dtype):
    seed = zlib.crc32(f"{bundle}{layout}{reduction}{sample_reduction}{weights}".encode()) % 10_000
    hidden, weight, labels, kw = _inputs(layout, OPTIONS[bundle], dtype, reduction, weights, seed)
    kw["sample_reduction"] = sample_reduction
    # Small chunks: several per batch, the last one ragged.
    fast_kw = dict(kw, impl="torch", chunk_bytes=7 * weight.shape[0] * 10)
    # A non-uniform upstream gradient for the per-token and per-sample outputs.
    probe = fw.weighted_ce(hidden.double(), weight.double(), labels, impl="reference",
                           **{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                              for k, v in kw.items()})
    upstream = torch.randn(probe.shape, generator=torch.Generator().manual_seed(seed)) if probe.dim() else None

    ref, ref_grads = _run(expected, hidden.double(), weight.double(), labels,
                          {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                           for k, v in kw.items()}, upstream)
    naive, naive_grads = _run(fw.weighted_ce, hidden, weight, labels, dict(kw, impl="reference"), upstream)
    fast, fast_grads = _run(fw.weighted_ce, hidden, weight, labels, fast_kw, upstream)

    assert fast.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    floors, out_floor = weighted_ce_floors(hidden, weight, labels, kw, upstream, ref)
    assert_close_to_ref(fast, ref, naive, floor=out_floor, name="loss")
    # The reference path has no same-dtype baseline of its own: the floor alone bounds it.
    assert_close_to_ref(naive, ref, None, floor=out_floor, name="reference path")
    for name, f, n, r, src, floor in zip(("d_hidden", "d_weight", "d_bias"), fast_grads, naive_grads, ref_grads,
                                         (hidden, weight, kw.get("bias")), (floors.dx, floors.dw, floors.db)):
        assert f.dtype == src.dtype, f"{name} dtype {f.dtype} != {src.dtype}"
        assert_close_to_ref(f, r, n, floor=floor(r), name=name)


@pytest.mark.parametrize("num_items", [5, torch.tensor(17.0)])
@pytest.mark.parametrize("sample_reduction", ["token", "mean"])
def test_num_items_divides_the_sum(num_items, sample_reduction):
    hidden, weight, labels, cu, _ = random_batch("packed", seed=3)
    sw = torch.rand(cu.numel() - 1)
    kw = dict(cu_seqlens=cu, sample_reduction=sample_reduction, shift=True)
    total = fw.weighted_ce(hidden, weight, labels, sw, reduction="sum", **kw)
    mean = fw.weighted_ce(hidden, weight, labels, sw, num_items=num_items, **kw)
    torch.testing.assert_close(mean, total / float(num_items))
    ref = expected(hidden, weight, labels, sw, num_items=float(num_items), **kw)
    _, floor = weighted_ce_floors(hidden, weight, labels, dict(kw, sample_weights=sw, reduction="mean",
                                                               num_items=float(num_items)), None, ref)
    assert_close_to_ref(mean, ref, None, floor=floor, name="mean with num_items")


def test_gradient_accumulation_with_num_items_equals_one_batch():
    hidden, weight, labels, _, _ = random_batch("rows", B=4, seed=11)
    sw = torch.rand(4)
    valid = int((labels[:, 1:] != -100).sum())
    full = _run(fw.weighted_ce, hidden, weight, labels, dict(sample_weights=sw, shift=True))
    parts = [_run(fw.weighted_ce, hidden[i:i + 2], weight, labels[i:i + 2],
                  dict(sample_weights=sw[i:i + 2], shift=True, num_items=valid)) for i in (0, 2)]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full[0])
    torch.testing.assert_close(parts[0][1][1] + parts[1][1][1], full[1][1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "sequence", "none"])
def test_gradcheck_float64(reduction):
    hidden, weight, labels, cu, bias = random_batch("packed", B=3, T=3, D=4, V=7, dtype=torch.float64,
                                                   bias=True, seed=5)
    sw = torch.rand(3, dtype=torch.float64) if reduction in ("mean", "sum") else None
    f = lambda h, w, b: fw.weighted_ce(h, w, labels, sw, bias=b, cu_seqlens=cu, shift=True,  # noqa: E731
                                       softcap=2.0, label_smoothing=0.1, reduction=reduction,
                                       impl="torch", chunk_bytes=1)
    with fw.retain_graph_safe():
        assert torch.autograd.gradcheck(f, (hidden.requires_grad_(), weight.requires_grad_(),
                                            bias.requires_grad_()))


def test_second_backward_raises_unless_retain_graph_safe():
    hidden, weight, labels, _, _ = random_batch("rows", seed=2)
    h = hidden.requires_grad_()
    loss = fw.weighted_ce(h, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        loss.backward()
    with fw.retain_graph_safe():
        loss = fw.weighted_ce(h, weight, labels)
    h.grad = None
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_precomputed_gradients_become_grad_without_a_copy(reduction, monkeypatch):
    """A mean or sum loss forms dX and dW in its forward; backward hands those very buffers to
    autograd, which adopts them as .grad. A reference left behind (e.g. on ctx) would make
    autograd clone them: a (V, D) copy per step."""
    from fastweight.linear_ce import chunked

    made = {}

    def recording(*args, **kwargs):
        out = chunked_linear_ce(*args, **kwargs)
        if out[3] is not None:
            made.update(dx=out[3][0].data_ptr(), dw=out[3][1].data_ptr())
        return out
    chunked_linear_ce = chunked.linear_ce
    monkeypatch.setattr(chunked, "linear_ce", recording)
    hidden, weight, labels, _, _ = random_batch("rows", seed=4)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    fw.weighted_ce(h, w, labels, reduction=reduction, impl="torch").backward()
    assert made and w.grad.data_ptr() == made["dw"] and h.grad.data_ptr() == made["dx"]


def test_weights_are_constants():
    hidden, weight, labels, _, _ = random_batch("rows", seed=4)
    sw = torch.rand(3, requires_grad=True)
    tw = torch.rand(labels.shape, requires_grad=True)
    h = hidden.requires_grad_()
    loss = fw.weighted_ce(h, weight, labels, sw, token_weights=tw)
    loss.backward()
    assert sw.grad is None and tw.grad is None and h.grad is not None


def test_zero_weight_sample_gets_no_gradient():
    hidden, weight, labels, _, _ = random_batch("rows", seed=6, empty_sample=False)
    h = hidden.requires_grad_()
    fw.weighted_ce(h, weight, labels, torch.tensor([1.0, 0.0, 2.0])).backward()
    assert h.grad[1].abs().max() == 0
    assert h.grad[0].abs().max() > 0 and h.grad[2].abs().max() > 0


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sequence"])
def test_empty_and_all_ignored_batches_are_finite_zeros(impl, reduction):
    weight = torch.randn(11, 5, requires_grad=True)
    for hidden, labels in ((torch.randn(0, 5), torch.zeros(0, dtype=torch.int64)),
                           (torch.randn(2, 4, 5), torch.full((2, 4), -100))):
        h = hidden.requires_grad_()
        out = fw.weighted_ce(h, weight, labels, reduction=reduction, impl=impl)
        assert torch.isfinite(out).all() and (out == 0).all()
        gh, gw = torch.autograd.grad(out.sum(), (h, weight))
        assert torch.isfinite(gh).all() and (gh == 0).all()
        assert torch.isfinite(gw).all() and (gw == 0).all()


def test_non_contiguous_inputs_and_stride0_upstream():
    hidden, weight, labels, _, bias = random_batch("rows", bias=True, seed=8)
    h_nc = hidden.transpose(0, 1).contiguous().transpose(0, 1)     # (B, T, D) with odd strides
    w_nc = weight.t().contiguous().t()
    lab_nc = labels.t().contiguous().t()
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous() and not lab_nc.is_contiguous()
    for reduction in ("none", "sequence", "mean"):
        ref = _run(fw.weighted_ce, hidden, weight, labels, dict(bias=bias, reduction=reduction))
        # .sum() gives a stride-0 (expanded) upstream gradient.
        h = h_nc.detach().requires_grad_()
        w = w_nc.detach().requires_grad_()
        out = fw.weighted_ce(h, w, lab_nc, bias=bias, reduction=reduction, impl="torch")
        out.sum().backward()
        torch.testing.assert_close(out, ref[0])
        torch.testing.assert_close(h.grad, ref[1][0])
        torch.testing.assert_close(w.grad, ref[1][1])


def test_per_token_output_is_indexed_by_input_position():
    hidden, weight, labels, _, _ = random_batch("rows", seed=9, ignore_frac=0.0, empty_sample=False)
    out = fw.weighted_ce(hidden, weight, labels, shift=True, reduction="none")
    assert (out[:, -1] == 0).all()
    unshifted = fw.weighted_ce(hidden[:, :-1], weight, labels[:, 1:], reduction="none")
    torch.testing.assert_close(out[:, :-1], unshifted)


def test_sequence_losses_is_sequence_reduction_and_no_grad_keeps_no_state():
    hidden, weight, labels, cu, _ = random_batch("packed", seed=10)
    expect = fw.weighted_ce(hidden, weight, labels, cu_seqlens=cu, shift=True, reduction="sequence")
    h = hidden.requires_grad_()
    with torch.no_grad():
        got = fw.sequence_losses(h, weight, labels, cu_seqlens=cu, shift=True)
    assert got.grad_fn is None and got.shape == (cu.numel() - 1,)
    torch.testing.assert_close(got, expect)
    assert got[1] == 0  # the empty sample
    with pytest.raises(ValueError, match="reduction"):
        fw.sequence_losses(hidden, weight, labels, cu_seqlens=cu, reduction="mean")


def test_module_holds_the_options():
    hidden, weight, labels, _, _ = random_batch("rows", seed=12)
    sw = torch.rand(3)
    mod = fw.WeightedCrossEntropy(shift=True, softcap=3.0, sample_reduction="mean")
    assert "softcap=3.0" in repr(mod)
    torch.testing.assert_close(mod(hidden, weight, labels, sw),
                               fw.weighted_ce(hidden, weight, labels, sw, shift=True, softcap=3.0,
                                              sample_reduction="mean"))


def test_token_coefficients_reproduce_the_reduction():
    hidden, weight, labels, cu, _ = random_batch("packed", seed=13)
    sw = torch.rand(cu.numel() - 1)
    tw = torch.rand(labels.shape)
    per_token = fw.weighted_ce(hidden, weight, labels, cu_seqlens=cu, shift=True, reduction="none")
    for sample_reduction in ("token", "mean"):
        for reduction in ("mean", "sum"):
            c = fw.token_coefficients(labels, sw, token_weights=tw, cu_seqlens=cu, shift=True,
                                      sample_reduction=sample_reduction, reduction=reduction)
            assert c.dtype == torch.float32 and c.shape == labels.shape
            loss = fw.weighted_ce(hidden, weight, labels, sw, token_weights=tw, cu_seqlens=cu, shift=True,
                                  sample_reduction=sample_reduction, reduction=reduction)
            torch.testing.assert_close((c * per_token).sum(), loss)


def test_chunk_budget_from_env_and_call(monkeypatch):
    from fastweight.linear_ce import chunked, ops
    assert chunked.chunk_tokens(1000, 100, 16, torch.float32, 8 * 100 * 7) == 7
    assert chunked.chunk_tokens(2, 100, 16, torch.float32, 8 * 100 * 7) == 2
    # the documented default: the larger of 64 MiB and V * D * 2 bytes
    assert chunked.default_chunk_bytes(100, 16) == 64 << 20
    assert chunked.default_chunk_bytes(128000, 4096) == 128000 * 4096 * 2
    assert chunked.chunk_tokens(10 ** 6, 100, 16, torch.float32, None) == (64 << 20) // 800
    # the call's budget, else the environment's, else the backend's default
    assert ops._options(0.0, 0.0, 0.0, 0)["chunk_bytes"] is None
    monkeypatch.setenv("FASTWEIGHT_CHUNK_BYTES", str(8 * 100 * 3))
    assert ops._options(0.0, 0.0, 0.0, 0)["chunk_bytes"] == 2400
    assert ops._options(0.0, 0.0, 0.0, 999)["chunk_bytes"] == 999
