"""The benchmark modules work end to end on a tiny shape: every CPU implementation runs and
agrees with the library's float64 reference, the floor counts the right GEMMs, peak memory is
measured in a subprocess, results are written, read back and plotted. Not a timing assertion."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fastweight  # noqa: E402
from benchmarks import foundation, plot  # noqa: E402
from benchmarks.cases import FOUNDATION_CASE, Case, build_inputs, make_case, sweep_cases  # noqa: E402
from benchmarks.measure import floor_flops, gemm_fns, measure_peak_memory  # noqa: E402
from benchmarks.peers import available_impls, build  # noqa: E402
from benchmarks.results import read_results, write_results  # noqa: E402
from benchmarks.runner import run_cases  # noqa: E402

CASE = make_case(96, 24, 101, T=32, prompt_frac=0.25, name="tiny", softcap=5.0, logit_std=3.0)
FROZEN = Case("tiny-frozen", B=3, T=32, D=24, V=101, prompt=8, frozen_head=True)


def test_cases_and_inputs():
    inp = build_inputs(CASE)
    assert inp.hidden.shape == (3, 32, 24) and inp.weight.shape == (101, 24)
    assert (inp.labels[:, :8] == -100).all() and (inp.labels[:, 8:] >= 0).all()
    assert (inp.sample_weights > 0).all()
    assert inp.cu_seqlens.tolist() == [0, 32, 64, 96]
    assert Case.from_json(CASE.to_json()) == CASE
    assert Case.from_json(FROZEN.to_json()).frozen_head
    assert FOUNDATION_CASE.N == 4096 and FOUNDATION_CASE.B == 8
    assert FOUNDATION_CASE in sweep_cases("cpu")
    assert FROZEN.timed_ops(("fwd_bwd", "score")) == ["fwd_bwd"]
    assert CASE.timed_ops(("fwd_bwd", "score")) == ["fwd_bwd", "score"]


def _float64_reference(inp, op):
    """The FLOW-weighted mean loss / per-sample mean losses in float64, written here from the
    definitions (DESIGN.md), independent of the peers' code."""
    x = inp.hidden.double().reshape(-1, inp.hidden.shape[-1])
    z = x @ inp.weight.double().t()
    if inp.softcap is not None:
        z = inp.softcap * torch.tanh(z / inp.softcap)
    labels = inp.labels.reshape(-1)
    valid = labels != -100
    tok = torch.logsumexp(z, -1) - z.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    tok = torch.where(valid, tok, 0.0).view(inp.labels.shape)
    valid = valid.view(inp.labels.shape)
    if op == "score":
        return tok.sum(1) / valid.sum(1)
    return (tok.sum(1) * inp.sample_weights.double()).sum() / valid.sum()


@pytest.mark.parametrize("case,op", [(CASE, "fwd_bwd"), (CASE, "score"), (FROZEN, "fwd_bwd")],
                         ids=["softcap-fwd_bwd", "softcap-score", "frozen-fwd_bwd"])
def test_implementations_agree(case, op):
    inp = build_inputs(case)
    ref = _float64_reference(inp, op)
    for impl in available_impls("cpu"):
        if impl == "compiled":
            continue  # covered by test_results_roundtrip (compilation is slow)
        fn = build(impl, inp, op, "cpu")
        out = fn()
        if impl == "torch_chunked" and (op == "fwd_bwd" or case.softcap is not None):
            assert torch.isfinite(out).all()  # unweighted, no softcap: a different value by design
            continue
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6, msg=f"{impl} {op}")
        if op == "fwd_bwd":
            hidden = fn.grads[0]
            assert hidden.grad is not None and hidden.grad.abs().sum() > 0, impl
            assert len(fn.grads) == (1 if case.frozen_head else 2), impl


def test_frozen_head_gets_no_gradient():
    inp = build_inputs(FROZEN)
    for impl in ("naive", "fastweight_torch"):
        fn = build(impl, inp, "fwd_bwd", "cpu")
        fn()
        hidden, weight = fn.leaves
        assert fn.grads == (hidden,)
        assert hidden.requires_grad and hidden.grad is not None
        assert not weight.requires_grad and weight.grad is None


