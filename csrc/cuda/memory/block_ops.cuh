// Block- and warp-level building blocks of the memory kernels: reductions, activations, and the row
// operations of one token (LayerNorm and its backwards, the attentional bias) done by one warp.
// Every block-level function is called by all threads of the block and ends with a barrier.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/bias.h"
#include "common/memory.h"
#include "cuda/acc_types.cuh"
#include "cuda/memory/memory_args.h"

namespace miras::cuda {

// The sum of x over the block, returned to every thread (fixed order: deterministic).
template <typename A>
__device__ A block_sum(A x) {
  __shared__ A part[kMemoryWarps];
  x = warp_sum(x);
  if (threadIdx.x % kWarp == 0) part[threadIdx.x / kWarp] = x;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < kMemoryWarps; ++w) total += part[w];
  __syncthreads();  // part is reused by the next call
  return total;
}

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const A o = __shfl_xor_sync(0xffffffffu, x, offset);
    x = o > x ? o : x;
  }
  return x;
}

// s(u), s'(u), s''(u) of GELU (exact, erf) or SiLU (Eq. 1.3; common/memory.h).
template <typename A>
__device__ __forceinline__ A sigmoid_of(A u) {
  using std::exp;
  return A(1) / (A(1) + exp(-u));
}
template <typename A>
__device__ __forceinline__ A act(bool gelu, A u) {
  using std::exp;
  if (gelu) return miras::gelu(u);
  return u / (A(1) + exp(-u));
}
template <typename A>
__device__ __forceinline__ A act_grad(bool gelu, A u) {
  return gelu ? miras::gelu_grad(u) : miras::silu_grad(u, sigmoid_of(u));
}
template <typename A>
__device__ __forceinline__ A act_grad2(bool gelu, A u) {
  return gelu ? miras::gelu_grad2(u) : miras::silu_grad2(u, sigmoid_of(u));
}

// ---------------------------------------------------------------------------------------------------------
// Row operations of one token, by one whole warp (lanes stride over the n entries).

template <typename A>
struct RowNorm {
  A mean, rstd;
};

template <typename A>
__device__ RowNorm<A> row_norm(const A* u, int n, A eps) {  // eps: MemorySpec.ln_eps (Eq. 1.4)
  using std::sqrt;
  const int lane = threadIdx.x % kWarp;
  A s = 0;
  for (int j = lane; j < n; j += kWarp) s += u[j];
  const A mean = warp_sum(s) / A(n);
  A v = 0;
  for (int j = lane; j < n; j += kWarp) v += (u[j] - mean) * (u[j] - mean);
  v = warp_sum(v) / A(n);
  return {mean, A(1) / sqrt(v + eps)};
}

// out = base + LN(u) (base may be null: out = LN(u)); out may alias base, not u.
template <typename A>
__device__ void row_layer_norm(const A* u, const A* base, A* out, int n, A eps) {
  const RowNorm<A> st = row_norm(u, n, eps);
  for (int j = threadIdx.x % kWarp; j < n; j += kWarp) out[j] = (base ? base[j] : A(0)) + (u[j] - st.mean) * st.rstd;
}

// out (+)= dLN(u)/du^T g (Eq. 5.5); out must not alias u or g.
template <typename A>
__device__ void row_layer_norm_backward(const A* u, const A* g, A* out, int n, A eps, bool accumulate) {
  const RowNorm<A> st = row_norm(u, n, eps);
  const int lane = threadIdx.x % kWarp;
  A sg = 0, sgx = 0;
  for (int j = lane; j < n; j += kWarp) {
    sg += g[j];
    sgx += g[j] * (u[j] - st.mean) * st.rstd;
  }
  const A mg = warp_sum(sg) / A(n), mgx = warp_sum(sgx) / A(n);
  for (int j = lane; j < n; j += kWarp) {
    const A r = layer_norm_vjp(st.rstd, g[j], mg, (u[j] - st.mean) * st.rstd, mgx);
    out[j] = accumulate ? out[j] + r : r;
  }
}

