"""The Triton linear-CE backend (fastweight.kernels.linear_ce) against the float64 reference.

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (set here and in conftest.py
before triton is imported), with fp32 and fp16 at small odd shapes; bf16 needs a GPU.
"""
from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import LinearCEFloors, assert_close_to_ref  # noqa: E402

from fastweight.kernels import aggregation as KA  # noqa: E402
from fastweight.kernels import linear_ce as K  # noqa: E402
from fastweight.linear_ce.reference import token_losses  # noqa: E402
from fastweight.testing import poison_buffers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, D, V = 37, 29, 203
# Several vocabulary tiles with a ragged last one, and a ragged last row block.
SMALL = {"BLOCK_M": 2, "BLOCK_V": 64}


@pytest.fixture(autouse=True)
def poison():
    """NaN-fill every buffer the launchers allocate: an element a kernel forgets shows up."""
    with poison_buffers():
        yield


def _budget(x, w, chunk_tokens):
    """The chunk_bytes that makes the launcher take chunks of about ``chunk_tokens`` rows."""
    return None if chunk_tokens is None else chunk_tokens * w.shape[0] * x.element_size()


# The contract's one function, in the three shapes the tests read best.
def forward(x, w, b, t, *, chunk_tokens=None, **kw):
    loss, lse, _, grads = K.linear_ce(x, w, b, t, chunk_bytes=_budget(x, w, chunk_tokens), **kw)
    assert grads is None
    return loss, lse


def forward_backward(x, w, b, t, c, *, chunk_tokens=None, **kw):
    loss, _, _, grads = K.linear_ce(x, w, b, t, c, chunk_bytes=_budget(x, w, chunk_tokens), **kw)
    return (loss, *grads)


def backward(x, w, b, t, c, lse, *, chunk_tokens=None, **kw):
    return K.linear_ce(x, w, b, t, c, lse=lse, chunk_bytes=_budget(x, w, chunk_tokens), **kw)[3]


def sequence_forward(x, w, b, t, cu, **kw):
    """Per-sample means from the per-token losses by the Triton segment mean (the scoring pass)."""
    with torch.no_grad():
        loss, _ = forward(x, w, b, t, **kw)
        return KA.segment_mean(loss, cu, t >= 0)[0]


