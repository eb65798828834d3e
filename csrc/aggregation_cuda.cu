// CUDA kernels of the loss-aggregation ops, on raw pointers (no torch headers).
//
// A "team" of threads owns one segment at a time: a warp (segments shorter than
// kLongSegment tokens on average, several segments per block) or a whole block (longer ones).
// Each team strides over its segment's tokens, reduces in registers and shared memory, and
// writes its segment's results: no atomics, so results are deterministic. Teams loop over
// segments with a grid stride, so any B fits the grid.
//
// Rounding matches the PyTorch reference where it is one fp32 expression (coefficients and the
// backward: bitwise equal, since nvcc's default IEEE division is used and nothing contracts to an
// FMA); segment sums accumulate in fp64. segment_mean and its backward return fp64 for fp64
// inputs, else fp32, as the reference does.

#include "aggregation_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastweight {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarp = 32;
constexpr int64_t kLongSegment = 512;  // average tokens per segment above which a block owns a segment
constexpr int64_t kMaxGrid = int64_t{1} << 20;

__device__ __forceinline__ float load_float(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat64: return static_cast<float>(static_cast<const double*>(p)[i]);
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return 1.0f;  // kNone: an absent weight is 1
  }
}

template <typename A>
__device__ __forceinline__ A load_acc(const void* p, DType dtype, int64_t i);
template <>
__device__ __forceinline__ float load_acc<float>(const void* p, DType dtype, int64_t i) {
  return load_float(p, dtype, i);
}
template <>
__device__ __forceinline__ double load_acc<double>(const void* p, DType dtype, int64_t i) {
  return static_cast<const double*>(p)[i];  // only used for kFloat64 inputs
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the TEAM threads that share a segment; every thread of the team gets the result.
// TEAM == kBlock uses `smem` (kBlock / kWarp entries) and must be reached by the whole block.
template <int TEAM, typename T>
__device__ __forceinline__ T team_sum(T v, T* smem) {
  v = warp_sum(v);
  if constexpr (TEAM == kWarp) {
    return v;
  } else {
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    __syncthreads();  // the previous segment's readers are done with smem
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    T r = lane < TEAM / kWarp ? smem[lane] : T(0);
    return warp_sum(r);
  }
}

// Token range of segment s, clamped into [0, N] so that bad cu_seqlens cannot read out of bounds.
__device__ __forceinline__ void segment_range(const int64_t* cu, int64_t s, int64_t n, int64_t& t0, int64_t& t1) {
  t0 = min(max(cu[s], int64_t{0}), n);
  t1 = min(max(cu[s + 1], t0), n);
}

template <int TEAM, bool kMean>
__global__ void __launch_bounds__(kBlock)
    coefficients_kernel(const bool* __restrict__ valid, const int64_t* __restrict__ cu, int64_t num_segments,
                        int64_t num_tokens, const void* __restrict__ sw, DType sw_dtype,
                        const void* __restrict__ tw, DType tw_dtype, float* __restrict__ c,
                        int64_t* __restrict__ counts) {
  __shared__ long long smem[kBlock / kWarp];
  constexpr int kTeams = kBlock / TEAM;
  const int lane = threadIdx.x % TEAM;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kTeams;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kTeams + threadIdx.x / TEAM; s < num_segments; s += stride) {
    int64_t t0, t1;
    segment_range(cu, s, num_tokens, t0, t1);
    const float w = load_float(sw, sw_dtype, s);
    long long n = 0;
    if constexpr (kMean) {
      for (int64_t t = t0 + lane; t < t1; t += TEAM) n += valid[t];
      n = team_sum<TEAM>(n, smem);
      const float denom = static_cast<float>(n > 0 ? n : 1);
      for (int64_t t = t0 + lane; t < t1; t += TEAM) {
        const float x = (w * load_float(tw, tw_dtype, t)) / denom;  // the reference's order
        c[t] = valid[t] ? x : 0.0f;
      }
    } else {
      for (int64_t t = t0 + lane; t < t1; t += TEAM) {
        const bool v = valid[t];
        n += v;
        c[t] = v ? w * load_float(tw, tw_dtype, t) : 0.0f;
      }
      n = team_sum<TEAM>(n, smem);
    }
    if (lane == 0) counts[s] = n;
  }
}

