"""The contract's edges: invalid labels in every backend and mode, num_items, the bias dtype,
options a backend cannot honour, torch.compile(fullgraph=True) on the first call, and the
frozen-head path (only the gradients autograd needs)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastweight as fw
from fastweight import validation
from helpers import expected, random_batch

V = 11


def _batch(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 5, 8, generator=g)
    weight = torch.randn(V, 8, generator=g)
    labels = torch.randint(0, V, (2, 5), generator=g)
    b = torch.randn(V, generator=g) if bias else None
    return hidden, weight, labels, b


@pytest.fixture
def checks_off():
    validation.set_value_checks(False)
    yield
    validation.set_value_checks(True)


IMPLS = ["torch", "reference", "triton"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [V, V + 1000, -1], ids=["V", "far", "minus1"])
def test_invalid_label_raises_in_eager_mode(impl, bad):
    hidden, weight, labels, _ = _batch()
    labels[0, 1] = bad
    with pytest.raises(ValueError, match=f"`labels` holds {bad}"):
        fw.weighted_ce(hidden, weight, labels, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sequence"])
@pytest.mark.parametrize("bad", [V, V + 1000, -1], ids=["V", "far", "minus1"])
def test_invalid_label_is_nan_with_checks_off(impl, reduction, bad, checks_off):
    hidden, weight, labels, _ = _batch(seed=1)
    labels[0, 1] = bad
    h = hidden.clone().requires_grad_()
    out = fw.weighted_ce(h, weight, labels, impl=impl, reduction=reduction)
    if reduction == "none":
        assert torch.isnan(out[0, 1]) and torch.isfinite(out[1]).all() and torch.isfinite(out[0, 2:]).all()
    elif reduction == "sequence":
        assert torch.isnan(out[0]) and torch.isfinite(out[1])
    else:
        assert torch.isnan(out)
    # The other tokens are exact: the bad one never leaked into its neighbours.
    clean = labels.clone()
    clean[0, 1] = -100
    per_token = fw.weighted_ce(hidden, weight, labels, impl=impl, reduction="none")
    reference = fw.weighted_ce(hidden, weight, clean, impl="reference", reduction="none")
    keep = clean != -100
    torch.testing.assert_close(per_token[keep], reference[keep])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_invalid_label_is_nan_under_torch_compile(impl, reduction):
    hidden, weight, labels, _ = _batch(seed=2)
    labels[0, 1] = V
    fn = torch.compile(lambda h, w, y: fw.weighted_ce(h, w, y, reduction=reduction, impl=impl),
                       backend="aot_eager")
    out = fn(hidden, weight, labels)
    assert torch.isnan(out).any()
    if reduction == "none":
        assert torch.isnan(out).sum() == 1


def test_negative_weight_is_caught_in_eager_mode():
    hidden, weight, labels, _ = _batch()
    with pytest.raises(ValueError, match="sample_weights"):
        fw.weighted_ce(hidden, weight, labels, torch.tensor([1.0, -2.0]))


@pytest.mark.parametrize("num_items", [0.5, 2.5, torch.tensor(0.5), torch.tensor(3)])
def test_num_items_divides_exactly(num_items):
    hidden, weight, labels, _ = _batch(seed=3)
    total = fw.weighted_ce(hidden, weight, labels, reduction="sum")
    mean = fw.weighted_ce(hidden, weight, labels, num_items=num_items)
    torch.testing.assert_close(mean, total / float(num_items))
    torch.testing.assert_close(mean.double(), expected(hidden, weight, labels, num_items=float(num_items)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_items", [0, -3, 0.0, float("inf"), torch.tensor(0), torch.tensor(-3.0),
                                       torch.tensor(float("nan"))])
def test_non_positive_num_items_raise(num_items):
    hidden, weight, labels, _ = _batch()
    with pytest.raises(ValueError, match="num_items"):
        fw.weighted_ce(hidden, weight, labels, num_items=num_items)
    with pytest.raises(ValueError, match="num_items"):
        fw.token_coefficients(labels, num_items=num_items)


@pytest.mark.parametrize("num_items,check", [(torch.tensor(0), torch.isinf), (torch.tensor(-3), lambda t: t < 0)])
def test_non_positive_tensor_num_items_with_checks_off_is_never_clamped(num_items, check, checks_off):
    hidden, weight, labels, _ = _batch()
    assert check(fw.weighted_ce(hidden, weight, labels, num_items=num_items))


def test_bias_dtype_is_validated():
    hidden, weight, labels, bias = _batch(bias=True)
    with pytest.raises(TypeError, match="`bias` dtype torch.float64"):
        fw.weighted_ce(hidden, weight, labels, bias=bias.double())


def test_options_a_backend_cannot_honour_raise():
    hidden, weight, labels, _ = _batch()
    with pytest.raises(ValueError, match="chunk_bytes"):
        fw.weighted_ce(hidden, weight, labels, impl="reference", chunk_bytes=1 << 20)
    with pytest.raises(ValueError, match="chunk_bytes"):
        fw.weighted_ce(hidden, weight, labels, chunk_bytes=0)
    with pytest.raises(TypeError, match="chunk_size"):
        fw.sequence_losses(hidden, weight, labels, chunk_size=3)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_chunk_bytes_is_honoured_by_every_chunking_backend(impl, monkeypatch):
    """A budget of one token per chunk gives the same result as one chunk, and the env default
    is read only when the call gives none."""
    hidden, weight, labels, _ = _batch(seed=4)
    one_chunk = fw.weighted_ce(hidden, weight, labels, impl=impl, chunk_bytes=1 << 30, reduction="none")
    per_token = fw.weighted_ce(hidden, weight, labels, impl=impl, chunk_bytes=1, reduction="none")
    torch.testing.assert_close(per_token, one_chunk)
    monkeypatch.setenv("FASTWEIGHT_CHUNK_BYTES", "not-a-number")
    with pytest.raises(ValueError):
        fw.weighted_ce(hidden, weight, labels, impl=impl, reduction="none")
    fw.weighted_ce(hidden, weight, labels, impl=impl, chunk_bytes=1 << 20, reduction="none")


def test_info_lists_every_environment_variable(monkeypatch, capsys):
    from fastweight import env, info
    monkeypatch.setenv("FASTWEIGHT_CHUNK_BYTES", "12345")
    assert info.run(None) == 0
    out = capsys.readouterr().out
    for var in env.VARIABLES:
        assert var in out
    assert "FASTWEIGHT_CHUNK_BYTES=12345" in out


def test_every_environment_variable_read_is_declared():
    """No module reads a FASTWEIGHT_* variable that `fastweight info` would not list."""
    import re
    from pathlib import Path

    from fastweight import env
    root = Path(fw.__file__).resolve().parent
    found = set()
    for path in list(root.rglob("*.py")) + list((root.parent / "kernels").rglob("*.py")):
        found |= set(re.findall(r"FASTWEIGHT_[A-Z_]+", path.read_text()))
    found -= {"FASTWEIGHT_BUILD_KEY", "FASTWEIGHT_WITH_CUDA", "FASTWEIGHT_PYTHON_MODULE"}  # C++ defines
    assert found <= set(env.VARIABLES), found - set(env.VARIABLES)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_compile_on_the_first_call_of_a_fresh_process(reduction):
    code = textwrap.dedent(f"""
        import torch, fastweight as fw
        g = torch.Generator().manual_seed(0)
        h = torch.randn(2, 5, 8, generator=g, requires_grad=True)
        w = torch.randn(11, 8, generator=g, requires_grad=True)
        y = torch.randint(0, 11, (2, 5), generator=g)
        sw = torch.tensor([1.0, 0.5])
        def f(h, w, y, sw):
            out = fw.weighted_ce(h, w, y, sw if {reduction!r} == "mean" else None, shift=True,
                                 reduction={reduction!r})
            return out.sum()
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        out = compiled(h, w, y, sw)
        out.backward()
        eager_h, eager_w = h.grad.clone(), w.grad.clone()
        h.grad = w.grad = None
        ref = f(h, w, y, sw)
        ref.backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(eager_h, h.grad)
        torch.testing.assert_close(eager_w, w.grad)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sequence"])
