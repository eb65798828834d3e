"""flow_weights: exp(-loss / tau), tau = median by default."""
from __future__ import annotations

import math

import pytest
import torch

import fastweight as fw


def test_median_temperature():
    losses = torch.tensor([1.0, 2.0, 4.0])
    w = fw.flow_weights(losses)
    torch.testing.assert_close(w, torch.exp(-losses / 2.0))
    assert w.dtype == torch.float32
    assert w[1].item() == pytest.approx(math.exp(-1))


def test_numeric_temperature_and_no_normalisation():
    losses = torch.tensor([0.5, 1.5], dtype=torch.float64)
    torch.testing.assert_close(fw.flow_weights(losses, 0.5), torch.exp(-losses.float() / 0.5))


def test_non_finite_losses_get_zero_with_a_count():
    losses = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    with pytest.warns(RuntimeWarning, match="2 of 4"):
        w = fw.flow_weights(losses)
    assert w[1] == 0 and w[3] == 0
    torch.testing.assert_close(w[[0, 2]], torch.exp(-torch.tensor([1.0, 3.0]) / 2.0))


@pytest.mark.parametrize("temperature", ["mean", 0, -1.0, True])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        fw.flow_weights(torch.tensor([1.0, 2.0]), temperature)


def test_bad_losses():
    with pytest.raises(TypeError, match="losses"):
        fw.flow_weights(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="losses"):
        fw.flow_weights(torch.rand(2, 2))
    with pytest.raises(ValueError, match="median"):
        fw.flow_weights(torch.zeros(3))


def test_easier_samples_weigh_more_and_reach_the_loss():
    hidden, weight = torch.randn(3, 6, 8), torch.randn(20, 8)
    labels = torch.randint(0, 20, (3, 6))
    f = fw.sequence_losses(hidden, weight, labels, shift=True)
    w = fw.flow_weights(f)
    order = torch.argsort(f)
    assert (w[order].diff() <= 0).all()
    base = fw.weighted_ce(hidden, weight, labels, w, shift=True, sample_reduction="mean", reduction="sum")
    torch.testing.assert_close(base, (w * f).sum())