// A: the result type (double for fp64 inputs, else float); sums accumulate in double.
template <int TEAM, typename A>
__global__ void __launch_bounds__(kBlock)
    segment_mean_kernel(const void* __restrict__ values, DType values_dtype, const int64_t* __restrict__ cu,
                        const bool* __restrict__ valid, int64_t num_segments, int64_t num_tokens,
                        A* __restrict__ means, int64_t* __restrict__ counts) {
  __shared__ double smem_sum[kBlock / kWarp];
  __shared__ long long smem_cnt[kBlock / kWarp];
  constexpr int kTeams = kBlock / TEAM;
  const int lane = threadIdx.x % TEAM;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kTeams;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kTeams + threadIdx.x / TEAM; s < num_segments; s += stride) {
    int64_t t0, t1;
    segment_range(cu, s, num_tokens, t0, t1);
    double sum = 0.0;
    long long n = 0;
    for (int64_t t = t0 + lane; t < t1; t += TEAM) {
      const bool v = valid[t];
      sum += v ? static_cast<double>(load_acc<A>(values, values_dtype, t)) : 0.0;
      n += v;
    }
    sum = team_sum<TEAM>(sum, smem_sum);
    n = team_sum<TEAM>(n, smem_cnt);
    if (lane == 0) {
      counts[s] = n;
      means[s] = n > 0 ? static_cast<A>(sum / static_cast<double>(n)) : A(0);
    }
  }
}

template <int TEAM, typename A>
__global__ void __launch_bounds__(kBlock)
    segment_mean_backward_kernel(const void* __restrict__ grad_means, DType grad_dtype,
                                 const int64_t* __restrict__ cu, const int64_t* __restrict__ counts,
                                 const bool* __restrict__ valid, int64_t num_segments, int64_t num_tokens,
                                 A* __restrict__ out) {
  constexpr int kTeams = kBlock / TEAM;
  const int lane = threadIdx.x % TEAM;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kTeams;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kTeams + threadIdx.x / TEAM; s < num_segments; s += stride) {
    int64_t t0, t1;
    segment_range(cu, s, num_tokens, t0, t1);
    const int64_t n = counts[s];
    const A g = load_acc<A>(grad_means, grad_dtype, s) / static_cast<A>(n > 0 ? n : 1);
    for (int64_t t = t0 + lane; t < t1; t += TEAM) out[t] = valid[t] ? g : A(0);
  }
}

// Grid size for TEAM threads per segment.
template <int TEAM>
unsigned int grid_for(int64_t num_segments) {
  constexpr int64_t kTeams = kBlock / TEAM;
  const int64_t blocks = (num_segments + kTeams - 1) / kTeams;
  return static_cast<unsigned int>(blocks < kMaxGrid ? blocks : kMaxGrid);
}

bool use_block_teams(int64_t num_segments, int64_t num_tokens) {
  return num_tokens >= kLongSegment * num_segments;
}

}  // namespace

