// The attentional-bias formulas (docs/math.md, Section 2), written once for the CPU and CUDA code.
//
// Every bias is evaluated row by row. A row first accumulates the sums it needs (sum r^2 and, in the
// backward, sum r u), then each coordinate is computed from its own values plus those row sums.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace miras {

// l1 is lp with p = 1, so it has no code of its own.
enum class Bias : int32_t { dot, l2, lp, huber, huber_norm, yaad, value_shift };

// How delta is laid out: absent, one per row, or one per coordinate ("huber" only).
enum class DeltaLayout : int32_t { none, per_row, per_channel };

// A batch of rows, each Dv long, all tensors contiguous.
struct RowProblem {
  Bias bias;
  DeltaLayout layout;
  double p;
  double eps;
  int64_t rows;
  int64_t dv;
};

MIRAS_HD int64_t delta_offset(DeltaLayout layout, int64_t row, int64_t j, int64_t dv) {
  return layout == DeltaLayout::per_channel ? row * dv + j : row;
}

template <typename T>
struct BiasParams {
  Bias bias;
  T p;
  T eps;
};

template <typename T>
MIRAS_HD BiasParams<T> params_of(const RowProblem& pr) {
  return {pr.bias, T(pr.p), T(pr.eps)};
}

// Norm-based biases branch on, or scale by, the squared residual norm of the row.
MIRAS_HD bool needs_row_norm(Bias b) {
  return b == Bias::huber_norm || b == Bias::yaad || b == Bias::value_shift;
}

// The inside branch includes equality, as in the reference.
template <typename T>
MIRAS_HD bool inside_norm(T sq, T d) {
  return sq <= d * d;
}

template <typename T>
MIRAS_HD T tiny_floor(T sq) {
  // Mirrors the reference's clamp_min(finfo.tiny): r = 0 outside the threshold is only reachable with
  // delta < 0, and must not divide by zero.
  constexpr T tiny = sizeof(T) == 4 ? T(1.17549435e-38) : T(2.2250738585072014e-308);
  return sq < tiny ? tiny : sq;
}

// g = dl/dy for one coordinate; sq = sum of r^2 over the row (only read by norm-based biases).
template <typename T>
MIRAS_HD T output_grad(const BiasParams<T>& bp, T r, T v, T d, T sq) {
  using std::pow;
  using std::sqrt;
  switch (bp.bias) {
    case Bias::dot:
      return -v;
    case Bias::l2:
      return r;
    case Bias::lp:
      return r * pow(r * r + bp.eps, bp.p / T(2) - T(1));
    case Bias::huber:
      return r > d ? d : (r < -d ? -d : r);
    case Bias::huber_norm:
      return inside_norm(sq, d) ? r : d * r / sqrt(tiny_floor(sq));
    case Bias::yaad:
      return inside_norm(sq, d) ? r : d * r / sqrt(r * r + bp.eps);
    case Bias::value_shift:
      return r + d * r / sqrt(sq + bp.eps);
  }
  return T(0);
}

// (H u)_j with H = dg/dr. ru = sum of r u over the row (only read by huber_norm and value_shift).
// For "dot" g does not depend on y; callers use this value only for dl/dv, where H acts as I.
template <typename T>
MIRAS_HD T hessian_times(const BiasParams<T>& bp, T r, T u, T d, T sq, T ru) {
  using std::pow;
  using std::sqrt;
  switch (bp.bias) {
    case Bias::dot:
    case Bias::l2:
      return u;
    case Bias::lp: {
      const T rr = r * r;
      return pow(rr + bp.eps, bp.p / T(2) - T(2)) * ((bp.p - T(1)) * rr + bp.eps) * u;
    }
    case Bias::huber:
      return (r <= d && r >= -d) ? u : T(0);
    case Bias::huber_norm: {
      if (inside_norm(sq, d)) return u;
      const T sq_f = tiny_floor(sq);
      const T n = sqrt(sq_f);
      return (d / n) * (u - r * ru / sq_f);
    }
    case Bias::yaad: {
      if (inside_norm(sq, d)) return u;
      const T q = r * r + bp.eps;
      return d * bp.eps / (q * sqrt(q)) * u;
    }
    case Bias::value_shift: {
      const T s2 = sq + bp.eps;
      const T s = sqrt(s2);
      return u + d * (u / s - r * ru / (s2 * s));
    }
  }
  return T(0);
}

// u_j * dg_j/ddelta: the coordinate's share of dl/ddelta (summed over the row when delta is per row).
template <typename T>
MIRAS_HD T delta_grad_term(const BiasParams<T>& bp, T r, T u, T d, T sq) {
  using std::sqrt;
  switch (bp.bias) {
    case Bias::huber:
      return r > d ? u : (r < -d ? -u : T(0));
    case Bias::huber_norm:
      return inside_norm(sq, d) ? T(0) : u * r / sqrt(tiny_floor(sq));
    case Bias::yaad:
      return inside_norm(sq, d) ? T(0) : u * r / sqrt(r * r + bp.eps);
    case Bias::value_shift:
      return u * r / sqrt(sq + bp.eps);
    default:
      return T(0);
  }
}

}  // namespace miras
