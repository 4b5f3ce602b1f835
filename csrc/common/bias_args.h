// Host-side validation of bias_grad / bias_grad_backward arguments, shared by every backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "common/bias.h"

namespace miras {

// The Bias of an attentional-bias name ("l1" is Bias::lp); raises ValueError naming `bias` otherwise.
Bias parse_bias(std::string_view name);

// Checks shapes, dtypes, devices and scalar options (raising ValueError naming the argument) and returns
// the row problem they describe. `grad` is the upstream gradient of bias_grad_backward, if any.
RowProblem check_bias_args(const at::Tensor& y, const at::Tensor& v, const std::optional<at::Tensor>& delta,
                           std::string_view bias, double p, double eps, const at::Tensor* grad = nullptr);

// The validated problem and its inputs made contiguous; delta is undefined when the bias does not read it.
struct BiasInputs {
  RowProblem pr;
  at::Tensor grad;
  at::Tensor y;
  at::Tensor v;
  at::Tensor delta;
};

BiasInputs prepare_bias_inputs(const at::Tensor& y, const at::Tensor& v, const std::optional<at::Tensor>& delta,
                               std::string_view bias, double p, double eps, const at::Tensor* grad = nullptr);

// Uninitialised (grad_y, grad_v, grad_delta) for bias_grad_backward. grad_delta has delta's shape, zero when
// the bias ignores a given delta, and shape [0] when delta is None.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_outputs(const BiasInputs& in,
                                                                const std::optional<at::Tensor>& delta);

}  // namespace miras
