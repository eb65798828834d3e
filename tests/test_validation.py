"""Bad input raises a ValueError/TypeError naming the argument; edge cases that are not errors."""
from __future__ import annotations

import pytest
import torch

import fastweight as fw

D, V = 6, 10


def _ok():
    return dict(hidden=torch.randn(2, 5, D), weight=torch.randn(V, D), labels=torch.randint(0, V, (2, 5)))


def _call(**over):
    kw = _ok()
    kw.update(over)
    return fw.weighted_ce(kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"), **kw)


@pytest.mark.parametrize("over,exc,match", [
    (dict(hidden=torch.randn(2, 5, D + 1)), ValueError, "weight"),
    (dict(hidden=torch.randn(10)), ValueError, "hidden"),
    (dict(labels=torch.randint(0, V, (2, 4))), ValueError, "labels"),
    (dict(labels=torch.rand(2, 5)), TypeError, "labels"),
    (dict(hidden=torch.randint(0, 3, (2, 5, D))), TypeError, "hidden"),
    (dict(weight=torch.randn(V, D, dtype=torch.float64)), TypeError, "weight"),
    (dict(bias=torch.randn(V + 1)), ValueError, "bias"),
    (dict(sample_weights=torch.rand(3)), ValueError, "sample_weights"),
    (dict(sample_weights=torch.ones(2, dtype=torch.int64)), TypeError, "sample_weights"),
    (dict(token_weights=torch.rand(2, 4)), ValueError, "token_weights"),
    (dict(cu_seqlens=torch.tensor([0, 10])), ValueError, "cu_seqlens"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(sample_reduction="sample"), ValueError, "sample_reduction"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
    (dict(num_items=0), ValueError, "num_items"),
    (dict(num_items="7"), TypeError, "num_items"),
    (dict(impl="cuda"), ValueError, "impl"),
    (dict(reduction="none", sample_weights=torch.rand(2)), ValueError, "sample_weights"),
    (dict(reduction="sequence", token_weights=torch.rand(2, 5)), ValueError, "token_weights"),
])
def test_static_errors_name_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


@pytest.mark.parametrize("over,match", [
    (dict(labels=torch.tensor([[0, 1, 2, 3, V]] * 2)), f"labels.*{V}"),
    (dict(labels=torch.tensor([[0, 1, 2, 3, -5]] * 2)), "labels.*-5"),
    (dict(sample_weights=torch.tensor([1.0, -0.5])), "sample_weights.*-0.5"),
    (dict(sample_weights=torch.tensor([1.0, float("nan")])), "sample_weights.*nan"),
    (dict(token_weights=torch.full((2, 5), float("inf"))), "token_weights.*inf"),
])
def test_value_errors_name_the_argument_and_value(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)


@pytest.mark.parametrize("cu", [[1, 5, 10], [0, 6, 5, 10], [0, 5, 9]])
def test_bad_cu_seqlens(cu):
    with pytest.raises(ValueError, match="cu_seqlens"):
        fw.weighted_ce(torch.randn(10, D), torch.randn(V, D), torch.randint(0, V, (10,)),
                       cu_seqlens=torch.tensor(cu))
    with pytest.raises(TypeError, match="cu_seqlens"):
        fw.weighted_ce(torch.randn(10, D), torch.randn(V, D), torch.randint(0, V, (10,)),
                       cu_seqlens=torch.tensor([0.0, 10.0]))


def test_value_checks_can_be_turned_off():
    bad = dict(sample_weights=torch.tensor([1.0, -0.5]))
    fw.set_value_checks(False)
    try:
        out = _call(**bad)  # no sync, no check: the user vouches for the data
        assert torch.isfinite(out)
    finally:
        fw.set_value_checks(True)
    with pytest.raises(ValueError):
        _call(**bad)


def test_ignore_index_may_be_a_class():
    labels = torch.tensor([[3, 3, 1, 2, 3]] * 2)
    per_token = _call(labels=labels, ignore_index=3, reduction="none")
    assert (per_token[labels == 3] == 0).all() and (per_token[labels != 3] > 0).all()
