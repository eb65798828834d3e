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
  check_coefficients_args(valid, cu_seqlens, sample_weights, token_weights);
  const c10::cuda::CUDAGuard guard(valid.device());
  const auto v = valid.contiguous();
  const auto cu = cu_seqlens.contiguous();
  const int64_t n = v.numel(), b = cu.numel() - 1;
  c10::optional<at::Tensor> sw, tw;
  if (sample_weights.has_value()) sw = sample_weights->contiguous();
  if (token_weights.has_value()) tw = token_weights->contiguous();
  auto c = at::empty({n}, v.options().dtype(at::kFloat));
  auto counts = at::empty({b}, cu.options());
  C10_CUDA_CHECK(cuda::launch_coefficients(
      v.data_ptr<bool>(), cu.data_ptr<int64_t>(), b, n, sw.has_value() ? sw->data_ptr() : nullptr,
      sw.has_value() ? to_dtype(*sw, "sample_weights") : cuda::DType::kNone,
      tw.has_value() ? tw->data_ptr() : nullptr, tw.has_value() ? to_dtype(*tw, "token_weights") : cuda::DType::kNone,
      per_sample_mean, c.data_ptr<float>(), counts.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
  return {c, counts};
}

std::tuple<at::Tensor, at::Tensor> segment_mean_cuda(const at::Tensor& values, const at::Tensor& cu_seqlens,
                                                     const at::Tensor& valid) {
  check_segment_mean_args(values, cu_seqlens, valid);
  const c10::cuda::CUDAGuard guard(values.device());
  const auto x = values.contiguous();
  const auto cu = cu_seqlens.contiguous();
  const auto v = valid.contiguous();
  const int64_t n = x.numel(), b = cu.numel() - 1;
  auto means = at::empty({b}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  auto counts = at::empty({b}, cu.options());
  C10_CUDA_CHECK(cuda::launch_segment_mean(x.data_ptr(), to_dtype(x, "values"), cu.data_ptr<int64_t>(),
                                           v.data_ptr<bool>(), b, n, means.data_ptr(),
                                           counts.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
  return {means, counts};
}

at::Tensor segment_mean_backward_cuda(const at::Tensor& grad_means, const at::Tensor& cu_seqlens,
                                      const at::Tensor& counts, const at::Tensor& valid) {
  check_segment_mean_backward_args(grad_means, cu_seqlens, counts, valid);
  const c10::cuda::CUDAGuard guard(valid.device());
  const auto g = grad_means.contiguous();  // a stride-0 upstream gradient becomes B values
  const auto cu = cu_seqlens.contiguous();
  const auto cnt = counts.contiguous();
  const auto v = valid.contiguous();
  const int64_t n = v.numel(), b = cu.numel() - 1;
  auto out = at::empty({n}, v.options().dtype(g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  C10_CUDA_CHECK(cuda::launch_segment_mean_backward(g.data_ptr(), to_dtype(g, "grad_means"), cu.data_ptr<int64_t>(),
                                                    cnt.data_ptr<int64_t>(), v.data_ptr<bool>(), b, n,
                                                    out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace fastweight

TORCH_LIBRARY_IMPL(fastweight, CUDA, m) {
  m.impl("agg_coefficients", &fastweight::coefficients_cuda);
  m.impl("agg_segment_mean", &fastweight::segment_mean_cuda);
  m.impl("agg_segment_mean_backward", &fastweight::segment_mean_backward_cuda);
}
