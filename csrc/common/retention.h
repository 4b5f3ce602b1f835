// The retention gate (docs/math.md, Section 3), written once for the CPU op, the CUDA kernels and the
// emulator: the retentions, which of them read their state through a link W = phi(Z) (Eqs. 3.5-3.8; the
// others read W = Z, Eq. 3.1), and the link's constants and scalar formulas. The alpha decay of a chunk
// (Eq. 5.7) is the running product each backend forms from the gates.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace miras {

enum class Retention : int32_t { None, L2, Lq, Kl, ElasticNet, Sigmoid };

// Whether W = phi(Z) differs from Z (MemorySpec.linked).
MIRAS_HD bool has_link(Retention r) {
  return r == Retention::Lq || r == Retention::Kl || r == Retention::ElasticNet || r == Retention::Sigmoid;
}

// KL's scale c of one weight tensor (Eq. 3.6): the spec's simplex_scale, or sqrt(fan_in) when it is unset (< 0).
template <typename A>
MIRAS_HD A simplex_scale(double spec_scale, int64_t fan_in) {
  using std::sqrt;
  return spec_scale > 0 ? A(spec_scale) : sqrt(A(fan_in));
}

// l_q (Eq. 3.5): W = s Z with s = N^-gamma, gamma = (q - 2) / q and N = w sum |Z|^q + norm_floor over the
// tensor, where w = 1 (the paper's norm) or, with norm_mean, 1 / entries (the average: the bound on W then does
// not shrink as the tensor grows; docs/math.md Section 8, point 16). Its vector-Jacobian product (Eq. 9.3) is
// s G - coef <G, Z> |Z|^(q-2) Z with coef = gamma q w N^(-gamma-1).
template <typename A>
MIRAS_HD A lq_gamma(A q) {
  return (q - A(2)) / q;
}
template <typename A>
MIRAS_HD A lq_weight(bool norm_mean, int64_t entries) {
  return norm_mean ? A(1) / A(entries) : A(1);
}
template <typename A>
struct LqScale {
  A s, coef;
};
// From sum = sum |Z|^q, weight = lq_weight(..), floor = norm_floor.
template <typename A>
MIRAS_HD LqScale<A> lq_scale(A sum, A weight, A floor, A q) {
  using std::pow;
  const A norm = weight * sum + floor, gamma = lq_gamma(q), s = pow(norm, -gamma);
  return {s, gamma * q * weight * s / norm};
}

// Elastic net (Eq. 3.7): the soft threshold sign(z) max(|z| - shrinkage, 0); its derivative is 1 exactly
// where the result is nonzero.
template <typename A>
MIRAS_HD A soft_threshold(A z, A shrinkage) {
  const A m = (z < A(0) ? -z : z) - shrinkage;
  return m > A(0) ? (z > A(0) ? m : -m) : A(0);
}

}  // namespace miras
