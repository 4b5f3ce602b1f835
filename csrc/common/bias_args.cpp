#include "common/bias_args.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <array>
#include <string>
#include <utility>

namespace miras {
namespace {

bool is_threshold_bias(Bias b) { return b == Bias::huber || needs_row_norm(b); }

void check_like_y(const at::Tensor& t, const char* name, const at::Tensor& y) {
  TORCH_CHECK_VALUE(t.scalar_type() == y.scalar_type(), name, ": expected dtype ", y.scalar_type(),
                    " (the dtype of y), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == y.device(), name, ": expected device ", y.device(),
                    " (the device of y), got ", t.device());
}

DeltaLayout check_delta(const at::Tensor& d, const at::Tensor& y, Bias bias) {
  check_like_y(d, "delta", y);
  const auto row_shape = y.sizes().slice(0, y.dim() - 1);
  if (d.sizes() == row_shape) return DeltaLayout::per_row;
  if (d.sizes() == y.sizes()) {
    TORCH_CHECK_VALUE(bias == Bias::huber, "delta: a per-channel delta of shape ", d.sizes(),
                      " is only defined for bias 'huber'; norm-based biases take one delta per row, shape ",
                      row_shape);
    return DeltaLayout::per_channel;
  }
  TORCH_CHECK_VALUE(false, "delta: expected shape ", row_shape, " (one per row) or ", y.sizes(),
                    " (per channel, 'huber' only), got ", d.sizes());
}

}  // namespace

constexpr std::array<std::pair<std::string_view, Bias>, 8> kBiasNames{{
    {"dot", Bias::dot},
    {"l2", Bias::l2},
    {"lp", Bias::lp},
    {"l1", Bias::lp},
    {"huber", Bias::huber},
    {"huber_norm", Bias::huber_norm},
    {"yaad", Bias::yaad},
    {"value_shift", Bias::value_shift},
}};

Bias parse_bias(std::string_view name) {
  for (const auto& [known, bias] : kBiasNames) {
    if (known == name) return bias;
  }
  TORCH_CHECK_VALUE(false, "bias: unknown attentional bias '", name,
                    "'; expected one of dot, l2, lp, l1, huber, huber_norm, yaad, value_shift");
}

RowProblem check_bias_args(const at::Tensor& y, const at::Tensor& v, const std::optional<at::Tensor>& delta,
                           std::string_view bias_name, double p, double eps, const at::Tensor* grad) {
  const Bias bias = parse_bias(bias_name);
  TORCH_CHECK_VALUE(at::isFloatingType(y.scalar_type()),
                    "y: expected a floating dtype (float64, float32, bfloat16, float16), got ", y.scalar_type());
  TORCH_CHECK_VALUE(y.dim() >= 1, "y: expected shape [..., Dv] with at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(v.sizes() == y.sizes(), "v: expected shape ", y.sizes(), " (the shape of y), got ", v.sizes());
  check_like_y(v, "v", y);
  if (grad != nullptr) {
    TORCH_CHECK_VALUE(grad->sizes() == y.sizes(), "grad: expected shape ", y.sizes(), " (the shape of y), got ",
                      grad->sizes());
    check_like_y(*grad, "grad", y);
  }
  TORCH_CHECK_VALUE(eps > 0, "eps: expected eps > 0, got ", eps);
  if (bias == Bias::lp) {
    TORCH_CHECK_VALUE(bias_name == "l1" || p >= 1, "p: expected p >= 1 for bias 'lp', got ", p);
  }
  DeltaLayout layout = DeltaLayout::none;
  if (is_threshold_bias(bias)) {
    TORCH_CHECK_VALUE(delta.has_value(), "delta: bias '", bias_name,
                      "' needs a threshold delta of shape [...] (or [..., Dv] for 'huber'), got None");
    layout = check_delta(*delta, y, bias);
  }
  const int64_t dv = y.size(-1);
  return RowProblem{bias, layout, bias_name == "l1" ? 1.0 : p, eps, dv == 0 ? 0 : y.numel() / dv, dv};
}

BiasInputs prepare_bias_inputs(const at::Tensor& y, const at::Tensor& v, const std::optional<at::Tensor>& delta,
                               std::string_view bias, double p, double eps, const at::Tensor* grad) {
  const RowProblem pr = check_bias_args(y, v, delta, bias, p, eps, grad);
  return BiasInputs{pr, grad != nullptr ? grad->contiguous() : at::Tensor(), y.contiguous(), v.contiguous(),
                    pr.layout == DeltaLayout::none ? at::Tensor() : delta->contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_outputs(const BiasInputs& in,
                                                                const std::optional<at::Tensor>& delta) {
  at::Tensor gd = in.delta.defined() ? at::empty_like(in.delta)
                  : delta.has_value() ? at::zeros_like(*delta)
                                      : at::empty({0}, in.y.options());
  return {at::empty_like(in.y), at::empty_like(in.y), gd};
}

}  // namespace miras