// The backward of f(u, g) = dLN(u)/du^T g for an upstream `grad` (Eq. 9.4): dg = f(u, grad) and du, both
// written (du accumulated).
template <typename A>
__device__ void row_layer_norm_double_backward(const A* u, const A* g, const A* grad, A* dg, A* du, int n,
                                               A eps) {
  const RowNorm<A> st = row_norm(u, n, eps);
  const int lane = threadIdx.x % kWarp;
  A s_g = 0, s_grad = 0, s_gx = 0, s_gradx = 0, s_gradg = 0;
  for (int j = lane; j < n; j += kWarp) {
    const A x = (u[j] - st.mean) * st.rstd;
    s_g += g[j];
    s_grad += grad[j];
    s_gx += g[j] * x;
    s_gradx += grad[j] * x;
    s_gradg += grad[j] * g[j];
  }
  const A nn = A(n);
  const A mg = warp_sum(s_g) / nn, mgrad = warp_sum(s_grad) / nn, m = warp_sum(s_gx) / nn;
  const A b = warp_sum(s_gradx);
  const A r = st.rstd;
  // a = <grad, g - mean g> = sum grad g - mean(g) sum grad.
  const A a_val = warp_sum(s_gradg) - mg * mgrad * nn;
  for (int j = lane; j < n; j += kWarp) {
    const A x = (u[j] - st.mean) * r;
    const A db = layer_norm_vjp(r, grad[j], mgrad, x, b / nn);
    const A lng = layer_norm_vjp(r, g[j], mg, x, m);
    dg[j] = db;
    du[j] += layer_norm_vjp_du(a_val, b, m, r, x, lng, db, nn);
  }
}

template <typename A>
__device__ __forceinline__ A delta_of(const A* d, DeltaLayout layout, int j) {
  return layout == DeltaLayout::none ? A(0) : d[layout == DeltaLayout::per_channel ? j : 0];
}

// g = dl/dy of the attentional bias for one token (Eqs. 2.9-2.16); d points at the token's delta.
template <typename A, typename V>
__device__ void row_bias_grad(const BiasParams<A>& bp, DeltaLayout layout, const A* y, const V* v, const A* d,
                              A* g, int n) {
  const int lane = threadIdx.x % kWarp;
  A sq = 0;
  if (needs_row_norm(bp.bias)) {
    for (int j = lane; j < n; j += kWarp) sq += (y[j] - to_acc(v[j])) * (y[j] - to_acc(v[j]));
    sq = warp_sum(sq);
  }
  for (int j = lane; j < n; j += kWarp) {
    const A vj = to_acc(v[j]);
    g[j] = output_grad(bp, y[j] - vj, vj, delta_of(d, layout, j), sq);
  }
}

// Backward of row_bias_grad for an upstream u (Eqs. 2.17-2.20): gy = H u (0 for "dot"), gv = -H u, and
// the delta gradient (gd null when there is no delta).
// gv is the value gradient in the inputs' type V.
template <typename A, typename V>
__device__ void row_bias_backward(const BiasParams<A>& bp, DeltaLayout layout, const A* u, const A* y, const V* v,
                                  const A* d, A* gy, V* gv, A* gd, int n) {
  const int lane = threadIdx.x % kWarp;
  A sq = 0, ru = 0;
  if (needs_row_norm(bp.bias)) {
    for (int j = lane; j < n; j += kWarp) {
      const A r = y[j] - to_acc(v[j]);
      sq += r * r;
      ru += r * u[j];
    }
    sq = warp_sum(sq);
    ru = warp_sum(ru);
  }
  A row_delta = 0;
  for (int j = lane; j < n; j += kWarp) {
    const A r = y[j] - to_acc(v[j]), dj = delta_of(d, layout, j);
    const A hu = hessian_times(bp, r, u[j], dj, sq, ru);
    gy[j] = bp.bias == Bias::dot ? A(0) : hu;
    gv[j] = from_acc<V>(-hu);
    if (layout == DeltaLayout::per_channel) gd[j] = delta_grad_term(bp, r, u[j], dj, sq);
    if (layout == DeltaLayout::per_row) row_delta += delta_grad_term(bp, r, u[j], dj, sq);
  }
  if (layout == DeltaLayout::per_row) {
    row_delta = warp_sum(row_delta);
    if (lane == 0) gd[0] = row_delta;
  }
}

}  // namespace miras::cuda
