"""The ahead-of-time compile check: one kernel, one arch, one dtype compiles (a few seconds);
ptxas is the one the installed Triton uses; a ptxas failure shows ptxas's own message. The
full matrix is `python -m benchmarks.aot_compile` (about 30 s on 2 cores)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FATAL = "ptxas fatal   : Unsupported .version 9.4; current version is '8.8'"
PTX = "//\n.version 9.4\n.target sm_90a\n.address_size 64\n"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def _failure_report(proc: subprocess.CompletedProcess, out: Path) -> str:
    """The compile errors of the report (ptxas's messages), then the tail of stderr."""
    errors = []
    if out.exists():
        errors = [f"{r['kernel']} {r['arch']} {r['dtype']} {r['variant']}: {r['error']}"
                  for r in json.loads(out.read_text()) if "error" in r]
    return "\n".join(errors[:5] + [f"rc={proc.returncode}", proc.stderr[-3000:]])


@pytest.fixture
def failing_ptxas(tmp_path) -> Path:
    """A ptxas that reports CUDA 12.8 for --version and otherwise fails as an old ptxas fails
    on newer PTX: its fatal message on stderr, exit status 255."""
    path = tmp_path / "ptxas"
    path.write_text("#!/bin/sh\n"
                    'if [ "$1" = "--version" ]; then\n'
                    "  echo 'Cuda compilation tools, release 12.8, V12.8.93'; exit 0\n"
                    "fi\n"
                    f'echo "{FATAL}" >&2\n'
                    "exit 255\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_aot_compile_one_kernel(tmp_path):
    pytest.importorskip("triton")
    from benchmarks.kernel_specs import all_specs

    expected = sum(1 for s in all_specs() if s.kernel == "_ce_rows_kernel" and s.dtype == "bf16")
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aot_compile", "--arch", "90", "--dtype", "bf16",
                           "--kernel", "_ce_rows_kernel", "--out", str(out), "--jobs", "1"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _failure_report(proc, out)
    records = json.loads(out.read_text())
    assert expected >= 8 and len(records) == expected
    for r in records:
        assert {"kernel", "arch", "dtype", "config", "n_regs", "n_spills", "shared_bytes", "ptxas"} <= r.keys()
        assert r["arch"] == "sm_90" and r["dtype"] == "bf16" and r["n_spills"] == 0 and r["n_regs"] > 0
    # The SASS loop census (Triton bundles nvdisasm): one loop per sweep, plus the zero-writing
    # loop of the gradient sweep for all-ignored rows, and the bounded softcap sweep has no
    # per-tile block reductions (no barriers) and fewer instructions per logit.
    by = {r["variant"]: r for r in records}
    loops = {"forward": 1, "fwd_bwd": 3, "backward": 2}
    assert all(len(r["loops"]) == loops[r["variant"].split("+")[0]] for r in records)
    bounded, running = by["forward+softcap+bounded+aligned"]["loops"][0], by["forward+softcap+aligned"]["loops"][0]
    assert bounded["barriers"] == 0 < running["barriers"]
    assert bounded["per_element"]["instructions"] < running["per_element"]["instructions"]
    assert bounded["per_element"]["mufu"] == pytest.approx(3, abs=0.1)  # exp2, reciprocal, exp2


def test_sass_loops_reads_backward_branches():
    from benchmarks.aot_compile import sass_loops

    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        ".L_x_0:",
        "        /*0010*/                   MUFU.EX2 R2, R3 ;",
        "        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;",
        "        /*0030*/               @P0 FADD R4, R4, R2 ;",
        "        /*0040*/              @!P1 BRA `(.L_x_0) ;",
        "        /*0050*/                   BRA `(.L_x_1) ;",
        ".L_x_1:",
        "        /*0060*/                   BRA `(.L_x_1);",
    ])
    assert sass_loops(sass, elements_per_thread=2) == [
        {"instructions": 4, "mufu": 1, "barriers": 1, "shuffles": 0,
         "per_element": {"instructions": 2.0, "mufu": 0.5, "barriers": 0.5, "shuffles": 0.0}}]