def make(n=N, d=D, v=V, dtype=torch.float32, bias=False, seed=0, ignore=0.2, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * (scale / d ** 0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore] = -1
    # Non-uniform coefficients of both signs (an upstream gradient can be negative); 0 if ignored.
    c = (torch.rand(n, generator=g) * 2 - 0.5) * (t >= 0)
    mv = lambda a: None if a is None else a.to(DEVICE, dtype)  # noqa: E731
    return mv(x), mv(w), mv(b), t.to(DEVICE), c.to(DEVICE, torch.float32)


def lse_of(x, w, b, softcap):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = torch.nn.functional.linear(x, w, b).to(acc)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.logsumexp(z, -1)


def reference(x, w, b, t, c, softcap, ls, dtype):
    """(loss, lse, dx, dw, db) of sum_t c_t l_t by autograd on materialised logits in ``dtype``.
    In float64 a sixth item follows: the LinearCEFloors of the problem in x's own dtype, from
    G = d(sum_t c_t l_t)/d(logits) taken with the logits as a leaf (conftest.logits_grad64)."""
    xs, ws = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    bs = b.detach().to(dtype).requires_grad_() if b is not None else None
    loss = token_losses(xs, ws, bs, t, softcap=softcap, label_smoothing=ls)
    (loss * c.to(loss.dtype)).sum().backward()
    with torch.no_grad():
        lse = lse_of(xs, ws, bs, softcap)
    out = (loss.detach(), lse, xs.grad, ws.grad, None if bs is None else bs.grad)
    if dtype != torch.float64:
        return out
    objective = lambda h, w64, b64: (token_losses(h, w64, b64, t, softcap=softcap, label_smoothing=ls)  # noqa: E731
                                     * c.double()).sum()
    return (*out, LinearCEFloors(x, w, b, objective, softcap, ls))


def check(name, fast, x, ref64, naive, floor):
    assert fast.dtype == x.dtype if name in ("dx", "dw", "db") else fast.dtype == torch.float32, name
    assert_close_to_ref(fast.cpu(), ref64.cpu(), naive.cpu(), floor=floor.cpu(), name=name)


def check_all(out, refs, names, x, valid=None, dw_roundings=1):
    """Check outputs ``names`` against (ref64, naive) by DESIGN.md's aggregate rule, with the
    floors of reference(..., float64). ``dw_roundings``: how many times a 16-bit dW accumulator
    was rounded (once per chunk)."""
    ref64, naive = refs
    floors = ref64[5]
    for name, fast in zip(names, out):
        i = ("loss", "lse", "dx", "dw", "db").index(name)
        r, nv = ref64[i], naive[i]
        if fast is None:
            assert r is None, name
            continue
        floor = {"loss": floors.token_losses, "lse": floors.token_losses, "dx": floors.dx,
                 "dw": lambda ref: floors.dw(ref, dw_roundings), "db": floors.db}[name](r)
        if name == "lse":  # lse is only defined (and only used) at counted tokens
            v = valid.cpu()
            fast, r, nv, floor = fast.cpu()[v], r.cpu()[v], nv.cpu()[v], floor.cpu()[v]
        check(name, fast, x, r, nv, floor)


DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "cap3"])
@pytest.mark.parametrize("ls", [0.0, 0.1], ids=["ls0", "ls.1"])
def test_forward_backward_every_option(dtype, bias, softcap, ls):
    x, w, b, t, c = make(dtype=dtype, bias=bias, seed=1 + 2 * bias + 4 * (softcap is not None) + 8 * (ls > 0))
    refs = (reference(x, w, b, t, c, softcap, ls, torch.float64), reference(x, w, b, t, c, softcap, ls, dtype))
    loss, dx, dw, db = forward_backward(x, w, b, t, c, softcap=softcap, label_smoothing=ls, config=SMALL)
    check_all((loss, dx, dw, db), refs, ("loss", "dx", "dw", "db"), x)
    assert (loss[t < 0] == 0).all()
    assert (db is None) == (b is None)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("feats", [False, True], ids=["plain", "bias+cap+ls"])
