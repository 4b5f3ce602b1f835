// CUDA backend of miras_ext::bias_grad: argument checks and dtype dispatch on the host, kernels in .cu files.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "common/bias_args.h"
#include "cuda/bias_grad_launch.h"

namespace miras {
namespace {

// ATen's half types share their bit layout with CUDA's, which the kernels use.
template <typename S>
struct DeviceType {
  using type = S;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename S>
const typename DeviceType<S>::type* in_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const typename DeviceType<S>::type*>(t.const_data_ptr<S>()) : nullptr;
}

template <typename S>
typename DeviceType<S>::type* out_ptr(at::Tensor& t) {
  return reinterpret_cast<typename DeviceType<S>::type*>(t.mutable_data_ptr<S>());
}

at::Tensor bias_grad_cuda(const at::Tensor& y, const at::Tensor& v, const std::optional<at::Tensor>& delta,
                          c10::string_view bias, double p, double eps) {
  const c10::cuda::CUDAGuard guard(y.device());
  const BiasInputs in = prepare_bias_inputs(y, v, delta, bias, p, eps);
  at::Tensor g = at::empty_like(in.y);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "miras_ext::bias_grad", [&] {
    cuda::launch_bias_grad(in.pr, in_ptr<scalar_t>(in.y), in_ptr<scalar_t>(in.v), in_ptr<scalar_t>(in.delta),
                           out_ptr<scalar_t>(g), stream);
  });
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_grad_backward_cuda(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& v, const std::optional<at::Tensor>& delta,
    c10::string_view bias, double p, double eps) {
  const c10::cuda::CUDAGuard guard(y.device());
  const BiasInputs in = prepare_bias_inputs(y, v, delta, bias, p, eps, &grad);
  auto [gy, gv, gd] = backward_outputs(in, delta);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "miras_ext::bias_grad_backward", [&] {
    cuda::launch_bias_grad_backward(in.pr, in_ptr<scalar_t>(in.grad), in_ptr<scalar_t>(in.y),
                                    in_ptr<scalar_t>(in.v), in_ptr<scalar_t>(in.delta), out_ptr<scalar_t>(gy),
                                    out_ptr<scalar_t>(gv), in.delta.defined() ? out_ptr<scalar_t>(gd) : nullptr,
                                    stream);
  });
  return {gy, gv, gd};
}

}  // namespace

TORCH_LIBRARY_IMPL(miras_ext, CUDA, m) {
  m.impl("bias_grad", &bias_grad_cuda);
  m.impl("bias_grad_backward", &bias_grad_backward_cuda);
}

}  // namespace miras
