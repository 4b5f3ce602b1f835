// parse_memory_spec: MemorySpec.encode() (python/miras_ext/spec.py) -> MemoryParams, with the same checks
// as MemorySpec.__post_init__ so that a hand-written spec string cannot reach the kernels unchecked.
#include "common/memory_params.h"

#include "common/bias_args.h"

#include <c10/util/Exception.h>

#include <array>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <string_view>
#include <utility>

namespace miras {
namespace {

// Every field of MemorySpec, in declaration order (the order encode() writes them).
constexpr std::array<std::string_view, 19> kFields{
    "memory",     "layers",        "expansion", "activation",       "residual_norm", "ln_eps",
    "bias",       "p",             "eps",       "retention",        "norm_order",    "norm_floor",
    "norm_mean",  "simplex_scale", "shrinkage", "grad_at_retained", "algorithm",     "lag_token",
    "minibatch"};

template <typename E, size_t K>
E choice(std::string_view field, std::string_view value, const std::array<std::pair<std::string_view, E>, K>& names) {
  for (const auto& [name, e] : names) {
    if (name == value) return e;
  }
  std::string allowed;
  for (const auto& [name, e] : names) {
    if (!allowed.empty()) allowed += ", ";
    allowed += name;
  }
  TORCH_CHECK_VALUE(false, "spec: ", field, ": expected one of ", allowed, ", got '", value, "'");
}

double number(std::string_view field, std::string_view value) {
  const std::string text(value);
  char* end = nullptr;
  errno = 0;
  const double x = std::strtod(text.c_str(), &end);
  TORCH_CHECK_VALUE(!text.empty() && end == text.c_str() + text.size() && errno != ERANGE,
                    "spec: ", field, ": expected a number, got '", value, "'");
  return x;
}

int64_t integer(std::string_view field, std::string_view value) {
  const std::string text(value);
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(text.c_str(), &end, 10);
  TORCH_CHECK_VALUE(!text.empty() && end == text.c_str() + text.size() && errno != ERANGE,
                    "spec: ", field, ": expected an integer, got '", value, "'");
  return x;
}

bool flag(std::string_view field, std::string_view value) {
  TORCH_CHECK_VALUE(value == "0" || value == "1", "spec: ", field, ": expected 0 or 1, got '", value, "'");
  return value == "1";
}

void set_field(MemoryParams& mp, std::string_view field, std::string_view value, bool& is_l1) {
  static constexpr std::array<std::pair<std::string_view, Memory>, 3> memories{
      {{"vector", Memory::Vector}, {"matrix", Memory::Matrix}, {"mlp", Memory::Mlp}}};
  static constexpr std::array<std::pair<std::string_view, Activation>, 2> activations{
      {{"gelu", Activation::Gelu}, {"silu", Activation::Silu}}};
  static constexpr std::array<std::pair<std::string_view, Retention>, 6> retentions{
      {{"none", Retention::None},
       {"l2", Retention::L2},
       {"lq", Retention::Lq},
       {"kl", Retention::Kl},
       {"elastic_net", Retention::ElasticNet},
       {"sigmoid", Retention::Sigmoid}}};
  static constexpr std::array<std::pair<std::string_view, Algorithm>, 2> algorithms{
      {{"gd", Algorithm::Gd}, {"momentum", Algorithm::Momentum}}};

  if (field == "memory") {
    mp.memory = choice(field, value, memories);
  } else if (field == "layers" || field == "expansion") {
    const int64_t n = integer(field, value);
    TORCH_CHECK_VALUE(n >= 1 && n <= (1 << 20), "spec: ", field, ": expected an integer >= 1, got ", n);
    (field == "layers" ? mp.layers : mp.expansion) = static_cast<int>(n);
  } else if (field == "activation") {
    mp.activation = choice(field, value, activations);
  } else if (field == "residual_norm") {
    mp.residual_norm = flag(field, value);
  } else if (field == "bias") {
    mp.bias = parse_bias(value);  // common/bias_args.h: the names bias_grad accepts
    is_l1 = value == "l1";
  } else if (field == "p") {
    mp.p = number(field, value);
    TORCH_CHECK_VALUE(mp.p >= 1.0 && std::isfinite(mp.p), "spec: p: the l_p bias needs a finite p >= 1, got ", mp.p);
  } else if (field == "eps" || field == "ln_eps" || field == "norm_floor") {
    double& x = field == "eps" ? mp.eps : field == "ln_eps" ? mp.ln_eps : mp.norm_floor;
    x = number(field, value);
    TORCH_CHECK_VALUE(x > 0 && std::isfinite(x), "spec: ", field, ": expected a finite number > 0, got ", x);
  } else if (field == "retention") {
    mp.retention = choice(field, value, retentions);
  } else if (field == "norm_order") {
    mp.norm_order = number(field, value);
    TORCH_CHECK_VALUE(mp.norm_order >= 1.0 && std::isfinite(mp.norm_order),
                      "spec: norm_order: the l_q retention needs a finite q >= 1, got ", mp.norm_order);
  } else if (field == "norm_mean") {
    mp.norm_mean = flag(field, value);
  } else if (field == "simplex_scale") {
    mp.simplex_scale = number(field, value);
    TORCH_CHECK_VALUE(mp.simplex_scale == -1.0 || (mp.simplex_scale > 0 && std::isfinite(mp.simplex_scale)),
                      "spec: simplex_scale: expected -1 (None) or a finite value > 0, got ", mp.simplex_scale);
  } else if (field == "shrinkage") {
    mp.shrinkage = number(field, value);
    TORCH_CHECK_VALUE(mp.shrinkage >= 0 && std::isfinite(mp.shrinkage),
                      "spec: shrinkage: expected a finite value >= 0, got ", mp.shrinkage);
  } else if (field == "grad_at_retained") {
    mp.grad_at_retained = flag(field, value);
  } else if (field == "algorithm") {
    mp.algorithm = choice(field, value, algorithms);
  } else if (field == "lag_token") {
    mp.lag_token = flag(field, value);
  } else if (field == "minibatch") {
    mp.minibatch = flag(field, value);
  }
}

}  // namespace

MemoryParams parse_memory_spec(const std::string& spec) {
  MemoryParams mp;
  std::array<bool, kFields.size()> seen{};
  bool is_l1 = false;
  std::string_view rest(spec);
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    TORCH_CHECK_VALUE(comma == std::string_view::npos || !rest.empty(), "spec: trailing ',' in '", spec, "'");
    const size_t eq = item.find('=');
    TORCH_CHECK_VALUE(eq != std::string_view::npos, "spec: expected name=value, got '", item, "' in '", spec, "'");
    const std::string_view field = item.substr(0, eq);
    size_t index = kFields.size();
    for (size_t i = 0; i < kFields.size(); ++i) {
      if (kFields[i] == field) index = i;
    }
    TORCH_CHECK_VALUE(index < kFields.size(), "spec: unknown field '", field, "' in '", spec, "'");
    TORCH_CHECK_VALUE(!seen[index], "spec: ", field, ": given twice in '", spec, "'");
    seen[index] = true;
    set_field(mp, field, item.substr(eq + 1), is_l1);
  }
  for (size_t i = 0; i < kFields.size(); ++i) {
    TORCH_CHECK_VALUE(seen[i], "spec: ", kFields[i], ": missing from '", spec, "' (expected MemorySpec.encode())");
  }
  if (is_l1) mp.p = 1.0;
  TORCH_CHECK_VALUE(!mp.grad_at_retained || (mp.retention == Retention::L2 && mp.memory != Memory::Mlp),
                    "spec: grad_at_retained: defined for the l2 retention of vector or matrix memory (Eq. 3.2)");
  return mp;
}

}  // namespace miras
