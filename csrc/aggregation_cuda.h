// Launchers of the CUDA loss-aggregation kernels, on raw device pointers.
//
// This header and aggregation_cuda.cu need only the CUDA toolkit (no torch headers), so CI can
// compile the kernels with nvcc on a machine with a CPU-only torch: see .ci/nvcc_check.sh.
// aggregation_cuda_ops.cpp is the thin ATen wrapper that registers them for the CUDA key.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastweight {
namespace cuda {

// Element type of an optional float input; kNone stands for an absent (None) tensor.
enum class DType : int { kNone = 0, kFloat32 = 1, kFloat64 = 2, kFloat16 = 3, kBFloat16 = 4 };

// c (N,) fp32 and counts (B,) int64. c_t = valid_t * w[s(t)] * u_t (/ max(n_s, 1) if per_sample_mean).
cudaError_t launch_coefficients(const bool* valid, const int64_t* cu_seqlens, int64_t num_segments,
                                int64_t num_tokens, const void* sample_weights, DType sample_weights_dtype,
                                const void* token_weights, DType token_weights_dtype, bool per_sample_mean,
                                float* c, int64_t* counts, cudaStream_t stream);

// means (B,) and counts (B,) int64: mean of the valid values of each segment, 0 if none.
// means is double* for kFloat64 values, float* otherwise.
cudaError_t launch_segment_mean(const void* values, DType values_dtype, const int64_t* cu_seqlens,
                                const bool* valid, int64_t num_segments, int64_t num_tokens, void* means,
                                int64_t* counts, cudaStream_t stream);

// grad_values (N,): grad_means[s(t)] / max(counts[s(t)], 1) on valid tokens, 0 elsewhere.
// grad_values is double* for kFloat64 grad_means, float* otherwise.
cudaError_t launch_segment_mean_backward(const void* grad_means, DType grad_means_dtype,
                                         const int64_t* cu_seqlens, const int64_t* counts, const bool* valid,
                                         int64_t num_segments, int64_t num_tokens, void* grad_values,
                                         cudaStream_t stream);

}  // namespace cuda
}  // namespace fastweight
