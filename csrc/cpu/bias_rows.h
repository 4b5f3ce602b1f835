// Row loops of the attentional-bias formulas (common/bias.h) on the CPU: used by the bias_grad op and by
// the memory chunks, which call them from inside their own parallel region (where they run serially).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/bias.h"

namespace miras {

// Enough coordinates per task that thread start-up does not dominate short rows.
inline int64_t row_grain(int64_t dv) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(dv, 1)); }

template <typename scalar_t>
inline const scalar_t* in_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

template <typename acc_t, typename scalar_t>
acc_t delta_at(const RowProblem& pr, const scalar_t* delta, int64_t row, int64_t j) {
  return pr.layout == DeltaLayout::none ? acc_t(0) : acc_t(delta[delta_offset(pr.layout, row, j, pr.dv)]);
}

template <typename acc_t>
struct RowSums {
  acc_t sq = 0;  // sum of r^2
  acc_t ru = 0;  // sum of r u (backward only)
};

// The row sums the norm-based biases need (common/bias.h); zero for the others. u may be null.
template <typename acc_t, typename scalar_t>
RowSums<acc_t> row_sums(const RowProblem& pr, const scalar_t* y, const scalar_t* v, const scalar_t* u) {
  RowSums<acc_t> s;
  if (!needs_row_norm(pr.bias)) return s;
  for (int64_t j = 0; j < pr.dv; ++j) {
    const acc_t r = acc_t(y[j]) - acc_t(v[j]);
    s.sq += r * r;
    if (u != nullptr) s.ru += r * acc_t(u[j]);
  }
  return s;
}

template <typename scalar_t>
void forward_rows(const RowProblem& pr, const scalar_t* y, const scalar_t* v, const scalar_t* delta,
                  scalar_t* g) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto bp = params_of<acc_t>(pr);
  const int64_t dv = pr.dv;
  at::parallel_for(0, pr.rows, row_grain(dv), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * dv;
      const acc_t sq = row_sums<acc_t>(pr, y + base, v + base, static_cast<const scalar_t*>(nullptr)).sq;
      for (int64_t j = 0; j < dv; ++j) {
        const acc_t vj = v[base + j];
        const acc_t r = acc_t(y[base + j]) - vj;
        g[base + j] = scalar_t(output_grad(bp, r, vj, delta_at<acc_t>(pr, delta, row, j), sq));
      }
    }
  });
}

template <typename scalar_t>
void backward_rows(const RowProblem& pr, const scalar_t* u, const scalar_t* y, const scalar_t* v,
                   const scalar_t* delta, scalar_t* gy, scalar_t* gv, scalar_t* gd) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto bp = params_of<acc_t>(pr);
  const int64_t dv = pr.dv;
  at::parallel_for(0, pr.rows, row_grain(dv), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * dv;
      const auto [sq, ru] = row_sums<acc_t>(pr, y + base, v + base, u + base);
      acc_t row_delta_grad = 0;
      for (int64_t j = 0; j < dv; ++j) {
        const acc_t r = acc_t(y[base + j]) - acc_t(v[base + j]);
        const acc_t uj = u[base + j];
        const acc_t d = delta_at<acc_t>(pr, delta, row, j);
        const acc_t hu = hessian_times(bp, r, uj, d, sq, ru);
        gy[base + j] = scalar_t(pr.bias == Bias::dot ? acc_t(0) : hu);
        gv[base + j] = scalar_t(-hu);
        if (pr.layout == DeltaLayout::per_channel) {
          gd[base + j] = scalar_t(delta_grad_term(bp, r, uj, d, sq));
        } else if (pr.layout == DeltaLayout::per_row) {
          row_delta_grad += delta_grad_term(bp, r, uj, d, sq);
        }
      }
      if (pr.layout == DeltaLayout::per_row) gd[row] = scalar_t(row_delta_grad);
    }
  });
}

}  // namespace miras
