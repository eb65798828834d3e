"""benchmarks/gpu_bench.py --dry-run: tiny shapes on the CPU, the JSON it writes, and the shell
wrapper's syntax. The real run is benchmarks/gpu_check.sh on a GPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"device", "case", "op", "impl", "ms", "peak_mem_gib", "floor_ms"}


def test_dry_run_writes_the_schema(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "bench.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--dry-run", "--out", str(out),
                           "--case", "tiny-softcap", "--repeats", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["matmul"]["best_tflops"] > 0
    records = doc["records"]
    assert {(r["op"], r["impl"]) for r in records} >= {("fwd_bwd", "fastweight"), ("score", "fastweight"),
                                                       ("fwd_bwd", "naive"), ("score", "naive")}
    for r in records:
        assert KEYS <= r.keys(), r
        assert r["op"] in ("fwd_bwd", "score") and r["floor_ms"] > 0
        assert (r["ms"] is None) == ("error" in r), r
    by = {(r["op"], r["impl"]): r for r in records}
    for op in ("fwd_bwd", "score"):
        fw, naive = by[(op, "fastweight")], by[(op, "naive")]
        assert fw["ms"] > 0 and "error" not in fw, fw
        # Same weights, same softcap: the same loss.
        assert abs(fw["loss"] - naive["loss"]) <= 1e-4 * max(1.0, abs(naive["loss"])), (fw["loss"], naive["loss"])
    assert "fastweight" in proc.stdout.splitlines()[-1] or any("fastweight" in line for line in proc.stdout.splitlines()[-14:])


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
