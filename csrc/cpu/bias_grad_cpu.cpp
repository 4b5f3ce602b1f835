// CPU kernels of miras_ext::bias_grad and its backward: rows split over ATen's OpenMP pool.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "common/bias_args.h"
#include "cpu/bias_rows.h"

namespace miras {
namespace {

at::Tensor bias_grad_cpu(const at::Tensor& y, const at::Tensor& v, const std::optional<at::Tensor>& delta,
                         c10::string_view bias, double p, double eps) {
  const BiasInputs in = prepare_bias_inputs(y, v, delta, bias, p, eps);
  at::Tensor g = at::empty_like(in.y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "miras_ext::bias_grad", [&] {
    forward_rows<scalar_t>(in.pr, in.y.const_data_ptr<scalar_t>(), in.v.const_data_ptr<scalar_t>(),
                           in_or_null<scalar_t>(in.delta), g.mutable_data_ptr<scalar_t>());
  });
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_grad_backward_cpu(
    const at::Tensor& grad, const at::Tensor& y, const at::Tensor& v, const std::optional<at::Tensor>& delta,
    c10::string_view bias, double p, double eps) {
  const BiasInputs in = prepare_bias_inputs(y, v, delta, bias, p, eps, &grad);
  auto [gy, gv, gd] = backward_outputs(in, delta);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "miras_ext::bias_grad_backward", [&] {
    backward_rows<scalar_t>(in.pr, in.grad.const_data_ptr<scalar_t>(), in.y.const_data_ptr<scalar_t>(),
                            in.v.const_data_ptr<scalar_t>(), in_or_null<scalar_t>(in.delta),
                            gy.mutable_data_ptr<scalar_t>(), gv.mutable_data_ptr<scalar_t>(),
                            in.delta.defined() ? gd.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {gy, gv, gd};
}

}  // namespace

TORCH_LIBRARY_IMPL(miras_ext, CPU, m) {
  m.impl("bias_grad", &bias_grad_cpu);
  m.impl("bias_grad_backward", &bias_grad_backward_cpu);
}

}  // namespace miras