@pytest.mark.parametrize("chunk", [None, 11], ids=["one-chunk", "chunks-of-11"])
def test_forward_then_backward_with_saved_lse(dtype, feats, chunk):
    """The none/sequence path: forward (loss, lse), then backward with a non-uniform upstream."""
    softcap, ls = (2.5, 0.2) if feats else (None, 0.0)
    x, w, b, t, c = make(dtype=dtype, bias=feats, seed=7 + feats)
    valid = (t >= 0).cpu()
    refs = (reference(x, w, b, t, c, softcap, ls, torch.float64), reference(x, w, b, t, c, softcap, ls, dtype))
    loss, lse = forward(x, w, b, t, softcap=softcap, label_smoothing=ls, config=SMALL, chunk_tokens=chunk)
    check_all((loss, lse), refs, ("loss", "lse"), x, valid)
    assert (lse[t < 0] == 0).all() and (loss[t < 0] == 0).all()
    dx, dw, db = backward(x, w, b, t, c, lse, softcap=softcap, label_smoothing=ls, config=SMALL,
                            chunk_tokens=chunk)
    check_all((dx, dw, db), refs, ("dx", "dw", "db"), x)
    # Without the saved lse the kernel recomputes it: same gradients.
    dx2, dw2, db2 = backward(x, w, b, t, c, None, softcap=softcap, label_smoothing=ls, config=SMALL,
                               chunk_tokens=chunk)
    check_all((dx2, dw2, db2), refs, ("dx", "dw", "db"), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("fp32_acc", [True, False], ids=["dw-fp32-acc", "dw-out-dtype-acc"])
def test_multi_chunk_weight_gradient(dtype, fp32_acc):
    x, w, b, t, c = make(n=41, dtype=dtype, bias=True, seed=3)
    refs = (reference(x, w, b, t, c, None, 0.0, torch.float64), reference(x, w, b, t, c, None, 0.0, dtype))
    out = forward_backward(x, w, b, t, c, config=SMALL, chunk_tokens=9, dw_fp32_accumulate=fp32_acc)
    check_all(out, refs, ("loss", "dx", "dw", "db"), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_default_launch_config(dtype):
    """The production block sizes (one ragged vocabulary tile here) and the default chunking."""
    x, w, b, t, c = make(n=13, dtype=dtype, bias=True, seed=11)
    refs = (reference(x, w, b, t, c, 4.0, 0.05, torch.float64), reference(x, w, b, t, c, 4.0, 0.05, dtype))
    out = forward_backward(x, w, b, t, c, softcap=4.0, label_smoothing=0.05)
    check_all(out, refs, ("loss", "dx", "dw", "db"), x)


def test_softcap_saturates_without_nan():
    """Large logits: tanh saturates to +-1, the capped softmax stays finite."""
    x, w, b, t, c = make(dtype=torch.float32, seed=5, scale=200.0)
    refs = (reference(x, w, b, t, c, 5.0, 0.1, torch.float64), reference(x, w, b, t, c, 5.0, 0.1, torch.float32))
    out = forward_backward(x, w, b, t, c, softcap=5.0, label_smoothing=0.1, config=SMALL)
    check_all(out, refs, ("loss", "dx", "dw", "db"), x)


@pytest.mark.parametrize("softcap", [30.0, K.BOUNDED_SOFTCAP, 45.0, 500.0], ids=["cap30", "capmax", "cap45", "cap500"])
def test_softcap_both_logsumexp_sweeps(softcap):
    """Caps up to BOUNDED_SOFTCAP sum exp(z - cap) without a running maximum; larger ones take
    the running-maximum sweep. Both meet the reference, hits included, on logits that reach
    past the cap (scale 60)."""
    assert (softcap <= K.BOUNDED_SOFTCAP) == (softcap in (30.0, K.BOUNDED_SOFTCAP))
    x, w, b, t, c = make(dtype=torch.float32, bias=True, seed=17, scale=60.0)
    refs = (reference(x, w, b, t, c, softcap, 0.1, torch.float64),
            reference(x, w, b, t, c, softcap, 0.1, torch.float32))
    out = forward_backward(x, w, b, t, c, softcap=softcap, label_smoothing=0.1, config=SMALL, chunk_tokens=16)
    check_all(out, refs, ("loss", "dx", "dw", "db"), x)
    _, lse, hits, _ = K.linear_ce(x, w, b, t, softcap=softcap, label_smoothing=0.1, hits=True, config=SMALL)
    check_all((lse,), refs, ("lse",), x, valid=t >= 0)
    z = softcap * torch.tanh((x.double() @ w.double().T + b.double()) / softcap)
    live = t >= 0
    expected = z[live].argmax(1) == t[live]
    assert hits[live].tolist() == expected.tolist() and not hits[~live].any()


def test_bounded_softcap_at_the_bottom_of_the_range():
    """Every logit far below -cap: each exp(z - cap) term is exp(-2 cap), the smallest the
    bounded sweep ever adds, and must not flush to zero (lse = -cap + log V exactly)."""
    cap = K.BOUNDED_SOFTCAP
    x = torch.ones(5, 4, device=DEVICE)
    w = torch.full((V, 4), -1e4, device=DEVICE)
    t = torch.arange(5, device=DEVICE)
    loss, lse = forward(x, w, None, t, softcap=cap, config=SMALL)
    expected = torch.full((5,), -cap + torch.log(torch.tensor(float(V))).item())
    torch.testing.assert_close(lse.cpu(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss.cpu(), torch.full((5,), torch.log(torch.tensor(float(V))).item()), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["nocap", "cap30"])
def test_prompt_rows_do_no_arithmetic_and_write_zeros(softcap):
    """Ignored rows in runs (prompts) at the default launch config (one row per program): their
    programs skip the arithmetic, and their gradient rows, written into NaN-poisoned buffers,
    are exact zeros; the other rows meet the reference."""
    x, w, b, t, c = make(n=24, dtype=torch.float32, bias=True, seed=23, ignore=0.0)
    t[:7] = -1
    t[12:15] = -1
    c[t < 0] = 0
    refs = (reference(x, w, b, t, c, softcap, 0.0, torch.float64), reference(x, w, b, t, c, softcap, 0.0, torch.float32))
    loss, _, _, (dx, dw, db) = K.linear_ce(x, w, b, t, c, softcap=softcap, chunk_bytes=10 * V * 4)
    assert (dx[t < 0] == 0).all() and (loss[t < 0] == 0).all()
    check_all((loss, dx, dw, db), refs, ("loss", "dx", "dw", "db"), x)


def test_all_ignored_and_empty():
    x, w, b, t, c = make(n=9, bias=True, seed=2)
    t[:] = -1
    c.zero_()
    loss, dx, dw, db = forward_backward(x, w, b, t, c, config=SMALL, chunk_tokens=4)
    assert (loss == 0).all() and (dx == 0).all() and (dw == 0).all() and (db == 0).all()
    e = x[:0]
    loss, dx, dw, db = forward_backward(e, w, b, t[:0], c[:0])
    assert loss.shape == (0,) and dx.shape == (0, D) and (dw == 0).all() and (db == 0).all()
    loss, lse = forward(e, w, b, t[:0])
    assert loss.shape == lse.shape == (0,)


def test_unknown_options_raise_and_chunk_bytes_is_honoured():
    x, w, b, t, c = make(n=5, seed=4)
    with pytest.raises(TypeError, match="something_else"):
        K.linear_ce(x, w, b, t, something_else=3)
    loss, _ = forward(x, w, b, t, chunk_tokens=2)            # three chunks
    loss2, _ = forward(x, w, b, t, config=SMALL)             # one chunk
    torch.testing.assert_close(loss, loss2)
    assert K.chunk_rows(5, V, 4, _budget(x, w, 2)) == 2


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_sequence_forward(dtype):
    x, w, b, t, _ = make(n=40, dtype=dtype, bias=True, seed=9)
    cu = torch.tensor([0, 7, 7, 19, 22, 40], device=DEVICE)
    t[19:22] = -1  # a sample with no valid token: mean 0, not NaN
    means = sequence_forward(x, w, b, t, cu, softcap=3.0, label_smoothing=0.1, config=SMALL, chunk_tokens=16)
    assert means.dtype == torch.float32 and means.shape == (5,)

    def seq_ref(dt):
        tok = token_losses(x.to(dt), w.to(dt), b.to(dt), t, softcap=3.0, label_smoothing=0.1).detach()
        valid = t >= 0
        out = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            n = int(valid[s:e].sum())
            out.append(tok[s:e].sum() / n if n else tok.new_zeros(()))
        return torch.stack(out)

    ref = seq_ref(torch.float64).cpu()
    floor = LinearCEFloors(x, w, b, softcap=3.0).sequence_means(ref)
    assert_close_to_ref(means.cpu(), ref, seq_ref(dtype).cpu(), floor=floor, name="means")
    assert means[1] == 0 and means[3] == 0
    with torch.no_grad():
        assert sequence_forward(x, w, b, t, cu[:1]).shape == (0,)


@pytest.mark.parametrize("n,vocab", [(8192, 256000), (8192, 128256), (4096, 32000), (1000, 151936), (130, 7)])
def test_chunk_rows_plan(n, vocab):
    """The fewest chunks the default budget allows, each within it, in multiples of 128 rows
    (the GEMM tiles) unless that would take one more chunk."""
    itemsize = 2
    rows = K.chunk_rows(n, vocab, itemsize, None)
    max_rows = K.DEFAULT_CHUNK_BYTES // (vocab * itemsize)
    assert rows * vocab * itemsize <= K.DEFAULT_CHUNK_BYTES
    assert math.ceil(n / rows) == math.ceil(n / max_rows)
    assert rows == n or rows % 128 == 0 or math.ceil(rows / 128) * 128 > max_rows
    assert K.chunk_rows(10, 100, 4, None) == 10
    assert K.chunk_rows(10, 100, 4, 3 * 100 * 4) == 3


@pytest.mark.parametrize("vocab,rows", [(256000, 2048), (128256, 4096)], ids=["gemma2", "llama3"])
def test_default_budget_at_the_benchmark_heads(vocab, rows):
    """What DEFAULT_CHUNK_BYTES is chosen for: 8192 bf16 tokens in 4 chunks of 2048 rows at the
    Gemma-2 head and 2 of 4096 at the Llama-3 head, the block at least 16 MiB under 1 GiB."""
    assert K.chunk_rows(8192, vocab, 2, None) == rows
    assert rows * vocab * 2 <= (1 << 30) - (16 << 20)


@pytest.mark.parametrize("n,vocab,hidden", [(8192, 256000, 2304), (65536, 32000, 1536), (65536, 32000, 1024),
                                             (16384, 32000, 512), (4096, 32000, 512)])
@pytest.mark.parametrize("overlap", [False, True], ids=["one-stream", "two-streams"])
def test_plan_keeps_logits_and_fp32_accumulator_within_the_budget(n, vocab, hidden, overlap):
    """What the launcher allocates beyond inputs and gradients, the logits buffers and, to
    accumulate dW in fp32, a (V, D) fp32 accumulator and a (V, D) bf16 product per chunk, fits
    the default budget; fp32 accumulation is used only with several chunks, when it takes at
    most a quarter of the budget."""
    step, double, fp32_acc = K.plan(n, vocab, hidden, 2, torch.bfloat16, None, overlap)
    buffers = 2 if double else 1
    accumulation = vocab * hidden * (4 + 2)
    used = buffers * min(step, n) * vocab * 2 + (accumulation if fp32_acc else 0)
    assert used <= K.DEFAULT_CHUNK_BYTES
    assert fp32_acc == (step < n and accumulation <= K.DEFAULT_CHUNK_BYTES // 4)
    assert K.fp32_accumulator_bytes(vocab, hidden, torch.bfloat16) == accumulation
    assert double == (overlap and step < n)
    assert K.plan(n, vocab, hidden, 2, torch.bfloat16, None, overlap, need_w=False)[2] is False
    assert K.plan(n, vocab, hidden, 4, torch.float32, None, overlap)[2] is False  # fp32 dW is its own accumulator


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_rule_on_the_torch_backend(dtype):
    """The bf16 GPU tests' checks (check_all and its aggregate rule) run here too: the PyTorch
    chunked backend, through the public API, in several chunks, with large logits as there."""
    import fastweight as fw  # the public API, which the kernels' module does not import

    x, w, b, t, c = make(n=301, d=67, v=1009, dtype=dtype, bias=True, seed=31, scale=8.0)
    refs = (reference(x, w, b, t, c, 30.0, 0.1, torch.float64), reference(x, w, b, t, c, 30.0, 0.1, dtype))
    xs, ws, bs = (a.detach().clone().requires_grad_() for a in (x, w, b))
    loss = fw.weighted_ce(xs, ws, t, bias=bs, ignore_index=-1, softcap=30.0, label_smoothing=0.1,
                          reduction="none", impl="torch", chunk_bytes=97 * w.shape[0] * 10)
    grads = torch.autograd.grad(loss, (xs, ws, bs), c.to(loss.dtype))
    check_all((loss, *grads), refs, ("loss", "dx", "dw", "db"), x)


def _row_kernel(z, t, c, softcap, fast_tanh):
    """The row kernel alone on a logits block (SMALL tiles): (loss, lse, G), G = d(sum c l)/dz
    written over a copy of z."""
    g = z.clone()
    loss, lse = (torch.empty(z.shape[0], device=z.device) for _ in range(2))
    K._launch_rows(g, t, c, None, loss, lse, None, softcap, 0.0, 0.0, True, {**SMALL, "FAST_TANH": fast_tanh})
    return loss, lse, g


@pytest.mark.parametrize("softcap", [30.0, 4.0], ids=["cap30", "cap4"])
def test_fast_tanh_stays_within_its_error_budget(softcap):
    """FAST_TANH: each capped logit cap * t errs by at most delta = cap * FAST_TANH_ERROR (under
    the interpreter the stand-in errs by exactly that much, towards zero). So the lse and the
    target's capped logit move by at most delta each, the loss by 2 delta, each p = softmax by a
    factor within exp(+-2 delta), and the slope s = 1 - t^2 keeps its relative precision (about
    FAST_TANH_ERROR) even where tanh saturates and s is 1e-5: G = c (p - y) s is held to that,
    element by element. The exact kernel is held to the same bounds at FAST_TANH_ERROR = 0."""
    g = torch.Generator().manual_seed(41)
    rows, vocab = 24, V
    z = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * (2 * softcap)  # |z| / cap up to ~7
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[::5] = -1
    c = (torch.rand(rows, generator=g, dtype=torch.float64) * 2 - 0.5) * (t >= 0)
    zc = softcap * torch.tanh(z / softcap)
    lse64 = torch.logsumexp(zc, -1)
    p = torch.softmax(zc, -1)
    y = torch.zeros_like(p)
    live = t >= 0
    y[live, t[live]] = 1.0
    slope = 1 - torch.tanh(z / softcap) ** 2
    G64 = c[:, None] * (p - y) * slope
    loss64 = (lse64 - zc.gather(1, t.clamp_min(0)[:, None])[:, 0]) * live
    eps32 = torch.finfo(torch.float32).eps
    results = {}
    for fast in (False, True):
        err = K.FAST_TANH_ERROR if fast else 0.0
        loss, lse, G = (a.cpu().double() for a in _row_kernel(
            z.float().to(DEVICE), t.to(DEVICE), c.float().to(DEVICE), softcap, fast))
        results[fast] = lse
        # fp32's share: the sums over V terms and the few roundings that form each term
        a = softcap * err + (vocab + 8) * eps32 * (lse64.abs() + softcap)
        assert ((lse - lse64).abs()[live] <= a[live]).all(), f"fast={fast}: lse"
        assert ((loss - loss64).abs() <= 2 * a).all(), f"fast={fast}: loss"
        bound = c.abs()[:, None] * slope * (p * torch.expm1(2 * a)[:, None] + (p - y).abs() * (2 * err + 64 * eps32))
        bad = (G - G64).abs() > bound + 1e-30
        assert not bad.any(), (f"fast={fast}: {int(bad.sum())} gradient elements off, worst at slope "
                               f"{slope[bad].min().item():.2e}")
    moved = (results[True] - results[False]).abs()[live]
    if DEVICE == "cpu":  # the stand-in's error is known: it must have been exercised
        assert moved.max() > 0.5 * softcap * K.FAST_TANH_ERROR
    else:
        assert moved.max() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_fast_tanh_default_applies_to_bf16_and_bounded_caps_only(dtype, monkeypatch):
    """The module default turns the fast tanh on for bf16 logits only: fp32 and fp16 results
    stay bit-identical with it on. Forced by config, it changes results at a bounded cap and not
    at a larger one (the running-maximum sweep keeps the exact tanh)."""
    x, w, b, t, c = make(dtype=dtype, bias=True, seed=43, scale=40.0)
    run = lambda cap, **cfg: forward_backward(x, w, b, t, c, softcap=cap, config={**SMALL, **cfg})  # noqa: E731
    exact = run(30.0)
    monkeypatch.setattr(K, "FAST_TANH", True)
    for a, bb in zip(exact, run(30.0)):
        assert torch.equal(a, bb)
    assert not torch.equal(run(30.0, FAST_TANH=True)[0], exact[0])
    for a, bb in zip(run(60.0), run(60.0, FAST_TANH=True)):
        assert torch.equal(a, bb)


# ---------------------------------------------------------------------------------------------
# bf16: the interpreter's bf16 arithmetic is broken, so these need a GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("feats", [False, True], ids=["plain", "bias+cap+ls"])
@pytest.mark.parametrize("chunk", [None, 300], ids=["one-chunk", "chunks"])
def test_bf16_forward_backward(feats, chunk):
    softcap, ls = (30.0, 0.1) if feats else (None, 0.0)
    x, w, b, t, c = make(n=1001, d=257, v=5003, dtype=torch.bfloat16, bias=feats, seed=21, scale=8.0)
    refs = (reference(x, w, b, t, c, softcap, ls, torch.float64),
            reference(x, w, b, t, c, softcap, ls, torch.bfloat16))
    out = forward_backward(x, w, b, t, c, softcap=softcap, label_smoothing=ls, chunk_tokens=chunk)
    check_all(out, refs, ("loss", "dx", "dw", "db"), x)
    loss, lse = forward(x, w, b, t, softcap=softcap, label_smoothing=ls, chunk_tokens=chunk)
    check_all((loss, lse), refs, ("loss", "lse"), x, (t >= 0).cpu())
    grads = backward(x, w, b, t, c, lse, softcap=softcap, label_smoothing=ls, chunk_tokens=chunk)
    check_all(grads, refs, ("dx", "dw", "db"), x)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [None, 300], ids=["one-chunk", "chunks"])
def test_bf16_fast_tanh_forward_backward(chunk):
    """The hardware tanh.approx (FAST_TANH) under Gemma's cap, held to the rule of naive bf16."""
    x, w, b, t, c = make(n=1001, d=257, v=5003, dtype=torch.bfloat16, bias=True, seed=25, scale=8.0)
    refs = (reference(x, w, b, t, c, 30.0, 0.1, torch.float64), reference(x, w, b, t, c, 30.0, 0.1, torch.bfloat16))
    fast = {"FAST_TANH": True}
    out = forward_backward(x, w, b, t, c, softcap=30.0, label_smoothing=0.1, chunk_tokens=chunk, config=fast)
    check_all(out, refs, ("loss", "dx", "dw", "db"), x)
    loss, lse = forward(x, w, b, t, softcap=30.0, label_smoothing=0.1, chunk_tokens=chunk, config=fast)
    check_all((loss, lse), refs, ("loss", "lse"), x, (t >= 0).cpu())


@pytest.mark.gpu
def test_bf16_weight_gradient_accumulated_in_bf16():
    """The large-head path: dW summed over 4 chunks by addmm in bf16 (one rounding per chunk)."""
    x, w, b, t, c = make(n=1001, d=257, v=5003, dtype=torch.bfloat16, seed=23, scale=8.0)
    refs = (reference(x, w, b, t, c, None, 0.0, torch.float64), reference(x, w, b, t, c, None, 0.0, torch.bfloat16))
    out = forward_backward(x, w, b, t, c, chunk_tokens=256, dw_fp32_accumulate=False)
    check_all(out, refs, ("loss", "dx", "dw"), x, dw_roundings=-(-x.shape[0] // 256))


@pytest.mark.gpu
def test_bf16_sequence_forward():
    x, w, b, t, _ = make(n=777, d=129, v=3001, dtype=torch.bfloat16, seed=22, scale=8.0)
    cu = torch.tensor([0, 100, 100, 500, 777], device=DEVICE)
    means = sequence_forward(x, w, b, t, cu, softcap=30.0)
    valid = t >= 0

    def seq_ref(dt):
        tok = token_losses(x.to(dt), w.to(dt), None, t, softcap=30.0).detach()
        return torch.stack([tok[s:e].sum() / max(int(valid[s:e].sum()), 1)
                            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])

    ref = seq_ref(torch.float64)
    floor = LinearCEFloors(x, w, b, softcap=30.0).sequence_means(ref)
    assert_close_to_ref(means, ref, seq_ref(torch.bfloat16), floor=floor, name="means")


@pytest.mark.parametrize("with_grad", [False, True], ids=["forward", "fwd_bwd"])
def test_double_buffered_path_is_bit_identical_to_sequential(with_grad):
    """overlap=True splits the budget into two buffers (side stream on CUDA); at the same chunk
    size its results must equal the one-buffer path bit for bit."""
    x, w, b, t, c = make(n=53, bias=True, seed=31)
    budget = 12 * V * x.element_size()  # 12 rows: several chunks either way
    coeff = c if with_grad else None
    out_overlap = K.linear_ce(x, w, b, t, coeff, chunk_bytes=budget, overlap=True, config=SMALL)
    out_sequential = K.linear_ce(x, w, b, t, coeff, chunk_bytes=budget // 2, overlap=False, config=SMALL)
    assert K.chunk_rows(53, V, x.element_size(), budget // 2) < 53
    flat = lambda out: [out[0], out[1]] + (list(out[3]) if out[3] is not None else [])  # noqa: E731
    for a, bb in zip(flat(out_overlap), flat(out_sequential)):
        assert torch.equal(a, bb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("upstream", [1.0, 2.5, -0.75, float("nan")], ids=["one", "2.5", "neg", "nan"])
def test_scale_in_place_matches_mul(dtype, upstream, monkeypatch):
    """scale_ rounds exactly as t.mul_(s.to(t.dtype)), across grid-stride steps (a small block
    and two programs here); with s == 1 it leaves t as it was."""
    monkeypatch.setitem(K.SCALE_CONFIG, "BLOCK", 16)
    monkeypatch.setitem(K.SCALE_CONFIG, "max_programs", 2)
    t = (torch.randn(7, 23, generator=torch.Generator().manual_seed(3)) * 3).to(DEVICE, dtype)
    s = torch.tensor(upstream, device=DEVICE)
    expected = t.clone().mul_(s.to(dtype))
    out = K.scale_(t, s)
    assert out is t
    torch.testing.assert_close(t, expected, rtol=0, atol=0, equal_nan=True)
    strided = torch.ones(6, 4, device=DEVICE, dtype=dtype)[:, ::2]  # not contiguous: torch's mul_
    K.scale_(strided, s)
    torch.testing.assert_close(strided, torch.ones(6, 2, device=DEVICE, dtype=dtype).mul_(s.to(dtype)),
                               rtol=0, atol=0, equal_nan=True)
    assert K.scale_(t[:0], s).shape == (0, 23)


def test_upstream_gradient_scales_the_precomputed_gradients():
    """A mean loss forms its gradients in the forward; backward scales them by the upstream
    gradient in place (Triton's scale_): 3 * loss gives 3x the gradients, loss gives them as is."""
    import fastweight as fw

    x, w, b, t, c = make(dtype=torch.float32, bias=True, seed=29)
    grads = []
    for factor in (1.0, 3.0):
        xs, ws, bs = (a.detach().clone().requires_grad_(True) for a in (x, w, b))
        loss = fw.weighted_ce(xs, ws, t, bias=bs, ignore_index=-1, impl="triton")
        (loss * factor if factor != 1.0 else loss).backward()
        grads.append((xs.grad, ws.grad, bs.grad))
    for one, three in zip(*grads):
        torch.testing.assert_close(three, one * 3.0, rtol=1e-6, atol=0)
