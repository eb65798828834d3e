// CPU kernels of the loss-aggregation ops (fastweight::agg_*), registered for the CPU key.
//
// Layout (see fastweight/aggregation_torch.py, the reference): N tokens, B segments given by
// cu_seqlens (int64, (B+1,), non-decreasing from 0 to N), a bool mask `valid` (N,).
//
// Parallelism: at::parallel_for (OpenMP in PyTorch's CPU builds; honours torch.set_num_threads)
// over a "work" range of N + B units (one per token, one per segment). Each thread's range is
// mapped to the segments whose work prefix cu[s] + s falls into it, so threads get balanced
// token counts whatever the segment lengths, and every segment is handled by one thread: no
// atomics, deterministic results. Each kernel reads each token once (the per-sample-mean
// coefficients read a segment's mask twice, the second time from cache).
//
// Rounding: coefficients and the backward do the same fp32 operations in the same order as the
// PyTorch reference, so they are bitwise equal to it. Segment sums accumulate in fp64.
// Like the reference, segment_mean and its backward return fp64 for fp64 inputs, else fp32.

#include "aggregation.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastweight {
namespace {

// Work units below which a call runs on one thread.
constexpr int64_t kGrain = 1 << 15;

// First segment s in [0, B] with cu[s] + s >= target (cu[s] + s is strictly increasing).
inline int64_t segment_at(const int64_t* cu, int64_t num_segments, int64_t target) {
  int64_t lo = 0, hi = num_segments;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cu[mid] + mid < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Calls f(first_segment, end_segment) on disjoint segment ranges covering [0, B), in parallel.
template <typename F>
void parallel_segments(const int64_t* cu, int64_t num_segments, int64_t num_tokens, const F& f) {
  if (num_segments == 0) return;
  const int64_t work = num_tokens + num_segments;
  at::parallel_for(0, work, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t s0 = begin == 0 ? 0 : segment_at(cu, num_segments, begin);
    const int64_t s1 = end >= work ? num_segments : segment_at(cu, num_segments, end);
    if (s0 < s1) f(s0, s1);
  });
}

// x where v == 1, +0 where v == 0, without a branch (a select that GCC vectorises even when
// x comes from a load; `v ? x : 0` keeps a branch there). v must be 0 or 1.
inline float masked(uint8_t v, float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits &= 0u - static_cast<uint32_t>(v);
  std::memcpy(&x, &bits, sizeof bits);
  return x;
}

inline double masked(uint8_t v, double x) {
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits &= uint64_t{0} - static_cast<uint64_t>(v);
  std::memcpy(&x, &bits, sizeof bits);
  return x;
}

// Tag type for an absent (None) weight tensor.
struct NoWeight {};

template <typename T>
inline float load_weight(const void* p, int64_t i) {
  if constexpr (std::is_same_v<T, NoWeight>) {
    return 1.0f;
  } else {
    return static_cast<float>(static_cast<const T*>(p)[i]);
  }
}

// Calls f with a value of the C++ type matching `t`'s dtype (NoWeight for None).
template <typename F>
void dispatch_weight(const c10::optional<at::Tensor>& t, const char* name, const F& f) {
  if (!t.has_value()) return f(NoWeight{});
  switch (t->scalar_type()) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK(false, name, " must have a float dtype, got ", t->scalar_type());
  }
}

template <typename SW, typename TW, bool kMean>
void coefficients_kernel(const uint8_t* valid, const int64_t* cu, int64_t num_segments, int64_t num_tokens,
                         const void* sw, const void* tw, float* c, int64_t* counts) {
  parallel_segments(cu, num_segments, num_tokens, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t t0 = cu[s], t1 = cu[s + 1];
      const float w = load_weight<SW>(sw, s);
      if constexpr (kMean) {
        int64_t n = 0;
        for (int64_t t = t0; t < t1; ++t) n += valid[t];
        counts[s] = n;
        const float denom = static_cast<float>(n > 0 ? n : 1);
        for (int64_t t = t0; t < t1; ++t) {
          // Same operations and order as the reference: ((valid * w) * u) / max(n, 1).
          const float x = (w * load_weight<TW>(tw, t)) / denom;
          c[t] = masked(valid[t], x);
        }
      } else {
        int64_t n = 0;
        for (int64_t t = t0; t < t1; ++t) {
          const uint8_t v = valid[t];
          n += v;
          c[t] = masked(v, w * load_weight<TW>(tw, t));
        }
        counts[s] = n;
      }
    }
  });
}

// Accumulation and result type: fp64 for fp64 inputs (as the reference), else fp32.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename VT>
void segment_mean_kernel(const VT* values, const int64_t* cu, const uint8_t* valid, int64_t num_segments,
                         int64_t num_tokens, acc_t<VT>* means, int64_t* counts) {
  parallel_segments(cu, num_segments, num_tokens, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t t0 = cu[s], t1 = cu[s + 1];
      double sum = 0.0;
      int64_t n = 0;
      // `omp simd reduction` lets the compiler split the sum over vector lanes (a fixed order:
      // still deterministic); fp64 accumulation keeps the result accurate.
#pragma omp simd reduction(+ : sum, n)
      for (int64_t t = t0; t < t1; ++t) {
        const uint8_t v = valid[t];
        const double x = static_cast<double>(static_cast<acc_t<VT>>(values[t]));
        sum += masked(v, x);
        n += v;
      }
      counts[s] = n;
      means[s] = n > 0 ? static_cast<acc_t<VT>>(sum / static_cast<double>(n)) : acc_t<VT>(0);
    }
  });
}

