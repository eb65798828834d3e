"""The ahead-of-time compile check runs (one kernel, one arch, one dtype: a few seconds).
The full matrix is `python -m benchmarks.aot_compile` (about 30 s on 2 cores)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_aot_compile_one_kernel(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aot_compile", "--arch", "90", "--dtype", "bf16",
                           "--kernel", "_ce_rows_kernel", "--out", str(out), "--jobs", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads(out.read_text())
    assert len(records) == 24
    for r in records:
        assert {"kernel", "arch", "dtype", "config", "n_regs", "n_spills", "shared_bytes"} <= r.keys()
        assert r["arch"] == "sm_90" and r["dtype"] == "bf16" and r["n_spills"] == 0 and r["n_regs"] > 0
