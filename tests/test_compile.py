"""The custom ops pass torch.library.opcheck, and weighted_ce works under torch.compile."""
from __future__ import annotations

import pytest
import torch

import fastweight as fw
from fastweight.aggregation import ops as aggregation_ops
from fastweight.linear_ce import ops
from helpers import random_batch


def _op_args(bias: bool, dtype=torch.float32):
    hidden, weight, labels, _, b = random_batch("single", bias=bias, seed=21, dtype=dtype)
    targets = torch.where(labels >= 0, labels, -1)
    coeff = torch.rand(targets.shape) * (targets >= 0)
    req = lambda t: None if t is None else t.requires_grad_()  # noqa: E731
    return req(hidden), req(weight), req(b), targets, coeff


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_linear_ce_ops(bias):
    x, w, b, targets, coeff = _op_args(bias)
    common = (2.0, 0.1, 0.01, "torch", 4096)   # softcap, smoothing, z-loss, impl, chunk_bytes
    needs = (True, True, bias)
    torch.library.opcheck(ops.linear_ce_tokens, (x, w, b, targets) + common + (True,))
    lse = ops.linear_ce_tokens(x, w, b, targets, *common, False)[1]
    torch.library.opcheck(ops.linear_ce_grad, (x.detach(), w.detach(), None if b is None else b.detach(),
                                               targets, coeff, lse.detach()) + common + needs)
    # The reduced op scales saved gradients in place; opcheck's repeated backward needs them kept.
    with ops.retain_graph_safe():
        torch.library.opcheck(ops.linear_ce_reduced, (x, w, b, targets, coeff) + common + (True,) + needs,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_opcheck_segment_mean():
    values = torch.randn(11, requires_grad=True)
    cu = torch.tensor([0, 3, 3, 11])
    valid = torch.rand(11) > 0.3
    torch.library.opcheck(aggregation_ops.segment_mean, (values, cu, valid))


@pytest.mark.parametrize("reduction", ["mean", "none", "sequence"])
def test_torch_compile_matches_eager(reduction):
    hidden, weight, labels, cu, bias = random_batch("packed", bias=True, seed=22)
    sw = torch.rand(cu.numel() - 1) if reduction == "mean" else None

    def loss_fn(h, w, b):
        out = fw.weighted_ce(h, w, labels, sw, bias=b, cu_seqlens=cu, shift=True, softcap=3.0,
                             reduction=reduction)
        return out if out.dim() == 0 else (out * torch.arange(out.numel()).view(out.shape)).sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=False)
    results = []
    for fn in (loss_fn, compiled):
        h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
        out = fn(h, w, b)
        out.backward()
        results.append((out.detach(), h.grad, w.grad, b.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)