def test_frozen_head_computes_no_weight_gradient(impl, reduction):
    hidden, weight, labels, cu, bias = random_batch("packed", B=3, T=7, D=10, V=23, bias=True, seed=5)
    frozen = {}
    for head_trainable in (True, False):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(head_trainable)
        b = bias.clone().requires_grad_(head_trainable)
        # torch.func (the reference's gradients) does not run under a dispatch-mode spy
        with _Shapes() if impl != "reference" else _NoSpy() as spy:
            out = fw.weighted_ce(h, w, labels, cu_seqlens=cu, bias=b, impl=impl, reduction=reduction)
            (out * torch.arange(1.0, out.numel() + 1).view(out.shape)).sum().backward()
        frozen[head_trainable] = (h.grad, w.grad, spy.shapes)
    torch.testing.assert_close(frozen[False][0], frozen[True][0])
    assert frozen[False][1] is None and frozen[True][1] is not None
    if impl != "reference":
        # No (V, D) tensor exists at all on the frozen path: no dW buffer, no dW GEMM.
        assert tuple(weight.shape) in frozen[True][2]
        assert tuple(weight.shape) not in frozen[False][2]


class _NoSpy:
    shapes = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap,smoothing", [(None, 0.0), (3.0, 0.1)], ids=["plain", "cap+smooth"])
