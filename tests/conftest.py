"""Shared test set-up: the Triton interpreter on CPU-only machines, the `gpu` marker, and the
tolerance rule of DESIGN.md ("Testing rules").

The rule, as implemented by :func:`assert_close_to_ref`
---------------------------------------------------------
``ref64`` is the float64 ground truth, ``naive`` the reference path run in the input's own dtype,
``floor`` an element-wise tensor built by the ``*_floor`` helpers below. With e = |fast - ref64|
and e_naive = |naive - ref64|:

1. max-abs:   e_i <= 2 * max(e_naive) + floor_i            for every element i;
2. rel-norm:  ||e|| / ||ref64|| <= 2 * ||e_naive|| / ||ref64|| + ||floor|| / ||ref64||.

Both compare *aggregates* of naive's error (its worst element, its norm), never naive's error at
the same element: two correct GEMMs round different elements (on an H200 a chunked bf16 dX had a
smaller max error than naive's, yet failed an element-wise comparison with naive at 377 elements).

The floor is never a hand-picked atol. It is the rounding error that a correct computation in
another order may legitimately have where naive happens to be exact, from the classical bound of
a sum of n terms in any order, |fl(sum) - sum| <= gamma_n * sum|terms| with gamma_n ~ n * u:

    floor_i = n_i * eps(acc) * sum_j |terms_ij|  +  eps(out) * |ref_i|

with acc the accumulation dtype (fp32 for fp32/fp16/bf16 inputs, fp64 for fp64), out the dtype
the result is stored in (the second term is its final rounding; for a 16-bit output it dominates)
and eps = torch.finfo(dtype).eps = 2u, which leaves a factor 2 over the unit roundoff u.
The helpers instantiate it for each quantity of a linear cross-entropy (G = d out / d logits, the
float64 logits gradient, from :func:`logits_grad64`):

    loss sum  sum_t c_t l_t :  N * eps * sum_t |c_t l_t|  +  2 eps(in) * sum |G * z|  +  eps(out)|ref|
    per-token loss / lse    :  (V + D) * eps * (|lse_t| + max_v |z_tv|)  +  2 eps(in) * max_v |z_tv|
    dX = G @ W              :  (V + 4) * eps * (|G|_terms @ |W|)
    dW = G^T @ X            :  (N + 4) * eps * (|G|_terms^T @ |X|)
    db = sum_t G_t          :  (N + 4) * eps * sum_t |G_t|_terms

|G|_terms = |c_t| (q + y) (1 + t^2) is the magnitude of the terms that form G = c (q - y) s
(softmax q, targets y, softcap slope s = 1 - t^2): see LinearCEFloors.

The "2 eps(in) |z|" terms are one rounding of each logit to the input dtype, which two correct
GEMMs may place on different neighbours; to first order a loss moves by sum_v |dl/dz_v| |dz_v|.
Without ``naive`` (no same-dtype run exists) the floor alone is the bound, element-wise.
"""
from __future__ import annotations

import os

import pytest

