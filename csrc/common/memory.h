// The memory architecture (docs/math.md, Section 1), written once for the CPU op and the CUDA kernels: the
// memories, the MLP's activation s and its derivatives (Eq. 1.3), and the residual LayerNorm's derivatives
// (Eqs. 1.4, 5.5, 9.4) from a row's statistics. Each formula takes X = a scalar of the compute type (the
// kernels, one entry at a time) or at::Tensor (the CPU op, whole tensors, row statistics broadcast over the
// last axis).
#pragma once

#include <cmath>
#include <type_traits>

#include "common/host_device.h"

namespace miras {

enum class Memory { Vector, Matrix, Mlp };
enum class Activation { Gelu, Silu };

// The type of a formula's constants: X itself for a scalar (a float kernel never computes in double),
// double for a tensor.
template <typename X>
using Constant = std::conditional_t<std::is_arithmetic_v<X>, X, double>;

// GELU, exact (erf): s(u) = u Phi(u), s' = Phi(u) + u phi(u), s'' = phi(u) (2 - u^2). The CPU op computes s
// itself with at::gelu, the same function.
template <typename X>
MIRAS_HD X gelu(const X& u) {
  using C = Constant<X>;
  using std::erf;
  return C(0.5) * u * (C(1) + erf(u * C(M_SQRT1_2)));
}
template <typename X>
MIRAS_HD X gelu_grad(const X& u) {
  using C = Constant<X>;
  using std::erf;
  using std::exp;
  return C(0.5) * (C(1) + erf(u * C(M_SQRT1_2))) + u * exp(C(-0.5) * u * u) * C(0.5 * M_2_SQRTPI * M_SQRT1_2);
}
template <typename X>
MIRAS_HD X gelu_grad2(const X& u) {
  using C = Constant<X>;
  using std::exp;
  return exp(C(-0.5) * u * u) * C(0.5 * M_2_SQRTPI * M_SQRT1_2) * (C(2) - u * u);
}

// SiLU s(u) = u sigma(u), from sig = sigma(u), which each backend computes its own way.
template <typename X>
MIRAS_HD X silu_grad(const X& u, const X& sig) {
  using C = Constant<X>;
  return sig * (C(1) + u * (C(1) - sig));
}
template <typename X>
MIRAS_HD X silu_grad2(const X& u, const X& sig) {
  using C = Constant<X>;
  return sig * (C(1) - sig) * (C(2) + u * (C(1) - C(2) * sig));
}

// LayerNorm of a row u of length n (Eq. 1.4): xhat = (u - mean) rstd, rstd = 1 / sqrt(var + ln_eps). Its
// vector-Jacobian product with g (Eq. 5.5), given mean(g) and mean(g xhat):
// dLN/du^T g = rstd (g - mean(g) - xhat mean(g xhat)).
template <typename X>
MIRAS_HD X layer_norm_vjp(const X& rstd, const X& g, const X& mean_g, const X& xhat, const X& mean_gx) {
  return rstd * (g - mean_g - xhat * mean_gx);
}
// The derivative in u of <grad, dLN/du^T g> (Eq. 9.4), with a = <grad, g - mean g>, b = <grad, xhat>,
// m = mean(g xhat), lng = dLN/du^T g and db = dLN/du^T grad.
template <typename X, typename N>
MIRAS_HD X layer_norm_vjp_du(const X& a, const X& b, const X& m, const X& rstd, const X& xhat, const X& lng,
                             const X& db, N n) {
  return -(a - m * b) * rstd * rstd * xhat / n - rstd * b * lng / n - rstd * m * db;
}

}  // namespace miras
