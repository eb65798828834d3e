"""The benchmark harness works end to end on a tiny shape: every CPU implementation runs and
agrees, peak memory is measured in a subprocess, results are written, read back and plotted.
Not a timing assertion."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import foundation, harness as H, plot  # noqa: E402

CASE = H.make_case(96, 24, 101, T=32, prompt_frac=0.25, name="tiny")


def test_cases_and_inputs():
    inp = H.build_inputs(CASE)
    assert inp.hidden.shape == (3, 32, 24) and inp.weight.shape == (101, 24)
    assert (inp.labels[:, :8] == -100).all() and (inp.labels[:, 8:] >= 0).all()
    assert (inp.sample_weights > 0).all()
    assert H.Case.from_json(CASE.to_json()) == CASE
    assert H.FOUNDATION_CASE.N == 4096 and H.FOUNDATION_CASE.B == 8
    assert H.FOUNDATION_CASE in H.sweep_cases("cpu")


@pytest.mark.parametrize("op", ["fwd_bwd", "score"])
def test_implementations_agree(op):
    inp = H.build_inputs(CASE)
    ref = None
    for impl in H.available_impls("cpu"):
        if impl == "compiled":
            continue  # covered by test_results_roundtrip (compilation is slow)
        out = H.build(impl, inp, op, "cpu")()
        if impl == "torch_chunked" and op == "fwd_bwd":
            assert torch.isfinite(out)  # unweighted: a different value by design
            continue
        if ref is None:
            ref = out
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-4, atol=1e-5)


def test_results_roundtrip(tmp_path):
    records = H.run_cases([CASE], ops=("fwd_bwd", "score"), device="cpu", repeats=1,
                          memory=False, log=None)
    impls = set(H.available_impls("cpu"))
    assert {r["impl"] for r in records} == impls
    for r in records:
        if r["impl"] == "compiled" and "error" in r:
            continue  # no working C++ compiler: recorded, not raised
        assert r["ms"] > 0 and r["floor_ms"] > 0 and r["frac_of_floor"] > 0
        assert r["ratio_to_naive"] > 0 and math.isfinite(r["loss"])
    # peak memory in its own process, for one implementation
    mem = H.measure_peak_memory(CASE, "fwd_bwd", "fastweight_torch", "cpu")
    assert "error" not in mem, mem
    assert mem["peak_mem_mib"] >= 0
    records[0]["peak_mem_mib"] = mem["peak_mem_mib"]

    path = H.write_results(records, "cpu", tmp_path / "cpu-test.json")
    doc = H.read_results(path)
    assert doc["machine"]["torch"] == torch.__version__
    assert doc["machine"]["cpu_cores"] >= 1
    keys = {"device", "case", "op", "impl", "N", "D", "V", "dtype", "ms", "peak_mem_mib",
            "floor_ms", "frac_of_floor", "ratio_to_naive", "loss"}
    assert all(keys <= set(r) for r in doc["records"])
    assert len(doc["records"]) == len(records)
    json.dumps(doc)  # strict JSON (no NaN)

    pngs = plot.plot_files([path], tmp_path / "png")
    assert pngs and all(p.exists() and p.stat().st_size > 1000 for p in pngs)
    assert "goals" in foundation.format_summary(records)