def test_z_loss_lse_and_accuracy_against_float64(impl, reduction, softcap, smoothing):
    """z-loss enters the loss and every gradient; lse and accuracy are per token, labels-shaped."""
    hidden, weight, labels, cu, bias = random_batch("packed", B=3, T=6, D=9, V=17, bias=True, seed=8)
    sw = torch.rand(cu.numel() - 1, generator=torch.Generator().manual_seed(8)) if reduction == "mean" else None
    options = dict(cu_seqlens=cu, bias=bias, shift=True, softcap=softcap, label_smoothing=smoothing,
                   reduction=reduction, z_loss=0.2)
    z = hidden.double() @ weight.double().T + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    # Under shift, the target of input position t is label t+1 of its sequence.
    counted_positions = [t for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) for t in range(s, e - 1)
                         if labels[t + 1] != -100]
    right, wrong = counted_positions[0], counted_positions[1]
    labels[right + 1] = z[right].argmax()
    labels[wrong + 1] = (z[wrong].argmax() + 1) % weight.shape[0]
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fw.weighted_ce(h, w, labels, sw, impl=impl, return_lse=True, return_accuracy=True, **options)
    assert isinstance(out, fw.WeightedCEOutput)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    truth = expected(h64, w64, labels, None if sw is None else sw.double(), **{**options, "bias": bias.double()})
    upstream = torch.randn(truth.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (out.loss.double() * upstream).sum().backward()
    (truth * upstream).sum().backward()
    torch.testing.assert_close(out.loss.double(), truth.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    # A z-loss of 0.2 moves the loss: the test above would catch a backend that ignored it.
    plain = fw.weighted_ce(hidden, weight, labels, sw, impl=impl, **{**options, "z_loss": 0.0})
    assert not torch.allclose(plain, out.loss.detach())
    counted = torch.zeros(labels.shape, dtype=torch.bool)
    counted[counted_positions] = True
    target = torch.full_like(labels, -100)
    target[counted_positions] = labels[[t + 1 for t in counted_positions]]
    assert out.lse.shape == out.accuracy.shape == labels.shape and out.accuracy.dtype == torch.bool
    torch.testing.assert_close(out.lse[counted].double(), torch.logsumexp(z, -1)[counted], rtol=1e-5, atol=1e-5)
    assert (out.lse[~counted] == 0).all() and not out.accuracy[~counted].any()
    assert torch.equal(out.accuracy[counted], z.argmax(-1)[counted] == target[counted])
    assert out.accuracy[right] and not out.accuracy[wrong]