cudaError_t launch_coefficients(const bool* valid, const int64_t* cu_seqlens, int64_t num_segments,
                                int64_t num_tokens, const void* sample_weights, DType sample_weights_dtype,
                                const void* token_weights, DType token_weights_dtype, bool per_sample_mean,
                                float* c, int64_t* counts, cudaStream_t stream) {
  if (num_segments <= 0) return cudaSuccess;
  if (sample_weights == nullptr) sample_weights_dtype = DType::kNone;
  if (token_weights == nullptr) token_weights_dtype = DType::kNone;
#define FASTWEIGHT_LAUNCH(TEAM, MEAN)                                                                     \
  coefficients_kernel<TEAM, MEAN><<<grid_for<TEAM>(num_segments), kBlock, 0, stream>>>(                   \
      valid, cu_seqlens, num_segments, num_tokens, sample_weights, sample_weights_dtype, token_weights, \
      token_weights_dtype, c, counts)
  if (use_block_teams(num_segments, num_tokens)) {
    if (per_sample_mean) FASTWEIGHT_LAUNCH(kBlock, true); else FASTWEIGHT_LAUNCH(kBlock, false);
  } else {
    if (per_sample_mean) FASTWEIGHT_LAUNCH(kWarp, true); else FASTWEIGHT_LAUNCH(kWarp, false);
  }
#undef FASTWEIGHT_LAUNCH
  return cudaGetLastError();
}

template <typename A>
void segment_mean_launch(const void* values, DType values_dtype, const int64_t* cu_seqlens, const bool* valid,
                         int64_t num_segments, int64_t num_tokens, A* means, int64_t* counts, cudaStream_t stream) {
  if (use_block_teams(num_segments, num_tokens)) {
    segment_mean_kernel<kBlock, A><<<grid_for<kBlock>(num_segments), kBlock, 0, stream>>>(
        values, values_dtype, cu_seqlens, valid, num_segments, num_tokens, means, counts);
  } else {
    segment_mean_kernel<kWarp, A><<<grid_for<kWarp>(num_segments), kBlock, 0, stream>>>(
        values, values_dtype, cu_seqlens, valid, num_segments, num_tokens, means, counts);
  }
}

template <typename A>
void segment_mean_backward_launch(const void* grad_means, DType grad_dtype, const int64_t* cu_seqlens,
                                  const int64_t* counts, const bool* valid, int64_t num_segments,
                                  int64_t num_tokens, A* out, cudaStream_t stream) {
  if (use_block_teams(num_segments, num_tokens)) {
    segment_mean_backward_kernel<kBlock, A><<<grid_for<kBlock>(num_segments), kBlock, 0, stream>>>(
        grad_means, grad_dtype, cu_seqlens, counts, valid, num_segments, num_tokens, out);
  } else {
    segment_mean_backward_kernel<kWarp, A><<<grid_for<kWarp>(num_segments), kBlock, 0, stream>>>(
        grad_means, grad_dtype, cu_seqlens, counts, valid, num_segments, num_tokens, out);
  }
}

cudaError_t launch_segment_mean(const void* values, DType values_dtype, const int64_t* cu_seqlens,
                                const bool* valid, int64_t num_segments, int64_t num_tokens, void* means,
                                int64_t* counts, cudaStream_t stream) {
  if (num_segments <= 0) return cudaSuccess;
  if (values_dtype == DType::kFloat64) {
    segment_mean_launch(values, values_dtype, cu_seqlens, valid, num_segments, num_tokens,
                        static_cast<double*>(means), counts, stream);
  } else {
    segment_mean_launch(values, values_dtype, cu_seqlens, valid, num_segments, num_tokens,
                        static_cast<float*>(means), counts, stream);
  }
  return cudaGetLastError();
}

cudaError_t launch_segment_mean_backward(const void* grad_means, DType grad_means_dtype,
                                         const int64_t* cu_seqlens, const int64_t* counts, const bool* valid,
                                         int64_t num_segments, int64_t num_tokens, void* grad_values,
                                         cudaStream_t stream) {
  if (num_segments <= 0) return cudaSuccess;
  if (grad_means_dtype == DType::kFloat64) {
    segment_mean_backward_launch(grad_means, grad_means_dtype, cu_seqlens, counts, valid, num_segments,
                                 num_tokens, static_cast<double*>(grad_values), stream);
  } else {
    segment_mean_backward_launch(grad_means, grad_means_dtype, cu_seqlens, counts, valid, num_segments,
                                 num_tokens, static_cast<float*>(grad_values), stream);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastweight
