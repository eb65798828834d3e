"""The C++ aggregation ops (fastweight._C: torch.ops.fastweight.agg_*) and the PyTorch backend
against the PyTorch reference (fastweight.aggregation.reference) and a float64 ground truth;
the custom ops of fastweight.aggregation.ops with the extension pinned; and its loader.

The Triton backend has its own tests. Tests of the extension skip when it is unavailable.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import assert_close_to_ref, rounding_floor
from fastweight.aggregation import extension as ext
from fastweight.aggregation import ops
from fastweight.aggregation import reference as ref
from fastweight.extension import build, loader

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def out_dtype(backend, dtype):
    """Result dtype of segment_mean and its backward: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32

needs_ext = pytest.mark.skipif(not loader.load().available, reason=f"extension unavailable: {loader.load().reason}")


@pytest.fixture
def pinned_ext(monkeypatch):
    """The aggregation custom ops run on the C++ extension."""
    monkeypatch.setenv("FASTWEIGHT_AGG_IMPL", "ext")
BACKENDS = [pytest.param(ext, id="ext", marks=needs_ext), pytest.param(ref, id="torch")]


# ---------------------------------------------------------------- data

def make_batch(seed: int, layout: str, num_segments: int = 37, max_len: int = 61, p_valid: float = 0.7):
    """(valid (N,), cu_seqlens (B+1,)): random lengths with empty and all-ignored segments."""
    g = torch.Generator().manual_seed(seed)
    b = num_segments
    if layout == "packed":
        lengths = torch.randint(0, max_len + 1, (b,), generator=g)
        lengths[torch.randperm(b, generator=g)[: max(1, b // 6)]] = 0  # empty segments
        cu = torch.zeros(b + 1, dtype=torch.int64)
        cu[1:] = lengths.cumsum(0)
        n = int(cu[-1])
        valid = torch.rand(n, generator=g) < p_valid
    else:  # padded rows of T tokens: a valid prefix per row, padding after it
        cu = torch.arange(b + 1, dtype=torch.int64) * max_len
        n = b * max_len
        keep = torch.randint(0, max_len + 1, (b,), generator=g)
        valid = (torch.arange(max_len)[None, :] < keep[:, None]).reshape(-1)
        valid &= torch.rand(n, generator=g) < p_valid + 0.25
    if b >= 3:  # all-ignored segments (some of them may also be empty)
        seg = ref.segment_ids(cu, n)
        for s in torch.randperm(b, generator=g)[: max(1, b // 7)].tolist():
            valid[seg == s] = False
    return valid, cu


def make_weights(seed: int, n: int, b: int, dtype, kind: str):
    """(sample_weights (B,), token_weights (N,)) of `dtype`, or None for kind="none"."""
    if kind == "none":
        return None, None
    g = torch.Generator().manual_seed(seed + 1000)
    sw = torch.rand(b, generator=g, dtype=torch.float64) * 3
    tw = torch.rand(n, generator=g, dtype=torch.float64) * 2
    if kind == "zero_large":
        big = 1e4 if dtype == torch.float16 else 1e20
        if b:
            sw[:: 3] = 0.0
            sw[1:: 5] = big
        if n:
            tw[:: 4] = 0.0
            tw[2:: 7] = 1e3 if dtype == torch.float16 else 1e10
    return sw.to(dtype), tw.to(dtype)


def truth_coefficients(valid, cu, sw, tw, per_sample_mean):
    """float64 ground truth."""
    n = valid.numel()
    seg = ref.segment_ids(cu, n)
    counts = torch.zeros(cu.numel() - 1, dtype=torch.int64).index_add_(0, seg, valid.long())
    c = valid.double()
    if sw is not None:
        c = c * sw.double()[seg]
    if tw is not None:
        c = c * tw.double()
    if per_sample_mean:
        c = c / counts.clamp_min(1).double()[seg]
    return c, counts


def truth_segment_mean(values, cu, valid):
    seg = ref.segment_ids(cu, values.numel())
    b = cu.numel() - 1
    counts = torch.zeros(b, dtype=torch.int64).index_add_(0, seg, valid.long())
    sums = torch.zeros(b, dtype=torch.float64).index_add_(0, seg, torch.where(valid, values.double(), 0.0))
    return sums / counts.clamp_min(1).double(), counts


def assert_close_to_truth(fast, naive, truth, floor, name=""):
    """DESIGN.md's rule (conftest.assert_close_to_ref: aggregate errors against naive's, plus an
    eps-scaled floor) on the finite elements of the truth; the non-finite ones must match."""
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(fast), finite), name
    assert_close_to_ref(fast[finite], truth[finite], None if naive is None else naive[finite],
                        floor=floor.expand_as(truth)[finite], name=name)


def coefficient_floor(c64, dtype):
    """c_t = valid * sw * tw / count: at most three roundings of the exact product, plus the
    result's: 3 eps(acc) |c| + eps(out) |c| (the weights are exact in the accumulation dtype)."""
    return rounding_floor(c64, c64.abs(), 3, dtype, torch.float32)


def mean_floor(values, cu, valid, m64, counts, out):
    """A segment mean is a sum of n_s values and one division: (n_s + 1) eps(acc) mean|v| +
    eps(out) |mean| (mean|v| from the float64 truth of |values|)."""
    mabs, _ = truth_segment_mean(values.abs(), cu, valid)
    return rounding_floor(m64, mabs, (counts + 1).double(), values.dtype, out)


def poison_allocator(n: int) -> None:
    """Free a few NaN-filled blocks of the sizes the op is about to allocate, so that an element
    it forgets to write is likely NaN (CPU malloc reuses them); every test also checks values."""
    for size in (n, max(n, 1) * 2):
        t = torch.full((size,), float("nan"))
        del t


# ---------------------------------------------------------------- coefficients

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("per_sample_mean", [False, True])
@pytest.mark.parametrize("weights", ["none", "random", "zero_large"])
@pytest.mark.parametrize("seed", [0, 1])
def test_coefficients(backend, layout, per_sample_mean, weights, seed):
    valid, cu = make_batch(seed, layout)
    sw, tw = make_weights(seed, valid.numel(), cu.numel() - 1, torch.float32, weights)
    poison_allocator(valid.numel())
    c, counts = backend.coefficients(valid, cu, sw, tw, per_sample_mean)
    assert c.dtype == torch.float32 and c.shape == valid.shape
    assert counts.dtype == torch.int64 and counts.shape == (cu.numel() - 1,)
    c_ref, counts_ref = ref.coefficients(valid, cu, sw, tw, per_sample_mean)
    c64, counts64 = truth_coefficients(valid, cu, sw, tw, per_sample_mean)
    assert torch.equal(counts, counts64)
    assert not c.isnan().any()
    assert bool((c[~valid] == 0).all())
    # The C++ kernels do the reference's fp32 operations in its order: bitwise equal.
    assert torch.equal(c, c_ref)
    assert_close_to_truth(c, c_ref, c64, coefficient_floor(c64, torch.float32), "c")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sw_dtype", [*FLOATS, None], ids=str)
@pytest.mark.parametrize("tw_dtype", [*FLOATS, None], ids=str)
@pytest.mark.parametrize("per_sample_mean", [False, True])
def test_coefficients_weight_dtypes(backend, sw_dtype, tw_dtype, per_sample_mean):
    valid, cu = make_batch(7, "packed", num_segments=23, max_len=45)
    n, b = valid.numel(), cu.numel() - 1
    sw = make_weights(7, n, b, sw_dtype, "random")[0] if sw_dtype else None
    tw = make_weights(8, n, b, tw_dtype, "random")[1] if tw_dtype else None
    c, counts = backend.coefficients(valid, cu, sw, tw, per_sample_mean)
    c_ref, counts_ref = ref.coefficients(valid, cu, sw, tw, per_sample_mean)
    assert torch.equal(counts, counts_ref)
    assert torch.equal(c, c_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sample_mean", [False, True])
def test_coefficients_non_contiguous(backend, per_sample_mean):
    valid_full, cu = make_batch(3, "packed", num_segments=19)
    n, b = valid_full.numel(), cu.numel() - 1
    valid = torch.stack([valid_full, ~valid_full], 1)[:, 0]          # stride 2
    sw = torch.rand(b, 3, dtype=torch.float64)[:, 1]                  # stride 3
    tw = torch.rand(n, 2).t()[0]                                      # stride 2
    cu_nc = torch.stack([cu, cu], 1)[:, 1]
    assert not (valid.is_contiguous() or sw.is_contiguous() or tw.is_contiguous() or cu_nc.is_contiguous())
    c, counts = backend.coefficients(valid, cu_nc, sw, tw, per_sample_mean)
    c_ref, counts_ref = ref.coefficients(valid.contiguous(), cu, sw.contiguous(), tw.contiguous(), per_sample_mean)
    assert torch.equal(c, c_ref) and torch.equal(counts, counts_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_segments", [0, 1, 3])
def test_empty_batch(backend, num_segments):
    valid = torch.zeros(0, dtype=torch.bool)
    cu = torch.zeros(num_segments + 1, dtype=torch.int64)
    c, counts = backend.coefficients(valid, cu, torch.ones(num_segments), torch.ones(0), True)
    assert c.shape == (0,) and torch.equal(counts, torch.zeros(num_segments, dtype=torch.int64))
    means, counts = backend.segment_mean(torch.zeros(0), cu, valid)
    assert torch.equal(means, torch.zeros(num_segments)) and torch.equal(counts, torch.zeros_like(counts))
    g = backend.segment_mean_backward(torch.ones(num_segments), cu, counts, valid)
    assert g.shape == (0,) and g.dtype == torch.float32


# ---------------------------------------------------------------- segment_mean and its backward

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_mean(backend, layout, dtype, seed):
    valid, cu = make_batch(seed, layout, num_segments=41, max_len=157)
    g = torch.Generator().manual_seed(seed + 7)
    values = (torch.randn(valid.numel(), generator=g, dtype=torch.float64) * 5 + 2).to(dtype)
    values[~valid] = float("nan")  # ignored tokens must not leak, even as NaN
    poison_allocator(cu.numel() - 1)
    means, counts = backend.segment_mean(values, cu, valid)
    assert means.dtype == out_dtype(backend, dtype) and means.shape == (cu.numel() - 1,)
    m64, counts64 = truth_segment_mean(values, cu, valid)
    m_naive, _ = ref.segment_mean(values, cu, valid)
    assert torch.equal(counts, counts64)
    assert not means.isnan().any()
    assert bool((means[counts64 == 0] == 0).all())
    assert_close_to_truth(means, m_naive, m64, mean_floor(values, cu, valid, m64, counts64, means.dtype), "means")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_segment_mean_backward(backend, layout, dtype):
    valid, cu = make_batch(5, layout, num_segments=29, max_len=71)
    counts = truth_segment_mean(torch.zeros(valid.numel()), cu, valid)[1]
    grad = (torch.randn(cu.numel() - 1, dtype=torch.float64) * 3).to(dtype)
    poison_allocator(valid.numel())
    out = backend.segment_mean_backward(grad, cu, counts, valid)
    assert out.dtype == out_dtype(backend, dtype) and out.shape == valid.shape
    assert torch.equal(out, ref.segment_mean_backward(grad, cu, counts, valid))  # bitwise
    seg = ref.segment_ids(cu, valid.numel())
    truth = torch.where(valid, (grad.double() / counts.clamp_min(1).double())[seg], 0.0)
    # One division of an exact upstream value: eps(acc) |g / n| + the result's rounding.
    assert_close_to_truth(out, None, truth, rounding_floor(truth, truth.abs(), 1, dtype, out.dtype), "grad")
    # a stride-0 upstream gradient (what .sum() gives) works too
    g0 = torch.ones((), dtype=dtype).expand(cu.numel() - 1)
    assert torch.equal(backend.segment_mean_backward(g0, cu, counts, valid),
                       ref.segment_mean_backward(g0.contiguous(), cu, counts, valid))


@needs_ext
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("dtype", [d for d in FLOATS if d != torch.float64], ids=str)  # fp64 runs: reference
@pytest.mark.parametrize("upstream", ["random", "sum"])
def test_segment_mean_autograd_matches_torch(layout, dtype, upstream, pinned_ext):
    valid, cu = make_batch(11, layout, num_segments=31, max_len=53)
    base = torch.randn(valid.numel(), dtype=torch.float64).to(dtype)
    x_ext = base.clone().requires_grad_()
    x_ref = base.clone().requires_grad_()
    m_ext, _ = ops.segment_mean(x_ext, cu, valid)
    m_ref, _ = ref.segment_mean(x_ref, cu, valid)
    if upstream == "sum":
        m_ext.sum().backward()
        m_ref.sum().backward()
    else:  # non-uniform upstream gradient
        up = torch.randn(cu.numel() - 1)
        (m_ext * up).sum().backward()
        (m_ref * up).sum().backward()
    assert x_ext.grad.dtype == dtype
    assert torch.equal(x_ext.grad, x_ref.grad)


@needs_ext
def test_segment_mean_double_backward(pinned_ext):
    valid, cu = make_batch(13, "packed", num_segments=17, max_len=29)
    n = valid.numel()
    x = torch.randn(n, requires_grad=True)
    up = torch.randn(cu.numel() - 1, requires_grad=True)
    results = []
    for segment_mean in (ops.segment_mean, ref.segment_mean):
        m, _ = segment_mean(x, cu, valid)
        (gx,) = torch.autograd.grad((m * up).sum(), x, create_graph=True)
        w = torch.linspace(-1, 2, n)
        (gup,) = torch.autograd.grad((gx * w).sum(), up)
        results.append((gx.detach(), gup))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)


@needs_ext
def test_coefficients_weights_get_no_gradient(pinned_ext):
    import fastweight as fw

    valid, cu = make_batch(2, "packed")
    labels = torch.where(valid, 1, -100)
    sw = torch.rand(cu.numel() - 1, requires_grad=True)
    tw = torch.rand(valid.numel(), requires_grad=True)
    c = fw.token_coefficients(labels, sw, token_weights=tw, cu_seqlens=cu, sample_reduction="mean")
    if c.requires_grad:
        c.sum().backward()
    assert sw.grad is None or bool((sw.grad == 0).all())
    assert tw.grad is None or bool((tw.grad == 0).all())


# ---------------------------------------------------------------- parallel partitioning

@needs_ext
@pytest.mark.parametrize("threads", [1, 3, 7])
@pytest.mark.parametrize("shape", ["many_short", "few_long", "one_huge", "skewed"])
def test_parallel_partition(threads, shape):
    """Large inputs take the multi-threaded path: results must not depend on the thread count."""
    g = torch.Generator().manual_seed(17)
    if shape == "many_short":
        lengths = torch.randint(0, 9, (40_001,), generator=g)
    elif shape == "few_long":
        lengths = torch.randint(20_000, 30_001, (5,), generator=g)
    elif shape == "one_huge":
        lengths = torch.tensor([0, 150_001, 0])
    else:
        lengths = torch.cat([torch.randint(0, 5, (20_000,), generator=g), torch.tensor([90_007]),
                             torch.randint(0, 5, (3_001,), generator=g)])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(cu[-1])
    valid = torch.rand(n, generator=g) < 0.8
    sw, tw = torch.rand(lengths.numel(), generator=g), torch.rand(n, generator=g)
    values = torch.randn(n, generator=g)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        c, counts = ext.coefficients(valid, cu, sw, tw, True)
        means, counts2 = ext.segment_mean(values, cu, valid)
        grad = ext.segment_mean_backward(torch.randn(lengths.numel(), generator=g), cu, counts2, valid)
    finally:
        torch.set_num_threads(old)
    c_ref, counts_ref = ref.coefficients(valid, cu, sw, tw, True)
    assert torch.equal(c, c_ref) and torch.equal(counts, counts_ref) and torch.equal(counts2, counts_ref)
    m64, _ = truth_segment_mean(values, cu, valid)
    assert_close_to_truth(means, ref.segment_mean(values, cu, valid)[0], m64,
                          mean_floor(values, cu, valid, m64, counts_ref, means.dtype), "means")
    assert grad.shape == (n,) and not grad.isnan().any()


# ---------------------------------------------------------------- op registration

def _opcheck_samples():
    valid, cu = make_batch(21, "packed", num_segments=9, max_len=13)
    n, b = valid.numel(), cu.numel() - 1
    sw, tw = make_weights(21, n, b, torch.float32, "random")
    counts = truth_segment_mean(torch.zeros(n), cu, valid)[1]
    return valid, cu, sw, tw, counts


@needs_ext
@pytest.mark.parametrize("per_sample_mean", [False, True])
@pytest.mark.parametrize("weights", ["none", "both", "bf16"])
def test_opcheck_coefficients(per_sample_mean, weights, pinned_ext):
    valid, cu, sw, tw, _ = _opcheck_samples()
    if weights == "none":
        sw = tw = None
    elif weights == "bf16":
        sw, tw = sw.to(torch.bfloat16), None
    torch.library.opcheck(ops.coefficients, (valid, cu, sw, tw, per_sample_mean, False))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_segment_mean(dtype, requires_grad, monkeypatch):
    if dtype != torch.float64:  # fp64 runs are routed to the reference backend
        monkeypatch.setenv("FASTWEIGHT_AGG_IMPL", "ext")
    valid, cu, _, _, _ = _opcheck_samples()
    values = torch.randn(valid.numel(), dtype=dtype, requires_grad=requires_grad)
    torch.library.opcheck(ops.segment_mean, (values, cu, valid))


@needs_ext
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_segment_mean_backward(requires_grad, pinned_ext):
    valid, cu, _, _, counts = _opcheck_samples()
    grad = torch.randn(cu.numel() - 1, requires_grad=requires_grad)
    torch.library.opcheck(ops.segment_mean_backward, (grad, cu, counts, valid))


@needs_ext
def test_torch_compile_traces_the_ops(pinned_ext):
    valid, cu, sw, tw, _ = _opcheck_samples()
    values = torch.randn(valid.numel(), requires_grad=True)

    def f(values, valid, cu, sw, tw):
        c, _ = ops.coefficients(valid, cu, sw, tw, True, False)
        means, _ = ops.segment_mean(values * c, cu, valid)
        return (means * 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    out = compiled(values, valid, cu, sw, tw)
    out.backward()
    g_compiled = values.grad.clone()
    values.grad = None
    f(values, valid, cu, sw, tw).backward()
    torch.testing.assert_close(out, f(values, valid, cu, sw, tw))
    torch.testing.assert_close(g_compiled, values.grad)


@needs_ext
def test_bad_arguments_raise():
    valid, cu, sw, tw, counts = _opcheck_samples()
    with pytest.raises(RuntimeError, match="cu_seqlens must be int64"):
        ext.coefficients(valid, cu.int(), sw, tw, False)
    with pytest.raises(RuntimeError, match="valid must be bool"):
        ext.segment_mean(torch.randn(valid.numel()), cu, valid.long())
    with pytest.raises(RuntimeError, match="sample_weights must have shape"):
        ext.coefficients(valid, cu, sw[:-1], tw, False)
    with pytest.raises(RuntimeError, match="token_weights must have a float dtype"):
        ext.coefficients(valid, cu, sw, tw.long(), False)
    with pytest.raises(RuntimeError, match="values must have a float dtype"):
        ext.segment_mean(torch.ones(valid.numel(), dtype=torch.int32), cu, valid)
    bad = cu.clone()
    bad[2], bad[3] = bad[3], bad[2] - 1
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ext.coefficients(valid, bad, None, None, False)
    bad = cu.clone()
    bad[-1] += 1
    with pytest.raises(RuntimeError, match="must end at"):
        ext.segment_mean(torch.randn(valid.numel()), bad, valid)


# ---------------------------------------------------------------- loading and fallback

def test_status_is_one_line():
    status = loader.load()
    assert isinstance(status.reason, str) and status.reason and "\n" not in status.reason
    assert isinstance(status.available, bool)
    assert ("cpu" in status.devices) == status.available


def test_stale_prebuilt_is_skipped(tmp_path, monkeypatch):
    """A prebuilt fastweight._C built from other sources (or another torch) is not loaded."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("fastweight._C")
    if spec is None or loader.source_dir() is None:
        pytest.skip("no prebuilt fastweight._C, or no sources")
    monkeypatch.delenv("FASTWEIGHT_BUILD_EXT", raising=False)
    monkeypatch.delenv("FASTWEIGHT_EXT_PREBUILT", raising=False)
    src = tmp_path / "csrc"
    shutil.copytree(loader.source_dir(), src)
    fresh = loader._try_prebuilt(src)
    if not fresh[0]:
        pytest.skip(f"the installed fastweight._C is not from these sources: {fresh[1]}")
    (src / "aggregation.h").write_text((src / "aggregation.h").read_text() + "\n// edited\n")
    ok, why = loader._try_prebuilt(src)
    assert not ok and "stale" in why
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    ok, why = loader._try_prebuilt(loader.source_dir())
    assert not ok and "stale" in why


def test_setup_py_and_the_jit_loader_build_the_same_thing():
    """setup.py takes sources, flags and key from fastweight/extension/build.py, as the loader does."""
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("fastweight_setup_under_test", root / "setup.py")
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # not __main__: setup() does not run
    extensions, _ = setup_py.extension()
    if not extensions:
        pytest.skip("setup.py builds no extension here (no compiler or FASTWEIGHT_BUILD_EXT=0)")
    (ext_module,) = extensions
    with_cuda, _ = loader.cuda_decision()
    plan = build.plan(root / "csrc", torch.__version__, with_cuda)
    assert [Path(s).name for s in ext_module.sources] == list(plan.sources)
    cxx_flags = ext_module.extra_compile_args["cxx"]
    assert list(plan.cflags) == cxx_flags[:len(plan.cflags)]
    assert f"-DFASTWEIGHT_BUILD_KEY={build.build_key(root / 'csrc', torch.__version__)}" in cxx_flags


def test_cuda_kernels_only_with_a_gpu_or_an_arch_list(tmp_path, monkeypatch):
    """A CUDA torch with nvcc but no GPU (a registry torch on a CPU machine) builds the CPU
    kernels: torch cannot pick an architecture there, and a CUDA build would fail."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert build.cuda_decision("13.0", str(home), gpu_visible=False) == (
        False, "no GPU visible and TORCH_CUDA_ARCH_LIST unset")
    assert build.cuda_decision("13.0", str(home), gpu_visible=True)[0]
    assert not build.cuda_decision(None, str(home), gpu_visible=True)[0]
    assert not build.cuda_decision("13.0", str(tmp_path / "none"), gpu_visible=True)[0]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert build.cuda_decision("13.0", str(home), gpu_visible=False)[0]
    # The loader asks torch itself: simulate the CUDA wheel, nvcc and no GPU.
    from torch.utils import cpp_extension
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loader.cuda_decision()[0] is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loader.cuda_decision()[0] is True


def test_first_error_line():
    log = "ninja: build stopped\n[1/3] c++ -c x.cpp\nx.cpp:3:1: error: 'foo' was not declared\nmore\n"
    assert loader.first_error_line(log) == "x.cpp:3:1: error: 'foo' was not declared"
    assert loader.first_error_line("Traceback...\nIndexError: list index out of range") == (
        "IndexError: list index out of range")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=600)


_PROBE = """
    import warnings
    warnings.simplefilter("always")
    from fastweight.extension import loader
    status = loader.load()
    print(status.available, "|", status.reason)
"""


def test_build_disabled_falls_back():
    r = _run_python(_PROBE, FASTWEIGHT_BUILD_EXT="0", FASTWEIGHT_EXT_PREBUILT="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False | disabled by FASTWEIGHT_BUILD_EXT=0"), r.stdout
    assert "JIT-building" not in r.stderr


def test_no_compiler_warns_once_and_falls_back(tmp_path):
    r = _run_python(_PROBE + "    print(loader.load().available)\n", FASTWEIGHT_EXT_PREBUILT="0",
                    CXX="/nonexistent/c++", FASTWEIGHT_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False | no C++ compiler"), r.stdout
    assert r.stderr.count("RuntimeWarning") == 1, r.stderr
    assert not any(tmp_path.iterdir())


def test_failed_build_is_one_line_once_and_the_retry_advice_works(tmp_path):
    """A compiler error surfaces as one warning line with the compiler's own message; a later
    process reuses the verdict and says what to delete; deleting it and fixing the compiler
    builds."""
    fake = tmp_path / "bad-c++"
    # A compiler that answers torch's version probe but fails every compilation.
    fake.write_text("#!/bin/sh\ncase \" $* \" in *' -c '*) echo 'ops.cpp:1:1: error: simulated compiler failure' >&2; "
                    "exit 1;; esac\nexec c++ \"$@\"\n")
    fake.chmod(0o755)
    cache = tmp_path / "cache"
    first = _run_python(_PROBE + "    loader.load()\n", FASTWEIGHT_EXT_PREBUILT="0", CXX=str(fake),
                        FASTWEIGHT_CACHE=str(cache))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("False | JIT build failed in "), first.stdout
    warning_lines = [line for line in first.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warning_lines) == 1, first.stderr
    assert "error: simulated compiler failure" in warning_lines[0]
    second = _run_python(_PROBE, FASTWEIGHT_EXT_PREBUILT="0", CXX=str(fake), FASTWEIGHT_CACHE=str(cache))
    assert "JIT build failed earlier" in second.stdout and "to retry" in second.stdout, second.stdout
    build_dir = second.stdout.split("delete ")[1].split(" to retry")[0]
    import shutil
    shutil.rmtree(build_dir)
    third = _run_python(_PROBE, FASTWEIGHT_EXT_PREBUILT="0", CXX=str(fake), FASTWEIGHT_CACHE=str(cache))
    assert "JIT build failed in" in third.stdout, third.stdout  # it really tried again


def test_unavailable_extension_raises_when_called():
    r = _run_python("""
        from fastweight.aggregation import extension as e
        import torch
        try:
            e.segment_mean(torch.ones(2), torch.tensor([0, 2]), torch.ones(2, dtype=torch.bool))
        except RuntimeError as exc:
            print("raised:", exc)
    """, FASTWEIGHT_BUILD_EXT="0", FASTWEIGHT_EXT_PREBUILT="0")
    assert "raised: fastweight C++ aggregation extension unavailable" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_jit_build_path():
    """The JIT build (into the user's cache, so only the first run compiles) gives the same ops."""
    r = _run_python(_PROBE + """
    import torch
    from fastweight.aggregation import extension as e
    from fastweight.aggregation import reference as ref
    valid = torch.tensor([True, False, True, True, False])
    cu = torch.tensor([0, 2, 2, 5])
    w = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(e.coefficients(valid, cu, w, None, True)[0], ref.coefficients(valid, cu, w, None, True)[0])
    print("ok")
    """, FASTWEIGHT_EXT_PREBUILT="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("True | JIT-built "), r.stdout
    assert r.stdout.rstrip().endswith("ok")
    assert r.stderr.count("JIT-building") <= 1 and "Warning" not in r.stderr, r.stderr