# Must happen before anything imports triton (the kernels read it at import time).
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    from fastweight.testing import patch_triton_interpreter

    patch_triton_interpreter()


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------
def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype`` (2 x its unit roundoff)."""
    return torch.finfo(dtype).eps


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the library (and cuBLAS, and PyTorch's CPU GEMMs) accumulate ``dtype`` data in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close_to_ref(fast: torch.Tensor, ref64: torch.Tensor, naive: torch.Tensor | None = None, *,
                        floor: torch.Tensor, name: str = "") -> dict:
    """DESIGN.md's rule (module docstring): fast's max-abs error <= 2 x naive's max-abs error +
    floor (element-wise floor), and its relative-norm error <= 2 x naive's + ||floor|| / ||ref||.

    ``floor`` must come from the ``*_floor`` helpers (eps x the magnitude of the terms that formed
    each element), never a constant. Without ``naive``, |fast - ref64| <= floor element-wise.
    A non-finite value in ``fast`` (an unwritten, NaN-poisoned element) fails.
    Returns the margins {"max": worst e_i / bound_i, "norm": ||e|| / norm bound}: < 1 passes.
    """
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    assert torch.is_tensor(floor), f"{name}: the floor must be a tensor from a *_floor helper"
    fast64 = fast.detach().to(torch.float64).cpu()
    ref = ref64.detach().to(torch.float64).cpu()
    assert torch.isfinite(fast64).all(), f"{name}: non-finite values (unwritten output?)"
    assert torch.isfinite(ref).all(), f"{name}: non-finite reference"
    if ref.numel() == 0:
        return {"max": 0.0, "norm": 0.0}
    floor = floor.detach().to(torch.float64).cpu().expand_as(ref)
    assert (floor >= 0).all(), f"{name}: negative floor"
    err = (fast64 - ref).abs()
    if naive is not None:
        assert naive.shape == ref64.shape, f"{name}: naive shape {tuple(naive.shape)}"
        err_naive = (naive.detach().to(torch.float64).cpu() - ref).abs()
        assert torch.isfinite(err_naive).all(), f"{name}: non-finite naive result"
        bound = 2 * err_naive.max() + floor
        norm_bound = 2 * err_naive.norm() + floor.norm()
    else:
        bound = floor
        norm_bound = floor.norm()
    bad = err > bound
    # Ratios for the margins; a zero bound with a zero error is a ratio of 0.
    ratio = torch.where(err == 0, torch.zeros_like(err), err / bound.clamp_min(1e-300))
    margins = {"max": ratio.max().item(),
               "norm": 0.0 if err.norm() == 0 else (err.norm() / norm_bound.clamp_min(1e-300)).item()}
    _log_margins(name, fast.dtype, margins)
    if bad.any():
        i = int(ratio.argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} elements above 2*max|naive-ref| + floor; worst "
            f"err {err.view(-1)[i].item():.3e} vs bound {bound.reshape(-1)[i].item():.3e} "
            f"(max|naive-ref| {(bound - floor).max().item() / 2:.3e}, floor {floor.reshape(-1)[i].item():.3e})")
    rel_scale = ref.norm().clamp_min(1e-300)
    assert err.norm() <= norm_bound, (
        f"{name}: relative norm error {(err.norm() / rel_scale).item():.3e} > "
        f"{(norm_bound / rel_scale).item():.3e} (2 x naive's + floor)")
    return margins


def _log_margins(name: str, dtype: torch.dtype, margins: dict) -> None:
    """Append the margins to $FASTWEIGHT_TOLERANCE_LOG when set: how close every check came to
    its bound, e.g. on a GPU run where the bf16 tests cannot be inspected interactively."""
    path = os.environ.get("FASTWEIGHT_TOLERANCE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{name}\t{dtype}\t"
                    f"{margins['max']:.4g}\t{margins['norm']:.4g}\n")


# ---------------------------------------------------------------------------------------------
# Floors: eps x the magnitude of the terms that formed each element
# ---------------------------------------------------------------------------------------------
def rounding_floor(ref: torch.Tensor, magnitude: torch.Tensor | float, n: int | torch.Tensor, dtype: torch.dtype,
                   out_dtype: torch.dtype | None = None, out_roundings: int = 1) -> torch.Tensor:
    """n * eps(acc) * magnitude + eps(out) * |ref|: the generic floor.

    ``magnitude`` is sum_j |terms_j| of each element (>= |ref|), ``n`` the number of roundings
    a term's error can pass through: the length of the sum (gamma_n bounds any summation order)
    plus the few operations that formed each term (a tensor: one count per element). ``dtype`` is the input dtype (it sets the
    accumulation dtype), ``out_dtype`` the stored result's (default: the accumulation dtype).
    ``out_roundings`` > 1: a result re-rounded to ``out_dtype`` once per chunk (a 16-bit
    accumulator); each rounding errs by at most eps(out) x a partial sum, <= eps(out) x magnitude.
    """
    acc = acc_dtype(dtype)
    out = out_dtype or acc
    ref = ref.detach().to(torch.float64)
    magnitude = torch.as_tensor(magnitude, dtype=torch.float64, device=ref.device)
    floor = n * eps(acc) * magnitude + eps(out) * ref.abs()
    if out_roundings > 1:
        floor = floor + (out_roundings - 1) * eps(out) * magnitude
    return floor


def logits_grad64(objective, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """G = d objective / d logits, (N, V) float64, for any differentiable reference
    ``objective(hidden, weight) -> scalar`` whose logits are hidden @ weight.T (+ bias).

    The logits become a leaf without touching the reference's code: hidden gets N one-hot
    columns (token t has a 1 in column D + t) and weight N zero columns E (V, N), a leaf. The
    logits are then z + E.T, equal to z exactly, and d objective / d E.T = d objective / d z.
    """
    h = hidden.detach().to(torch.float64)
    w = weight.detach().to(torch.float64)
    d = h.shape[-1]
    n = h.numel() // d if d else h.shape[:-1].numel()
    eye = torch.eye(n, dtype=torch.float64, device=h.device).reshape(*h.shape[:-1], n)
    e = torch.zeros(w.shape[0], n, dtype=torch.float64, device=w.device, requires_grad=True)
    out = objective(torch.cat([h, eye], -1), torch.cat([w, e], 1))
    (g,) = torch.autograd.grad(out, e, allow_unused=True)
    return torch.zeros_like(e).t() if g is None else g.t().contiguous()


class LinearCEFloors:
    """The floors of every output of a linear cross-entropy, from float64 magnitudes. Losses are
    stored in the accumulation dtype, gradients in the input dtype.

    ``x`` (N, D) or (..., D), ``weight`` (V, D), ``bias`` (V,) or None in the *input* dtype
    (their dtype is the one the fast path ran in). ``objective(h, w, b) -> scalar`` is the float64
    reference (sum_t c_t l_t, or an output times its upstream gradient); without it only the
    loss floors are available.

    The gradient floors use the magnitude of the terms that form G = c (q - y) s (softmax q,
    target distribution y, softcap slope s = 1 - t^2), not |G|: |G| vanishes where they cancel
    (q_y -> 1, or a saturated cap), and the rounding errors of the terms do not. The terms are
        |G|_terms = |c| (q + y) (1 + t^2) <= (|c| (q + 1/V) + |c| onehot(y)) (1 + t^2).
    |c_t| and onehot(y) come from G0, the same objective's G at all-zero logits (hidden = 0,
    no bias), where q = 1/V and s = 1: G0_tv = c_t (1 - ls) (1/V - onehot_tv), so
    |G0_tv| V / ((V - 1)(1 - ls)) is |c_t| at the target and |c_t| / (V - 1) elsewhere.
    """

    def __init__(self, x, weight, bias, objective=None, softcap=None, label_smoothing=0.0, dtype=None):
        self.dtype = dtype or x.dtype
        self.acc = acc_dtype(self.dtype)
        self.x64 = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
        self.w64 = weight.detach().to(torch.float64)
        self.N, self.D = self.x64.shape
        self.V = self.w64.shape[0]
        z = self.x64 @ self.w64.t()
        if bias is not None:
            z = z + bias.detach().to(torch.float64)
        self.z_raw = z                                            # the GEMM's output, rounded once
        t = torch.tanh(z / softcap) if softcap is not None else torch.zeros_like(z)
        zc = softcap * t if softcap is not None else z
        self.lse = torch.logsumexp(zc, -1) if self.V else torch.zeros(self.N, dtype=torch.float64)
        self.zmax = zc.abs().amax(-1) if self.V else torch.zeros(self.N, dtype=torch.float64)
        self.zraw_max = z.abs().amax(-1) if self.V else torch.zeros(self.N, dtype=torch.float64)
        nan = torch.full((self.N, self.V), float("nan"), dtype=torch.float64, device=z.device)
        self.G = self.G_terms = nan                               # NaN floors fail loudly if used
        if objective is None:
            return
        b64 = None if bias is None else bias.detach().to(torch.float64)
        self.G = logits_grad64(lambda h, w: objective(h, w, b64), x, weight).reshape(self.N, self.V)
        G0 = logits_grad64(lambda h, w: objective(h, w, None), torch.zeros_like(x, dtype=torch.float64),
                           weight).reshape(self.N, self.V)
        if self.V < 2:  # one class: every loss is 0, so is G
            self.G_terms = self.G.abs()
            return
        c_onehot = G0.abs() * self.V / ((self.V - 1) * (1 - label_smoothing))
        c_abs = c_onehot.amax(-1, keepdim=True)
        q = torch.softmax(zc, -1)
        self.G_terms = (c_abs * (q + 1.0 / self.V) + c_onehot) * (1 + t * t)
        # The probe must bound G itself, or the floors would rest on a wrong |c| or target.
        assert (self.G.abs() <= self.G_terms * (1 + 1e-9) + 1e-300).all(), "G0 probe inconsistent with G"

    def _logit_rounding(self) -> torch.Tensor:
        """Per token: how far one rounding of each logit to the input dtype moves a loss, to first
        order sum_v |dl/dz_v| eps |z_v| <= 2 eps max|z| (|dl/dz| = |softmax - target| sums to <= 2;
        a softcap's slope is <= 1). Doubled: each of two correct GEMMs rounds."""
        return 2 * eps(self.dtype) * self.zraw_max

    def token_losses(self, ref: torch.Tensor) -> torch.Tensor:
        """Per-token loss or lse (N,): logsumexp over V terms of logits formed by D-term dot
        products, l = lse - z_y: (V + D) eps (|lse| + max|z|) + logit rounding + eps(out)|ref|."""
        per = (self.V + self.D) * eps(self.acc) * (self.lse.abs() + self.zmax) + self._logit_rounding()
        return per.to(ref.device).reshape(ref.shape) + eps(self.acc) * ref.detach().double().abs()

    def loss_sum(self, ref: torch.Tensor, abs_terms: torch.Tensor | float) -> torch.Tensor:
        """sum_t c_t l_t over N tokens: N eps sum|c_t l_t| (``abs_terms``) for the sum in any order
        (it also covers per-token losses correct to a few eps each), plus the logits' rounding,
        sum_tv |G_tv| 2 eps(in) |z_tv| to first order, plus the result's rounding."""
        logit = 2 * eps(self.dtype) * (self.G.abs() * self.z_raw.abs()).sum()
        floor = rounding_floor(ref, abs_terms, max(self.N, 1), self.dtype)
        return floor + logit.to(floor.device)

    def sequence_means(self, ref: torch.Tensor) -> torch.Tensor:
        """Mean of a segment's per-token losses (non-negative terms, so sum|terms|/n = |ref|): the
        largest per-token floor, plus N eps |ref| for the sum."""
        tok = self.token_losses(torch.zeros(self.N, dtype=torch.float64)).max() if self.N else 0.0
        return rounding_floor(ref, ref.detach().double().abs(), max(self.N, 1), self.dtype) + tok

    def dx(self, ref: torch.Tensor) -> torch.Tensor:
        """dX = G @ W, V terms per element (+4 roundings forming G): (V + 4) eps (|G|_terms @ |W|)."""
        m = (self.G_terms @ self.w64.abs()).to(ref.device).reshape(ref.shape)
        return rounding_floor(ref, m, self.V + 4, self.dtype, self.dtype)

    def dw(self, ref: torch.Tensor, out_roundings: int = 1) -> torch.Tensor:
        """dW = G^T @ X, N terms per element: (N + 4) eps (|G|_terms^T @ |X|); ``out_roundings``
        for a 16-bit accumulator re-rounded once per chunk."""
        m = (self.G_terms.t() @ self.x64.abs()).to(ref.device)
        return rounding_floor(ref, m, self.N + 4, self.dtype, self.dtype, out_roundings)

    def db(self, ref: torch.Tensor) -> torch.Tensor:
        """db = sum_t G_t, N terms per element: (N + 4) eps sum_t |G_t|_terms."""
        m = self.G_terms.sum(0).to(ref.device)
        return rounding_floor(ref, m, self.N + 4, self.dtype, self.dtype)


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """A tiny saved Llama, its data and their FLOW scores, once per test module:
    (directory, model path, data path, scores path) (``hf_fixtures.scored_run``)."""
    from hf_fixtures import scored_run as make

    return make(tmp_path_factory.mktemp("scored"))
