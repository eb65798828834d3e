// Thin ATen wrapper of the CUDA kernels (aggregation_cuda.cu): registers the fastweight::agg_*
// ops for the CUDA key. Compiled only when torch is a CUDA build and nvcc is found.

#include "aggregation.h"
#include "aggregation_cuda.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace fastweight {
namespace {

cuda::DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, name, " must have a float dtype, got ", t.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> coefficients_cuda(const at::Tensor& valid, const at::Tensor& cu_seqlens,
                                                      const c10::optional<at::Tensor>& sample_weights,
                                                      const c10::optional<at::Tensor>& token_weights,
                                                      bool per_sample_mean) {
  const c10::cuda::CUDAGuard guard(valid.device());
  auto call = prepare_coefficients(valid, cu_seqlens, sample_weights, token_weights);
  const auto& sw = call.sample_weights;
  const auto& tw = call.token_weights;
  C10_CUDA_CHECK(cuda::launch_coefficients(
      call.valid.data_ptr<bool>(), call.cu_seqlens.data_ptr<int64_t>(), call.num_segments, call.num_tokens,
      sw.has_value() ? sw->data_ptr() : nullptr, sw.has_value() ? to_dtype(*sw, "sample_weights") : cuda::DType::kNone,
      tw.has_value() ? tw->data_ptr() : nullptr, tw.has_value() ? to_dtype(*tw, "token_weights") : cuda::DType::kNone,
      per_sample_mean, call.c.data_ptr<float>(), call.counts.data_ptr<int64_t>(),
      c10::cuda::getCurrentCUDAStream()));
  return {call.c, call.counts};
}

std::tuple<at::Tensor, at::Tensor> segment_mean_cuda(const at::Tensor& values, const at::Tensor& cu_seqlens,
                                                     const at::Tensor& valid) {
  const c10::cuda::CUDAGuard guard(values.device());
  auto call = prepare_segment_mean(values, cu_seqlens, valid);
  C10_CUDA_CHECK(cuda::launch_segment_mean(call.values.data_ptr(), to_dtype(call.values, "values"),
                                           call.cu_seqlens.data_ptr<int64_t>(), call.valid.data_ptr<bool>(),
                                           call.num_segments, call.num_tokens, call.means.data_ptr(),
                                           call.counts.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
  return {call.means, call.counts};
}

at::Tensor segment_mean_backward_cuda(const at::Tensor& grad_means, const at::Tensor& cu_seqlens,
                                      const at::Tensor& counts, const at::Tensor& valid) {
  const c10::cuda::CUDAGuard guard(valid.device());
  auto call = prepare_segment_mean_backward(grad_means, cu_seqlens, counts, valid);
  C10_CUDA_CHECK(cuda::launch_segment_mean_backward(
      call.grad_means.data_ptr(), to_dtype(call.grad_means, "grad_means"), call.cu_seqlens.data_ptr<int64_t>(),
      call.counts.data_ptr<int64_t>(), call.valid.data_ptr<bool>(), call.num_segments, call.num_tokens,
      call.grad_values.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return call.grad_values;
}

}  // namespace
}  // namespace fastweight

TORCH_LIBRARY_IMPL(fastweight, CUDA, m) {
  m.impl("agg_coefficients", &fastweight::coefficients_cuda);
  m.impl("agg_segment_mean", &fastweight::segment_mean_cuda);
  m.impl("agg_segment_mean_backward", &fastweight::segment_mean_backward_cuda);
}