def test_variants_hold_their_launcher_defaults_during_the_call_only():
    """fastweight's variants run with the launcher defaults they name, restored after each call
    (a failing one too); the fast-tanh variant exists only where the kernel would use it."""
    from benchmarks.peers import Unavailable, _with_defaults, kernel_defaults
    from fastweight.kernels import linear_ce as K

    before = (K.OVERLAP, K.FAST_TANH)
    seen = []
    _with_defaults(lambda: seen.append((K.OVERLAP, K.FAST_TANH)), {"OVERLAP": True, "FAST_TANH": True})()
    assert seen == [(True, True)] and (K.OVERLAP, K.FAST_TANH) == before

    def fail():
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        _with_defaults(fail, {"FAST_TANH": not before[1]})()
    assert (K.OVERLAP, K.FAST_TANH) == before
    with pytest.raises(AttributeError):
        with kernel_defaults({"NO_SUCH_DEFAULT": 1}):
            pass
    bf16 = dict(B=1, T=8, D=4, V=16, dtype="bf16")
    for case in (CASE, Case("nocap", **bf16), Case("cap50", **bf16, softcap=50.0)):
        with pytest.raises(Unavailable, match="fast tanh"):
            build("fastweight_fast_tanh", build_inputs(case), "fwd_bwd", "cpu")
    assert callable(build("fastweight_fast_tanh", build_inputs(Case("cap30", **bf16, softcap=30.0)), "score", "cpu"))


def test_the_floor_counts_the_gemms_it_cannot_avoid():
    full = Case("f", B=1, T=8, D=4, V=16)
    frozen = Case("z", B=1, T=8, D=4, V=16, frozen_head=True)
    ndv = 8 * 4 * 16
    assert floor_flops(full, "fwd_bwd") == 6 * ndv
    assert floor_flops(frozen, "fwd_bwd") == 4 * ndv
    assert floor_flops(full, "score") == 2 * ndv
    assert list(gemm_fns(frozen, "fwd_bwd", "cpu")) == ["logits", "dx"]
    assert list(gemm_fns(full, "fwd_bwd", "cpu")) == ["logits", "dx", "dw"]


def test_results_roundtrip(tmp_path):
    records = run_cases([CASE, FROZEN], ops=("fwd_bwd", "score"), device="cpu", repeats=1,
                        memory=False, log=None)
    impls = set(available_impls("cpu"))
    assert {r["impl"] for r in records} == impls
    assert {(r["case"], r["op"]) for r in records} == {("tiny", "fwd_bwd"), ("tiny", "score"),
                                                       ("tiny-frozen", "fwd_bwd")}
    for r in records:
        if r["impl"] == "compiled" and "error" in r:
            continue  # no working C++ compiler: recorded, not raised
        assert "error" not in r, r
        assert r["ms"] > 0 and r["floor_ms"] > 0 and r["frac_of_floor"] > 0
        assert r["ratio_to_naive"] > 0 and math.isfinite(r["loss"])
        assert r["frozen_head"] == (r["case"] == "tiny-frozen")
    # peak memory in its own process, for one implementation
    mem = measure_peak_memory(CASE, "fwd_bwd", "fastweight_torch", "cpu")
    assert "error" not in mem, mem
    assert mem["peak_mem_mib"] >= 0
    records[0]["peak_mem_mib"] = mem["peak_mem_mib"]

    path = write_results(records, "cpu", tmp_path / "cpu-test.json")
    doc = read_results(path)
    assert doc["machine"]["torch"] == torch.__version__
    assert doc["machine"]["cpu_cores"] >= 1
    keys = {"device", "case", "op", "impl", "N", "D", "V", "dtype", "ms", "peak_mem_mib",
            "floor_ms", "frac_of_floor", "ratio_to_naive", "loss", "frozen_head"}
    assert all(keys <= set(r) for r in doc["records"])
    assert len(doc["records"]) == len(records)
    json.dumps(doc, allow_nan=False)  # strict JSON

    pngs = plot.plot_files([path], tmp_path / "png")
    assert pngs and all(p.exists() and p.stat().st_size > 1000 for p in pngs)
    assert "goals" in foundation.format_summary(records)


def test_naive_is_the_librarys_reference():
    """The naive peer computes the library's reference loss: the same value as weighted_ce's
    reference path on the same inputs."""
    inp = build_inputs(CASE)
    naive = build("naive", inp, "fwd_bwd", "cpu")()
    ref = fastweight.weighted_ce(inp.hidden, inp.weight, inp.labels, inp.sample_weights,
                                 softcap=inp.softcap, impl="reference")
    torch.testing.assert_close(naive, ref.detach(), rtol=1e-6, atol=1e-7)
