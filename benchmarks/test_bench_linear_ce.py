"""The linear cross-entropy benchmarks: ``weighted_ce`` forward+backward (FLOW-weighted mean)
and ``sequence_losses`` (the scoring pass, no_grad), every implementation available on the
device, over the N x V sweep of ``cases.sweep_cases`` (scaled down on the CPU).

Records (time, peak memory in its own process on the CPU, floor fraction, ratio to naive) are
written to ``benchmarks/results/<device>-<date>.json`` at the end of the session."""
import pytest
import torch

from benchmarks.cases import sweep_cases
from benchmarks.peers import available_impls
from benchmarks.conftest import find_record

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = sweep_cases(DEVICE)
IMPLS = available_impls(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["fwd_bwd", "score"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_linear_ce(benchmark, bench_record, case, op, impl):
    if find_record(case, op, impl) is not None:
        pytest.skip("already measured in this session (test_bench_foundation)")
    rec = bench_record(benchmark, case, op, impl)
    assert rec["loss"] == rec["loss"]
