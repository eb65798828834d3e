#!/usr/bin/env bash
# Compile-only check of the CUDA sources of fastweight._C with the machine's nvcc, for sm_80
# and sm_90, so that a CUDA error cannot land unseen although no GPU runs here.
#
#  1. csrc/aggregation_cuda.cu (the kernels, on raw pointers: no torch headers) -> cubin + PTX,
#     warnings and ptxas register spills are errors.
#  2. csrc/aggregation_cuda_ops.cpp (the thin ATen wrapper): a syntax-only compile against the
#     installed torch's headers, when a Python with torch is found (a CPU wheel lacks one
#     generated c10/cuda header; a stub stands in for it).
#
# No nvcc: says so and exits 0. Any compile error: exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  NVCC="$(command -v nvcc || true)"
  [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
fi
if [[ -z "$NVCC" ]]; then
  echo "nvcc_check: nvcc not found (PATH, /usr/local/cuda/bin): CUDA compile check skipped"
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "nvcc_check: $("$NVCC" --version | tail -n 1)"

for arch in 80 90; do
  "$NVCC" -std=c++20 -O3 -Icsrc --Werror all-warnings -Xptxas -warn-spills,-warn-lmem-usage,-Werror \
    -gencode "arch=compute_${arch},code=[sm_${arch},compute_${arch}]" --resource-usage \
    -c csrc/aggregation_cuda.cu -o "$tmp/aggregation_cuda_sm${arch}.o" 2> "$tmp/log_${arch}.txt" || {
      cat "$tmp/log_${arch}.txt" >&2
      echo "nvcc_check: csrc/aggregation_cuda.cu FAILED for sm_${arch}" >&2
      exit 1
    }
  kernels=$(grep -c "Function properties for" "$tmp/log_${arch}.txt" || true)
  echo "nvcc_check: csrc/aggregation_cuda.cu OK for sm_${arch} (${kernels} kernels, no spills)"
done

# The ATen wrapper, syntax only, against the installed torch (skipped without one).
PY="${PYTHON:-$(command -v python || command -v python3 || true)}"
torch_inc="$("$PY" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null || true)"
if [[ -z "$torch_inc" ]]; then
  echo "nvcc_check: no Python with torch: ATen wrapper check skipped"
  exit 0
fi
cuda_inc="$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include"
[[ -f "$cuda_inc/cuda_runtime.h" ]] || cuda_inc="/usr/local/cuda/include"
mkdir -p "$tmp/stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
inc_flags=()
for d in $torch_inc; do inc_flags+=(-isystem "$d"); done
if [[ ! -f "$(echo "$torch_inc" | cut -d' ' -f1)/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  inc_flags=(-I"$tmp/stub" "${inc_flags[@]}")
fi
CXX="${CXX:-c++}"
"$CXX" -std=c++20 -fsyntax-only -Wall -Werror -Wno-unused-parameter -Icsrc "${inc_flags[@]}" -isystem "$cuda_inc" \
  -DFASTWEIGHT_WITH_CUDA csrc/aggregation_cuda_ops.cpp || {
    echo "nvcc_check: csrc/aggregation_cuda_ops.cpp FAILED (syntax check against torch headers)" >&2
    exit 1
  }
echo "nvcc_check: csrc/aggregation_cuda_ops.cpp OK (syntax, torch $("$PY" -c 'import torch; print(torch.__version__)'))"
