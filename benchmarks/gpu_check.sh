#!/usr/bin/env bash
# The one-call GPU check, from the repository root of a checkout on a CUDA machine:
#   bash benchmarks/gpu_check.sh [gpu_bench.py options]
# 1. installs the carried peer wheels (.whl/*.whl: Liger-Kernel, cut-cross-entropy) if present,
# 2. installs this checkout (editable, no deps, no C++ extension build),
# 3. runs the `gpu`-marked tests and the Triton kernel tests on this card,
# 4. runs benchmarks/gpu_bench.py: bf16 matmul rate; fwd+bwd and scoring for the Gemma-2-2B and
#    Llama-3-8B heads and fwd+bwd for the frozen Llama head, against every peer, beside three
#    variants of fastweight (two streams; the hardware tanh; 2 GiB chunks), then a torch.profiler
#    breakdown of fastweight's kernels per case; JSON and PNG to
#    benchmarks/results/gpu-<card>-<date>.*,
# 5. prints, LAST, one line per (case, op): PASS or SHORT against the speed goal (>= 85% of the
#    matmul floor, faster than every peer timed, <= 1 GiB above inputs and gradients).
# Budget: the whole call ends within GPU_CHECK_BUDGET_S (default 345 s, under 6 minutes on an
# H200): the tests get at most 120 s; the bench gets the rest and stops timing peers (never
# fastweight) 60 s before its end.
# Where $OUT is set (the device tool brings back what is under it), the call also leaves there
# its whole log, the tests' tolerance margins (tolerance-margins.tsv) and the results files.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$(date +%s)
marker=$(mktemp)
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    export FASTWEIGHT_TOLERANCE_LOG=$OUT/tolerance-margins.tsv
    exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
budget=${GPU_CHECK_BUDGET_S:-345}
left() { echo $(( budget - ($(date +%s) - start) )); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
        || echo "gpu_check: installing the carried wheels failed; peers will be reported unavailable"
fi

# The CUDA extension is not needed for these checks; building it would eat the time budget.
FASTWEIGHT_BUILD_EXT=${FASTWEIGHT_BUILD_EXT:-0} $PY -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "gpu_check: editable install failed"

echo "== gpu tests (every gpu-marked test, and the Triton kernel tests compiled for this card)"
tests_end=$(( $(date +%s) + 120 ))
timeout 80 $PY -m pytest -q -m gpu -p no:cacheprovider tests
tests_rc=$?
timeout $(( tests_end - $(date +%s) > 10 ? tests_end - $(date +%s) : 10 )) \
    $PY -m pytest -q -p no:cacheprovider tests/kernels \
    || tests_rc=1

echo "== benchmark"
log=$(mktemp)
bench_s=$(left)
timeout "$bench_s" $PY benchmarks/gpu_bench.py --budget-s $(( bench_s > 90 ? bench_s - 60 : 30 )) "$@" 2>&1 | tee "$log"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc, $(( $(date +%s) - start )) s"
echo "== speed goal per case (fastweight)"
grep -E '^(PASS|SHORT) ' "$log" || echo "SHORT all cases: the bench printed no verdict (rc=$bench_rc)"
rm -f "$log"
if [ -n "${OUT:-}" ]; then
    find benchmarks/results -name 'gpu-*' -newer "$marker" -exec cp {} "$OUT"/ \;
fi
rm -f "$marker"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
