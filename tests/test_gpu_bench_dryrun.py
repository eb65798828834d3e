"""benchmarks/gpu_bench.py --dry-run: tiny shapes on the CPU, the JSON and PNG it writes, the
PASS/SHORT lines it prints last, the verdict rule itself on synthetic records, and the shell
wrapper's syntax. The real run is benchmarks/gpu_check.sh on a GPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import goals  # noqa: E402

KEYS = {"device", "case", "op", "impl", "ms", "peak_mem_gib", "floor_ms", "frozen_head"}


def test_dry_run_writes_the_schema(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "bench.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--dry-run", "--out", str(out),
                           "--case", "tiny-softcap", "--case", "tiny-frozen", "--repeats", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["matmul"]["best_tflops"] > 0
    assert out.with_suffix(".png").stat().st_size > 1000
    records = doc["records"]
    assert {(r["case"], r["op"]) for r in records} == {("tiny-softcap", "fwd_bwd"), ("tiny-softcap", "score"),
                                                       ("tiny-frozen", "fwd_bwd")}
    assert {(r["op"], r["impl"]) for r in records} >= {("fwd_bwd", "fastweight"), ("score", "fastweight"),
                                                       ("fwd_bwd", "naive"), ("score", "naive")}
    for r in records:
        assert KEYS <= r.keys(), r
        assert r["op"] in ("fwd_bwd", "score") and r["floor_ms"] > 0
        assert (r["ms"] is None) == ("error" in r), r
        assert r["frozen_head"] == (r["case"] == "tiny-frozen")
    by = {(r["case"], r["op"], r["impl"]): r for r in records}
    for case, op in (("tiny-softcap", "fwd_bwd"), ("tiny-softcap", "score"), ("tiny-frozen", "fwd_bwd")):
        fw, naive = by[(case, op, "fastweight")], by[(case, op, "naive")]
        assert fw["ms"] > 0 and "error" not in fw, fw
        # Same weights, same softcap: the same loss.
        assert abs(fw["loss"] - naive["loss"]) <= 1e-4 * max(1.0, abs(naive["loss"])), (fw["loss"], naive["loss"])
    # The floor: 2 N*D*V per GEMM that cannot be avoided, at the run's best matmul rate.
    gemms = {("tiny-softcap", "fwd_bwd"): 3, ("tiny-softcap", "score"): 1, ("tiny-frozen", "fwd_bwd"): 2}
    for r in records:
        flops = 2 * gemms[(r["case"], r["op"])] * r["N"] * r["D"] * r["V"]
        assert r["floor_ms"] == pytest.approx(flops / (doc["matmul"]["best_tflops"] * 1e9), rel=1e-9), r

    # The last lines: one verdict per (case, op), the same as the JSON's and as recomputed here.
    expected = [goals.format_verdict(v) for v in goals.verdicts(records)]
    assert proc.stdout.rstrip("\n").splitlines()[-len(expected):] == expected
    assert [v["status"] for v in doc["verdicts"]] == [v["status"] for v in goals.verdicts(records)]
    assert len(expected) == 3 and all(line.split()[0] in ("PASS", "SHORT") for line in expected)
    # fastweight's own schedule variants are timed (same loss) but are never its peers.
    for case, op in (("tiny-softcap", "fwd_bwd"), ("tiny-frozen", "fwd_bwd")):
        for variant in ("fastweight_overlap", "fastweight_2gib"):
            assert by[(case, op, variant)]["loss"] == pytest.approx(by[(case, op, "fastweight")]["loss"], rel=1e-5)
    assert not {v["best_peer"] for v in doc["verdicts"]} & {"fastweight_overlap", "fastweight_2gib"}
    # The fast-tanh variant applies to bf16 logits under a bounded cap only: not to these fp32 cases.
    for case, op in gemms:
        assert by[(case, op, "fastweight_fast_tanh")]["error"].startswith("unavailable: the fast tanh"), case
    # Where the time goes, per (case, op), for fastweight and its two-stream variant.
    profiles = {(p["case"], p["op"], p["impl"]): p for p in doc["profiles"]}
    assert set(profiles) == {(c, o, i) for c, o in gemms for i in ("fastweight", "fastweight_overlap")}
    for p in profiles.values():
        assert "error" not in p, p
        assert p["wall_ms"] > 0 and p["groups"]["gemm"] > 0 and p["kernel_ms"] >= p["groups"]["gemm"]
        assert sum(p["groups"].values()) == pytest.approx(p["kernel_ms"])
    # The sweeps that choose the Triton defaults: the row kernel at two configs in both modes,
    # and every chunk budget x schedule giving the same loss per op.
    row = doc["sweeps"]["row_kernel"]
    assert {(r["name"], r["mode"]) for r in row} == {("tiny-softcap", "forward"), ("tiny-softcap", "fwd_bwd")}
    assert len(row) == 4 and all(r["ms"] > 0 and "error" not in r for r in row), row
    chunks = doc["sweeps"]["chunks"]
    assert len(chunks) == 8 and all("error" not in r for r in chunks), chunks
    for op in ("fwd_bwd", "score"):
        losses = [r["loss"] for r in chunks if r["op"] == op]
        assert max(losses) - min(losses) <= 1e-5 * max(1.0, abs(losses[0])), losses


def _records(fw_ms=10.0, fw_gib=0.5, peers=(("compiled", 12.0), ("naive", 20.0)), floor_ms=9.0):
    """Synthetic records of one (case, op): fastweight and its peers."""
    def rec(impl, ms, gib=None):
        return {"case": "c", "op": "fwd_bwd", "impl": impl, "ms": ms, "floor_ms": floor_ms,
                "frac_of_floor": floor_ms / ms if ms else None, "peak_mem_gib": gib}
    return [rec("fastweight", fw_ms, fw_gib)] + [rec(name, ms, 3.0) for name, ms in peers]


def test_verdict_ignores_fastweights_own_variants():
    """A faster variant of fastweight's schedule is not a peer it must beat."""
    records = _records() + [dict(_records()[0], impl="fastweight_2gib", ms=5.0, peak_mem_gib=2.0)]
    v = goals.verdict(records, "c", "fwd_bwd")
    assert v["status"] == "PASS" and v["best_peer"] == "compiled"