def test_specs_follow_the_kernels_launch_configs():
    pytest.importorskip("triton")
    import torch

    from benchmarks.kernel_specs import all_specs
    from fastweight.kernels import aggregation, linear_ce

    specs = all_specs()
    for s in specs:
        if s.kernel == "_ce_rows_kernel":
            torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[s.dtype]
            assert s.config == linear_ce.row_config(torch_dtype)
            assert s.num_warps == s.config["num_warps"]
            assert s.constexprs["BLOCK_V"] == s.config["BLOCK_V"]
        elif s.kernel == "_scale_kernel":
            assert s.constexprs["BLOCK"] == linear_ce.SCALE_CONFIG["BLOCK"]
            assert s.num_warps == linear_ce.SCALE_CONFIG["num_warps"]
        else:
            assert s.config == aggregation.CONFIG and s.constexprs["BLOCK"] == aggregation.CONFIG["BLOCK"]
        assert list(s.signature) == list(s.fn.arg_names)  # every argument typed, in order
    assert {s.kernel for s in specs} == {"_ce_rows_kernel", "_scale_kernel", "_coefficients_kernel",
                                         "_segment_mean_kernel", "_segment_mean_backward_kernel"}


def test_a_kernel_argument_without_a_type_is_named():
    """A kernel that gained an argument the specs do not know fails with its name, not with a
    compile of a stale signature."""
    from types import SimpleNamespace

    from benchmarks.kernel_specs import KernelSpecError, make_spec

    def kernel(x_ptr, n, new_arg, BLOCK: "tl.constexpr", FLAG: "tl.constexpr" = False):  # noqa: F821
        pass
    fn = SimpleNamespace(__name__="kernel", fn=kernel)
    spec = make_spec(fn, "fp32", "", {"num_warps": 4}, {"x_ptr": "*{dtype}", "n": "i32", "new_arg": "fp32"},
                     {"BLOCK": 64}, aligned=True)
    assert spec.signature == {"x_ptr": "*fp32", "n": "i32", "new_arg": "fp32", "BLOCK": "constexpr",
                              "FLAG": "constexpr"}
    assert spec.constexprs == {"BLOCK": 64, "FLAG": False} and spec.divisible_by_16 == ["x_ptr"]
    with pytest.raises(KernelSpecError, match="'new_arg'"):
        make_spec(fn, "fp32", "", {"num_warps": 4}, {"x_ptr": "*{dtype}", "n": "i32"}, {"BLOCK": 64})
    with pytest.raises(KernelSpecError, match="'BLOCK'"):
        make_spec(fn, "fp32", "", {"num_warps": 4}, {"x_ptr": "*{dtype}", "n": "i32", "new_arg": "fp32"}, {})


def test_ptxas_failure_raises_ptxas_message(failing_ptxas):
    from benchmarks.aot_compile import PtxasError, ptxas_resources

    with pytest.raises(PtxasError) as info:
        ptxas_resources(PTX, 90, ptxas=str(failing_ptxas))
    message = str(info.value)
    assert "Unsupported .version 9.4; current version is '8.8'" in message
    assert "exited 255" in message and "PTX .version 9.4" in message


def test_ptxas_is_the_one_triton_uses(failing_ptxas, monkeypatch):
    """TRITON_PTXAS_PATH (Triton's own override) decides which ptxas reads the PTX of sm_80."""
    pytest.importorskip("triton")
    from benchmarks.aot_compile import ptxas_for

    path, release = ptxas_for(80)
    assert Path(path).exists() and release
    monkeypatch.setenv("TRITON_PTXAS_PATH", str(failing_ptxas))
    assert ptxas_for(80) == (str(failing_ptxas), "12.8")


def test_ptxas_failure_is_reported_by_the_check(tmp_path, failing_ptxas):
    """End to end: with a failing ptxas the check exits 1, and ptxas's message stands in the
    report and on stderr (not only "exit status 255")."""
    pytest.importorskip("triton")
    out = tmp_path / "report.json"
    env = _env(TRITON_PTXAS_PATH=str(failing_ptxas), TRITON_PTXAS_BLACKWELL_PATH=str(failing_ptxas))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aot_compile", "--arch", "80", "--dtype", "fp32",
                           "--kernel", "_segment_mean_kernel", "--out", str(out), "--jobs", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, _failure_report(proc, out)
    (record,) = json.loads(out.read_text())
    assert "Unsupported .version 9.4" in record["error"], record["error"]
    assert "Unsupported .version 9.4" in proc.stderr


def test_importing_the_check_leaves_the_environment_alone(monkeypatch):
    """The check unsets TRITON_INTERPRET when it runs, never on import: an import from a test
    must not switch the rest of the session's kernels off the interpreter."""
    import importlib

    import benchmarks.aot_compile as aot_compile

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    importlib.reload(aot_compile)
    assert os.environ.get("TRITON_INTERPRET") == "1"
