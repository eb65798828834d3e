"""The backend registry (fastweight/backends.py): declared capabilities, the one resolver, and
the layering rules of the tree (kernels/ stands alone; production never imports the test hooks)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import fastweight as fw
from fastweight import backends

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def _call(**overrides):
    hidden, weight = torch.randn(2, 3, 4), torch.randn(5, 4)
    labels = torch.randint(0, 5, (2, 3))
    return fw.weighted_ce(hidden, weight, labels, **overrides)


def _resolved(impl, dtype=torch.float32, op="linear_ce", device=torch.device("cpu")):
    return backends.resolve(op, impl, device, dtype)[0].name


def test_explicit_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(backends, "TRITON_ERROR", "triton unavailable (test)")
    with pytest.raises(RuntimeError, match="triton unavailable"):
        _call(impl="triton")


def test_env_override_of_auto(monkeypatch):
    monkeypatch.setenv("FASTWEIGHT_IMPL", "reference")
    assert _resolved("auto") == "reference"
    assert _resolved("torch") == "torch"
    monkeypatch.setenv("FASTWEIGHT_IMPL", "bogus")
    with pytest.raises(ValueError, match="FASTWEIGHT_IMPL"):
        _resolved("auto")
    monkeypatch.delenv("FASTWEIGHT_IMPL")
    assert _resolved("auto") == "torch"


def test_registry_routes_fp64_and_refuses_what_a_backend_cannot_run(monkeypatch):
    # fp64 ground-truth runs never take a backend that accumulates in fp32
    assert _resolved("auto", torch.float64, "aggregation") == "torch"
    monkeypatch.setenv("FASTWEIGHT_AGG_IMPL", "triton")
    with pytest.raises(RuntimeError, match="float64"):
        _resolved("auto", torch.float64, "aggregation")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="does not run on cpu"):
        _resolved("triton")


def test_auto_never_picks_the_interpreter_or_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _resolved("auto") == "torch"               # the interpreter runs only on request
    assert _resolved("triton") == "triton"
    assert _resolved("auto", torch.float64) == "torch"


@pytest.mark.parametrize("extension_devices,expected", [({"cpu", "cuda"}, "ext"), ({"cpu"}, "triton"),
                                                        (set(), "triton")])
def test_auto_on_cuda_prefers_the_faster_aggregation_backend(monkeypatch, extension_devices, expected):
    """The C++/CUDA kernels measured faster than Triton's on an H200: auto takes them when built."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backends, "TRITON_ERROR", None)
    from fastweight.extension import loader
    monkeypatch.setattr(loader, "_status", loader.Status(bool(extension_devices), frozenset(extension_devices),
                                                         "simulated"))
    assert _resolved("auto", op="aggregation", device=CUDA) == expected
    assert _resolved("auto", device=CUDA, dtype=torch.bfloat16) == "triton"
    assert _resolved("auto", device=CUDA, dtype=torch.float64) == "torch"


def test_every_backend_implements_its_op_contract():
    functions = {"linear_ce": {"linear_ce", "scale_"},
                 "aggregation": {"coefficients", "segment_mean", "segment_mean_backward"}}
    for op, entries in backends.REGISTRY.items():
        for backend in entries:
            if backend.module is None:
                continue
            missing = {f for f in functions[op] if not callable(getattr(backend.module, f, None))}
            assert not missing, (op, backend.name, missing)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
    return names


def test_kernels_import_nothing_from_the_rest_of_fastweight():
    for path in (ROOT / "kernels").glob("*.py"):
        bad = {name for name in _imports(path) if name.startswith(("fastweight", "."))}
        assert not bad, (path.name, bad)


def test_production_code_never_imports_the_test_hooks():
    for path in (ROOT / "fastweight").rglob("*.py"):
        if path.name == "testing.py":
            continue
        assert not any("testing" in name.split(".") for name in _imports(path)
                       if name.startswith("fastweight")), path
