"""CPU benchmark of the loss-aggregation ops: the C++ extension (fastweight._C) against the plain
PyTorch composition (fastweight.aggregation.reference: repeat_interleave, index_add, gathers and
divisions), side by side in one run.

Workload: N = 1,048,576 tokens in 2048 packed sequences of random lengths, 80% of tokens valid,
sample and token weights; ``coefficients`` (per-sample mean) plus ``segment_mean`` forward and
backward (non-uniform upstream gradient). Goal: the extension at least 3x faster.

    python -m pytest benchmarks/test_bench_aggregation.py --benchmark-only

The last test prints the speed-ups (median times) and stores them in the benchmark JSON
(``--benchmark-json``) as extra_info. The "api" rows time the public helpers
``fastweight.token_coefficients`` + ``fastweight.segment_mean`` with FASTWEIGHT_AGG_IMPL set,
so they include argument validation and the layout code, the same for both backends.
"""
from __future__ import annotations

import statistics

import pytest
import torch

from fastweight.aggregation import extension as ext
from fastweight.aggregation import reference as ref
from fastweight.extension import load as load_extension

N_TOKENS = 1 << 20
N_SEQS = 2048
ROUNDS = 30

BACKENDS = {"ext": ext, "torch": ref}
OPS = ("coefficients", "segment_mean_fwd", "segment_mean_bwd", "fwd+bwd", "api")
_MEDIANS: dict[tuple[str, str], float] = {}
_MINS: dict[tuple[str, str], float] = {}

needs_ext = pytest.mark.skipif(not load_extension().available,
                               reason=f"extension unavailable: {load_extension().reason}")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    cuts = torch.randperm(N_TOKENS - 1, generator=g)[: N_SEQS - 1].sort().values + 1
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([N_TOKENS])])
    valid = torch.rand(N_TOKENS, generator=g) < 0.8
    labels = torch.where(valid, torch.randint(0, 32000, (N_TOKENS,), generator=g), -100)
    counts = torch.zeros(N_SEQS, dtype=torch.int64).index_add_(0, ref.segment_ids(cu, N_TOKENS), valid.long())
    return {
        "cu": cu, "valid": valid, "labels": labels, "counts": counts,
        "sample_weights": torch.rand(N_SEQS, generator=g) + 0.1,
        "token_weights": torch.rand(N_TOKENS, generator=g),
        "values": torch.randn(N_TOKENS, generator=g).requires_grad_(),
        "upstream": torch.randn(N_SEQS, generator=g),
    }


def _workload(op: str, backend, d):
    cu, valid = d["cu"], d["valid"]
    if op == "coefficients":
        return lambda: backend.coefficients(valid, cu, d["sample_weights"], d["token_weights"], True)
    if op == "segment_mean_fwd":
        values = d["values"].detach()
        return lambda: backend.segment_mean(values, cu, valid)
    if op == "segment_mean_bwd":
        return lambda: backend.segment_mean_backward(d["upstream"], cu, d["counts"], valid)
    if op == "fwd+bwd":
        values = d["values"].detach()

        def step():  # the backend contract's three calls, as fastweight's custom ops make them
            c, _ = backend.coefficients(valid, cu, d["sample_weights"], d["token_weights"], True)
            means, counts = backend.segment_mean(values, cu, valid)
            grad = backend.segment_mean_backward(d["upstream"], cu, counts, valid)
            return c, means, grad
        return step
    if op == "api":
        import fastweight

        def step():
            c = fastweight.token_coefficients(d["labels"], d["sample_weights"], token_weights=d["token_weights"],
                                              cu_seqlens=cu, sample_reduction="mean")
            means = fastweight.segment_mean(d["values"], cu, valid)
            (grad,) = torch.autograd.grad(means, d["values"], d["upstream"])
            return c, grad
        return step
    raise ValueError(op)


@pytest.mark.parametrize("impl", [pytest.param("ext", marks=needs_ext), "torch"])
@pytest.mark.parametrize("op", OPS)
def test_aggregation(benchmark, data, op, impl, monkeypatch):
    monkeypatch.setenv("FASTWEIGHT_AGG_IMPL", impl)  # used by the "api" rows
    fn = _workload(op, BACKENDS[impl], data)
    fn()  # warm-up
    benchmark.group = f"aggregation {op} N={N_TOKENS} B={N_SEQS} cpu threads={torch.get_num_threads()}"
    benchmark.extra_info.update({"op": op, "impl": impl, "N": N_TOKENS, "B": N_SEQS,
                                 "threads": torch.get_num_threads()})
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    if benchmark.stats:
        _MEDIANS[(op, impl)] = statistics.median(benchmark.stats.stats.data)
        _MINS[(op, impl)] = min(benchmark.stats.stats.data)


@needs_ext
@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")
def test_speedup_summary(capsys, benchmark):  # `benchmark`: so that --benchmark-only runs it
    """Prints ext vs torch speed-ups of the rows above (median times)."""
    rows = [(op, _MEDIANS[(op, "torch")] / _MEDIANS[(op, "ext")], _MINS[(op, "torch")] / _MINS[(op, "ext")])
            for op in OPS if (op, "torch") in _MEDIANS and (op, "ext") in _MEDIANS]
    if not rows:
        pytest.skip("no benchmark rows were timed (run with --benchmark-only / without --benchmark-disable)")
    lines = [f"aggregation speed-up, ext vs PyTorch composition (N={N_TOKENS}, B={N_SEQS}, "
             f"{torch.get_num_threads()} threads; median and min of {ROUNDS} rounds):"]
    lines += [f"  {op:<17} median: torch {_MEDIANS[(op, 'torch')] * 1e3:8.3f} ms  ext {_MEDIANS[(op, 'ext')] * 1e3:7.3f} ms"
              f"  {med:6.1f}x   min: {best:6.1f}x" for op, med, best in rows]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    benchmark.extra_info["speedups"] = {op: {"median": med, "min": best} for op, med, best in rows}
    assert all(med > 1.0 for _, med, _ in rows), lines
