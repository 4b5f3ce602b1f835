// CUDA kernels of miras_ext::bias_grad and its backward: one warp per row, float or double accumulation.
// Launch code lives in the .cu files only, so that these kernels can also be run by a CPU emulator.
#pragma once

#include <cstdint>

#include "common/bias.h"
#include "cuda/acc_types.cuh"

namespace miras::cuda {

constexpr int kWarpsPerBlock = 4;

template <typename T>
__device__ __forceinline__ acc_of<T> delta_at(const RowProblem& pr, const T* delta, int64_t row, int64_t j) {
  return pr.layout == DeltaLayout::none ? acc_of<T>(0) : to_acc(delta[delta_offset(pr.layout, row, j, pr.dv)]);
}

template <typename T>
__global__ void bias_grad_kernel(RowProblem pr, const T* __restrict__ y, const T* __restrict__ v,
                                 const T* __restrict__ delta, T* __restrict__ g) {
  using A = acc_of<T>;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  // Whole warps leave together, so the shuffles below always see 32 lanes.
  if (row >= pr.rows) return;
  const int lane = threadIdx.x % kWarp;
  const auto bp = params_of<A>(pr);
  const int64_t base = row * pr.dv;
  A sq = 0;
  if (needs_row_norm(pr.bias)) {
    for (int64_t j = lane; j < pr.dv; j += kWarp) {
      const A r = to_acc(y[base + j]) - to_acc(v[base + j]);
      sq += r * r;
    }
    sq = warp_sum(sq);
  }
  for (int64_t j = lane; j < pr.dv; j += kWarp) {
    const A vj = to_acc(v[base + j]);
    const A r = to_acc(y[base + j]) - vj;
    g[base + j] = from_acc<T>(output_grad(bp, r, vj, delta_at(pr, delta, row, j), sq));
  }
}

template <typename T>
__global__ void bias_grad_backward_kernel(RowProblem pr, const T* __restrict__ u, const T* __restrict__ y,
                                          const T* __restrict__ v, const T* __restrict__ delta,
                                          T* __restrict__ gy, T* __restrict__ gv, T* __restrict__ gd) {
  using A = acc_of<T>;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= pr.rows) return;
  const int lane = threadIdx.x % kWarp;
  const auto bp = params_of<A>(pr);
  const int64_t base = row * pr.dv;
  A sq = 0;
  A ru = 0;
  if (needs_row_norm(pr.bias)) {
    for (int64_t j = lane; j < pr.dv; j += kWarp) {
      const A r = to_acc(y[base + j]) - to_acc(v[base + j]);
      sq += r * r;
      ru += r * to_acc(u[base + j]);
    }
    sq = warp_sum(sq);
    ru = warp_sum(ru);
  }
  A row_delta_grad = 0;
  for (int64_t j = lane; j < pr.dv; j += kWarp) {
    const A r = to_acc(y[base + j]) - to_acc(v[base + j]);
    const A uj = to_acc(u[base + j]);
    const A d = delta_at(pr, delta, row, j);
    const A hu = hessian_times(bp, r, uj, d, sq, ru);
    gy[base + j] = from_acc<T>(pr.bias == Bias::dot ? A(0) : hu);
    gv[base + j] = from_acc<T>(-hu);
    if (pr.layout == DeltaLayout::per_channel) {
      gd[base + j] = from_acc<T>(delta_grad_term(bp, r, uj, d, sq));
    } else if (pr.layout == DeltaLayout::per_row) {
      row_delta_grad += delta_grad_term(bp, r, uj, d, sq);
    }
  }
  if (pr.layout == DeltaLayout::per_row) {
    row_delta_grad = warp_sum(row_delta_grad);
    if (lane == 0) gd[row] = from_acc<T>(row_delta_grad);
  }
}

}  // namespace miras::cuda
