// What the CPU and CUDA wrappers of the fastweight::agg_* ops share: the argument checks
// (metadata only: no value reads, no sync), dense inputs and allocated outputs.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace fastweight {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_cu_and_valid(const at::Tensor& cu_seqlens, const at::Tensor& valid) {
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
              "cu_seqlens must be 1-D with at least one element, got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong, "cu_seqlens must be int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(valid.dim() == 1, "valid must be 1-D, got shape ", valid.sizes());
  TORCH_CHECK(valid.scalar_type() == at::kBool, "valid must be bool, got ", valid.scalar_type());
  TORCH_CHECK(valid.device() == cu_seqlens.device(), "valid is on ", valid.device(), " but cu_seqlens is on ",
              cu_seqlens.device());
}

inline void check_weight(const c10::optional<at::Tensor>& w, const char* name, int64_t expected,
                         const at::Tensor& ref) {
  if (!w.has_value()) return;
  TORCH_CHECK(w->dim() == 1 && w->numel() == expected, name, " must have shape (", expected, ",), got ",
              w->sizes());
  TORCH_CHECK(is_float_dtype(w->scalar_type()), name, " must have a float dtype, got ", w->scalar_type());
  TORCH_CHECK(w->device() == ref.device(), name, " is on ", w->device(), " but valid is on ", ref.device());
}

inline void check_coefficients_args(const at::Tensor& valid, const at::Tensor& cu_seqlens,
                                    const c10::optional<at::Tensor>& sample_weights,
                                    const c10::optional<at::Tensor>& token_weights) {
  check_cu_and_valid(cu_seqlens, valid);
  check_weight(sample_weights, "sample_weights", cu_seqlens.numel() - 1, valid);
  check_weight(token_weights, "token_weights", valid.numel(), valid);
}

inline void check_segment_mean_args(const at::Tensor& values, const at::Tensor& cu_seqlens,
                                    const at::Tensor& valid) {
  check_cu_and_valid(cu_seqlens, valid);
  TORCH_CHECK(values.dim() == 1 && values.numel() == valid.numel(), "values must have shape (", valid.numel(),
              ",) like valid, got ", values.sizes());
  TORCH_CHECK(is_float_dtype(values.scalar_type()), "values must have a float dtype, got ", values.scalar_type());
  TORCH_CHECK(values.device() == valid.device(), "values is on ", values.device(), " but valid is on ",
              valid.device());
}

inline void check_segment_mean_backward_args(const at::Tensor& grad_means, const at::Tensor& cu_seqlens,
                                             const at::Tensor& counts, const at::Tensor& valid) {
  check_cu_and_valid(cu_seqlens, valid);
  const int64_t b = cu_seqlens.numel() - 1;
  TORCH_CHECK(grad_means.dim() == 1 && grad_means.numel() == b, "grad_means must have shape (", b, ",), got ",
              grad_means.sizes());
  TORCH_CHECK(is_float_dtype(grad_means.scalar_type()), "grad_means must have a float dtype, got ",
              grad_means.scalar_type());
  TORCH_CHECK(counts.dim() == 1 && counts.numel() == b, "counts must have shape (", b, ",), got ", counts.sizes());
  TORCH_CHECK(counts.scalar_type() == at::kLong, "counts must be int64, got ", counts.scalar_type());
  TORCH_CHECK(grad_means.device() == valid.device() && counts.device() == valid.device(),
              "grad_means, counts and valid must be on one device, got ", grad_means.device(), ", ",
              counts.device(), ", ", valid.device());
}

// Result dtype of segment_mean and its backward: fp64 for fp64 inputs, else fp32.
inline at::ScalarType accumulation_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

// One call of agg_coefficients: dense inputs and its outputs c (N,) fp32 and counts (B,) int64.
struct CoefficientsCall {
  at::Tensor valid, cu_seqlens;
  c10::optional<at::Tensor> sample_weights, token_weights;
  int64_t num_tokens, num_segments;
  at::Tensor c, counts;
};

inline CoefficientsCall prepare_coefficients(const at::Tensor& valid, const at::Tensor& cu_seqlens,
                                             const c10::optional<at::Tensor>& sample_weights,
                                             const c10::optional<at::Tensor>& token_weights) {
  check_coefficients_args(valid, cu_seqlens, sample_weights, token_weights);
  CoefficientsCall call{valid.contiguous(), cu_seqlens.contiguous(), contiguous(sample_weights),
                        contiguous(token_weights), valid.numel(), cu_seqlens.numel() - 1, {}, {}};
  call.c = at::empty({call.num_tokens}, call.valid.options().dtype(at::kFloat));
  call.counts = at::empty({call.num_segments}, call.cu_seqlens.options());
  return call;
}

// One call of agg_segment_mean: outputs means (B,) and counts (B,) int64.
struct SegmentMeanCall {
  at::Tensor values, cu_seqlens, valid;
  int64_t num_tokens, num_segments;
  at::Tensor means, counts;
};

inline SegmentMeanCall prepare_segment_mean(const at::Tensor& values, const at::Tensor& cu_seqlens,
                                            const at::Tensor& valid) {
  check_segment_mean_args(values, cu_seqlens, valid);
  SegmentMeanCall call{values.contiguous(), cu_seqlens.contiguous(), valid.contiguous(), values.numel(),
                       cu_seqlens.numel() - 1, {}, {}};
  call.means = at::empty({call.num_segments}, call.values.options().dtype(accumulation_dtype(values)));
  call.counts = at::empty({call.num_segments}, call.cu_seqlens.options());
  return call;
}

// One call of agg_segment_mean_backward: output grad_values (N,).
struct SegmentMeanBackwardCall {
  at::Tensor grad_means, cu_seqlens, counts, valid;
  int64_t num_tokens, num_segments;
  at::Tensor grad_values;
};

inline SegmentMeanBackwardCall prepare_segment_mean_backward(const at::Tensor& grad_means,
                                                             const at::Tensor& cu_seqlens,
                                                             const at::Tensor& counts, const at::Tensor& valid) {
  check_segment_mean_backward_args(grad_means, cu_seqlens, counts, valid);
  // contiguous(): a stride-0 upstream gradient (from .sum()) becomes B values
  SegmentMeanBackwardCall call{grad_means.contiguous(), cu_seqlens.contiguous(), counts.contiguous(),
                               valid.contiguous(), valid.numel(), cu_seqlens.numel() - 1, {}};
  call.grad_values = at::empty({call.num_tokens}, call.valid.options().dtype(accumulation_dtype(grad_means)));
  return call;
}

}  // namespace fastweight
