// The retention link W = phi(Z) of one weight tensor Z [out, in] (docs/math.md Eqs. 3.1, 3.5-3.8) and its
// vector-Jacobian product (Eq. 9.3), evaluated element by element from a few statistics of Z, so that no
// kernel stores W: l_q needs the tensor's norm, KL each row's max and normaliser.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/memory/block_ops.cuh"
#include "cuda/memory/memory_args.h"

namespace miras::cuda {


template <typename A>
struct LinkStats {
  A s = 1, coef = 0;  // l_q: s = T^-gamma, coef = gamma q T^(-gamma - 1), T = sum |Z|^q + eps
  A c = 1;            // KL: the simplex scale
  const A* rowmax = nullptr;  // KL: per row max and 1 / sum exp(z - max), [out] each
  const A* rowinv = nullptr;
};

// Statistics of Z for phi; `rows` [2 * out] holds KL's row statistics. Block-level.
template <typename A>
__device__ LinkStats<A> link_stats(const KernelSpec& sp, const A* z, int out, int in, A* rows) {
  using std::exp;
  using std::pow;
  using std::sqrt;
  LinkStats<A> st;
  if (sp.retention == Retention::Lq) {
    const A q = A(sp.norm_order);
    A part = 0;
    for (int64_t e = threadIdx.x; e < int64_t(out) * in; e += blockDim.x) part += pow(std::abs(z[e]), q);
    const LqScale<A> scale =
        lq_scale(block_sum(part), lq_weight<A>(sp.norm_mean != 0, int64_t(out) * in), A(sp.norm_floor), q);
    st.s = scale.s;
    st.coef = scale.coef;
  } else if (sp.retention == Retention::Kl) {
    st.c = simplex_scale<A>(sp.simplex_scale, in);
    const int lane = threadIdx.x % kWarp;
    for (int i = threadIdx.x / kWarp; i < out; i += kMemoryWarps) {
      const A* row = z + int64_t(i) * in;
      A m = -INFINITY;
      for (int j = lane; j < in; j += kWarp) m = row[j] > m ? row[j] : m;
      m = warp_max(m);
      A s = 0;
      for (int j = lane; j < in; j += kWarp) s += exp(row[j] - m);
      s = warp_sum(s);
      if (lane == 0) {
        rows[i] = m;
        rows[out + i] = A(1) / s;
      }
    }
    st.rowmax = rows;
    st.rowinv = rows + out;
    __syncthreads();
  }
  return st;
}

// phi(Z)_ij from z = Z_ij.
template <typename A>
__device__ __forceinline__ A phi(const KernelSpec& sp, const LinkStats<A>& st, A z, int i) {
  using std::exp;
  switch (sp.retention) {
    case Retention::None:
    case Retention::L2:
      return z;
    case Retention::Lq:
      return z * st.s;
    case Retention::Kl:
      return st.c * exp(z - st.rowmax[i]) * st.rowinv[i];
    case Retention::ElasticNet:
      return soft_threshold(z, A(sp.shrinkage));
    case Retention::Sigmoid:
      return A(1) / (A(1) + exp(-z));
  }
  return z;
}

// dZ += (dphi/dZ)^T G for G_ij = grad(i, j). Block-level.
template <typename A, typename Grad>
__device__ void link_backward_add(const KernelSpec& sp, const LinkStats<A>& st, const A* z, int out, int in,
                                  Grad grad, A* dz) {
  using std::exp;
  using std::pow;
  const int64_t size = int64_t(out) * in;
  if (sp.retention == Retention::Kl) {
    const int lane = threadIdx.x % kWarp;
    for (int i = threadIdx.x / kWarp; i < out; i += kMemoryWarps) {
      const A* row = z + int64_t(i) * in;
      A inner = 0;  // sum_k G_ik s_ik
      for (int j = lane; j < in; j += kWarp) inner += grad(i, j) * exp(row[j] - st.rowmax[i]) * st.rowinv[i];
      inner = warp_sum(inner);
      for (int j = lane; j < in; j += kWarp) {
        const A s = exp(row[j] - st.rowmax[i]) * st.rowinv[i];
        dz[int64_t(i) * in + j] += st.c * s * (grad(i, j) - inner);
      }
    }
    __syncthreads();
    return;
  }
  A inner = 0;
  if (sp.retention == Retention::Lq) {
    for (int64_t e = threadIdx.x; e < size; e += blockDim.x) inner += grad(int(e / in), int(e % in)) * z[e];
    inner = block_sum(inner);
  }
  for (int64_t e = threadIdx.x; e < size; e += blockDim.x) {
    const int i = int(e / in), j = int(e % in);
    const A g = grad(i, j), x = z[e];
    switch (sp.retention) {
      case Retention::None:
      case Retention::L2:
        dz[e] += g;
        break;
      case Retention::Lq:
        dz[e] += g * st.s - st.coef * inner * pow(std::abs(x), A(sp.norm_order) - A(2)) * x;
        break;
      case Retention::ElasticNet:
        dz[e] += std::abs(x) > A(sp.shrinkage) ? g : A(0);
        break;
      case Retention::Sigmoid: {
        const A s = A(1) / (A(1) + exp(-x));
        dz[e] += g * s * (A(1) - s);
        break;
      }
      case Retention::Kl:
        break;
    }
  }
  __syncthreads();
}

}  // namespace miras::cuda