def test_verdict_pass():
    v = goals.verdict(_records(), "c", "fwd_bwd")
    assert v["status"] == "PASS" and v["short_on"] == []
    assert v["best_peer"] == "compiled" and v["ratio_to_best_peer"] == pytest.approx(10 / 12)
    assert goals.format_verdict(v).startswith("PASS  c fwd_bwd: 90.0% of floor")


@pytest.mark.parametrize("kwargs,reason", [
    (dict(floor_ms=8.0), "floor"),                              # 80% of the floor
    (dict(peers=(("compiled", 9.5), ("naive", 20.0))), "peer"),  # compiled is faster
    (dict(peers=(("compiled", 10.0),)), "peer"),                 # a tie is not faster
    (dict(fw_gib=1.5), "memory"),                                # 1.5 GiB > 1 GiB
    (dict(fw_gib=None), "memory unmeasured"),
    (dict(peers=()), "no peer timed"),
])
def test_verdict_short(kwargs, reason):
    v = goals.verdict(_records(**kwargs), "c", "fwd_bwd")
    assert v["status"] == "SHORT" and v["short_on"] == [reason], v
    assert goals.format_verdict(v).startswith("SHORT c fwd_bwd") and reason in goals.format_verdict(v)


def test_verdict_counts_only_timed_peers():
    records = _records()
    records.append({"case": "c", "op": "fwd_bwd", "impl": "liger", "ms": None, "error": "skipped: time budget"})
    records.append({"case": "other", "op": "fwd_bwd", "impl": "compiled", "ms": 1.0})  # another case
    v = goals.verdict(records, "c", "fwd_bwd")
    assert v["status"] == "PASS" and v["untimed_peers"] == ["liger"]
    assert "untimed: liger" in goals.format_verdict(v)


def test_verdict_without_a_fastweight_time():
    records = _records()
    records[0].update(ms=None, frac_of_floor=None, error="OOM: out of memory")
    v = goals.verdict(records, "c", "fwd_bwd")
    assert v["status"] == "SHORT" and v["short_on"] == ["no fastweight time (OOM: out of memory)"]
    assert v["best_peer"] == "compiled" and v["ratio_to_best_peer"] is None


def test_goals_cli_reads_a_results_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"records": _records(floor_ms=8.0)}))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.goals", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [goals.format_verdict(goals.verdict(_records(floor_ms=8.0), "c", "fwd_bwd"))]


def test_gpu_check_script_syntax():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


def test_no_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--out", str(tmp_path / "x.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA" in proc.stderr


def test_row_sweep_marks_the_launchers_default(monkeypatch):
    """Each row-sweep record says whether it is what the launcher runs by default, the fast
    tanh's module default included (bf16 logits only)."""
    from benchmarks.sweeps import row_kernel_sweep
    from fastweight.kernels import linear_ce as K

    def defaults(dtype):
        rows = row_kernel_sweep(301, 30.0, "cpu", rows=4, dtype=dtype, deadline=0.0)
        return [(r["config"], r["mode"]) for r in rows if r["default"]]
    plain = {**K.row_config(torch.bfloat16)}
    assert defaults("bf16") == [(plain, "forward"), (plain, "fwd_bwd")]
    monkeypatch.setattr(K, "FAST_TANH", True)  # then a config that does not name it runs it too
    fast = {**plain, "FAST_TANH": True}
    assert defaults("bf16") == [(plain, "forward"), (fast, "forward"), (plain, "fwd_bwd"), (fast, "fwd_bwd")]
    assert all(not c.get("FAST_TANH") for c, _ in defaults("fp16"))


def test_sweeps_past_their_deadline_are_recorded_as_skipped():
    """gpu_check.sh's timeout must never cut the verdict lines: a sweep that would start after
    its deadline runs nothing and says so."""
    from benchmarks.cases import GPU_DRY_CASES
    from benchmarks.sweeps import ROW_SWEEP_CONFIGS, chunk_sweep, row_kernel_sweep

    case = GPU_DRY_CASES[0]
    rows = row_kernel_sweep(case.V, case.softcap, "cpu", rows=4, dtype="fp32", deadline=0.0)
    chunks = chunk_sweep(case, "cpu", budgets=(1 << 20,), deadline=0.0)
    assert len(rows) == 2 * len(ROW_SWEEP_CONFIGS) and len(chunks) == 4
    # Without a bounded softcap the fast-tanh configs would repeat the exact ones: left out.
    exact = [c for c in ROW_SWEEP_CONFIGS if not c.get("FAST_TANH")]
    assert 0 < len(exact) < len(ROW_SWEEP_CONFIGS)
    for softcap in (None, 50.0):
        uncapped = row_kernel_sweep(case.V, softcap, "cpu", rows=4, dtype="fp32", deadline=0.0)
        assert [r["config"] for r in uncapped] == exact * 2
    assert all(r["error"] == "skipped: time budget" and "ms" not in r for r in rows + chunks)
