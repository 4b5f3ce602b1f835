// The chunk-level matrix products of the memory kernels, C[M][N] (+/-)= op(A)[M][K] op(B)[K][N] with
// op(X)[i][k] = trans ? x[k * ld + i] : x[i * ld + k], block-level (ends with a barrier). Inputs of 16-bit
// types multiply on tensor cores (tile_mma.cuh: operands rounded to the input type, float accumulation);
// float and double inputs on CUDA cores in their own precision, so that float32 keeps float32 accuracy.
#pragma once

#include <type_traits>

#include "cuda/acc_types.cuh"
#include "cuda/memory/tile_mma.cuh"

namespace miras::cuda {

template <typename T>
constexpr bool kTensorCores = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// `scratch` holds M * N values; only the tensor-core path with `negate` uses it. `exact` keeps a product of
// 16-bit inputs on CUDA cores too.
template <typename T, typename A>
__device__ void block_gemm(const A* a, int lda, bool a_trans, const A* b, int ldb, bool b_trans, A* c, int ldc, int M,
                           int N, int K, bool accumulate, bool negate, A* scratch, bool exact) {
  if constexpr (kTensorCores<T>) {
    if (exact) {
      block_gemm<float, A>(a, lda, a_trans, b, ldb, b_trans, c, ldc, M, N, K, accumulate, negate, scratch, true);
      return;
    }
    if (!negate) {
      tile_gemm<T>(a, lda, a_trans, b, ldb, b_trans, c, ldc, M, N, K, accumulate);
      return;
    }
    tile_gemm<T>(a, lda, a_trans, b, ldb, b_trans, scratch, N, M, N, K, false);
    for (int p = threadIdx.x; p < M * N; p += blockDim.x) {
      A* x = c + int64_t(p / N) * ldc + p % N;
      *x = (accumulate ? *x : A(0)) - scratch[p];
    }
    __syncthreads();
  } else {
    (void)scratch;
    for (int p = threadIdx.x; p < M * N; p += blockDim.x) {
      const int i = p / N, j = p % N;
      A s = 0;
      for (int k = 0; k < K; ++k) {
        const A x = a_trans ? a[int64_t(k) * lda + i] : a[int64_t(i) * lda + k];
        const A y = b_trans ? b[int64_t(j) * ldb + k] : b[int64_t(k) * ldb + j];
        s += x * y;
      }
      if (negate) s = -s;
      A* x = c + int64_t(i) * ldc + j;
      *x = accumulate ? *x + s : s;
    }
    __syncthreads();
  }
}

}  // namespace miras::cuda