template <typename GT>
void segment_mean_backward_kernel(const GT* grad_means, const int64_t* cu, const int64_t* counts,
                                  const uint8_t* valid, int64_t num_segments, int64_t num_tokens, acc_t<GT>* out) {
  using A = acc_t<GT>;
  parallel_segments(cu, num_segments, num_tokens, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t t0 = cu[s], t1 = cu[s + 1];
      const int64_t n = counts[s];
      // Same as the reference: grad.to(acc) / counts.clamp_min(1).to(acc).
      const A g = static_cast<A>(grad_means[s]) / static_cast<A>(n > 0 ? n : 1);
      for (int64_t t = t0; t < t1; ++t) out[t] = masked(valid[t], g);
    }
  });
}

// torch bools are one byte holding 0 or 1; as uint8_t the loops vectorise (as bool they do not).
inline const uint8_t* valid_bytes(const at::Tensor& valid) {
  return reinterpret_cast<const uint8_t*>(valid.data_ptr<bool>());
}

// cu_seqlens must be non-decreasing from 0 to N: the kernels index tokens with it. On the CPU
// this costs one pass over B values, so we check it rather than read out of bounds.
void check_cu_seqlens_values(const at::Tensor& cu, int64_t num_tokens) {
  const int64_t* p = cu.data_ptr<int64_t>();
  const int64_t b = cu.numel() - 1;
  TORCH_CHECK(p[0] == 0, "cu_seqlens must start at 0, got ", p[0]);
  TORCH_CHECK(p[b] == num_tokens, "cu_seqlens must end at the number of tokens ", num_tokens, ", got ", p[b]);
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(p[i] <= p[i + 1], "cu_seqlens must be non-decreasing, got ", p[i], " then ", p[i + 1],
                " at index ", i);
  }
}

std::tuple<at::Tensor, at::Tensor> coefficients_cpu(const at::Tensor& valid, const at::Tensor& cu_seqlens,
                                                     const c10::optional<at::Tensor>& sample_weights,
                                                     const c10::optional<at::Tensor>& token_weights,
                                                     bool per_sample_mean) {
  auto call = prepare_coefficients(valid, cu_seqlens, sample_weights, token_weights);
  check_cu_seqlens_values(call.cu_seqlens, call.num_tokens);
  const void* sw_ptr = call.sample_weights.has_value() ? call.sample_weights->data_ptr() : nullptr;
  const void* tw_ptr = call.token_weights.has_value() ? call.token_weights->data_ptr() : nullptr;
  dispatch_weight(call.sample_weights, "sample_weights", [&](auto sw_tag) {
    dispatch_weight(call.token_weights, "token_weights", [&](auto tw_tag) {
      using SW = decltype(sw_tag);
      using TW = decltype(tw_tag);
      const auto run = [&](auto per_sample_mean_tag) {
        coefficients_kernel<SW, TW, decltype(per_sample_mean_tag)::value>(
            valid_bytes(call.valid), call.cu_seqlens.data_ptr<int64_t>(), call.num_segments, call.num_tokens,
            sw_ptr, tw_ptr, call.c.data_ptr<float>(), call.counts.data_ptr<int64_t>());
      };
      if (per_sample_mean) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  });
  return {call.c, call.counts};
}

std::tuple<at::Tensor, at::Tensor> segment_mean_cpu(const at::Tensor& values, const at::Tensor& cu_seqlens,
                                                    const at::Tensor& valid) {
  auto call = prepare_segment_mean(values, cu_seqlens, valid);
  check_cu_seqlens_values(call.cu_seqlens, call.num_tokens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.values.scalar_type(), "agg_segment_mean", [&] {
    segment_mean_kernel<scalar_t>(call.values.data_ptr<scalar_t>(), call.cu_seqlens.data_ptr<int64_t>(),
                                  valid_bytes(call.valid), call.num_segments, call.num_tokens,
                                  call.means.data_ptr<acc_t<scalar_t>>(), call.counts.data_ptr<int64_t>());
  });
  return {call.means, call.counts};
}

at::Tensor segment_mean_backward_cpu(const at::Tensor& grad_means, const at::Tensor& cu_seqlens,
                                     const at::Tensor& counts, const at::Tensor& valid) {
  auto call = prepare_segment_mean_backward(grad_means, cu_seqlens, counts, valid);
  check_cu_seqlens_values(call.cu_seqlens, call.num_tokens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.grad_means.scalar_type(),
                                  "agg_segment_mean_backward", [&] {
    segment_mean_backward_kernel<scalar_t>(call.grad_means.data_ptr<scalar_t>(), call.cu_seqlens.data_ptr<int64_t>(),
                                           call.counts.data_ptr<int64_t>(), valid_bytes(call.valid),
                                           call.num_segments, call.num_tokens,
                                           call.grad_values.data_ptr<acc_t<scalar_t>>());
  });
  return call.grad_values;
}

}  // namespace
}  // namespace fastweight

TORCH_LIBRARY_IMPL(fastweight, CPU, m) {
  m.impl("agg_coefficients", &fastweight::coefficients_cpu);
  m.impl("agg_segment_mean", &fastweight::segment_mean_cpu);
  m.impl("agg_segment_mean_backward", &fastweight::segment_mean_backward_cpu);
}
