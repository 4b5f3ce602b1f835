// The chunk-level matrix products of the memory kernels, C[M][N] (+/-)= op(A)[M][K] op(B)[K][N] with
// op(X)[i][k] = trans ? x[k * ld + i] : x[i * ld + k], block-level (ends with a barrier). Inputs of 16-bit
// types multiply on tensor cores (tile_mma.cuh: operands rounded to bfloat16, float accumulation;
// split operands where a product must keep float precision); float and double inputs on CUDA cores in
// their own precision, so that float32 keeps float32 accuracy.
#pragma once

#include <type_traits>

#include "cuda/acc_types.cuh"
#include "cuda/memory/tile_mma.cuh"

namespace miras::cuda {

template <typename T>
constexpr bool kTensorCores = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;
// Operands go to the tensor cores as bfloat16 for float16 inputs too: they are state, activations and
// gradients, not the inputs themselves, and the gradients of the sharper biases (Yaad's curvature reaches
// delta / sqrt(eps)) pass float16's 65504 where float32's range holds them.
using MmaType = __nv_bfloat16;

// CUDA-core product in the accumulation type: 64 x 64 output tiles, K staged 16 at a time in shared memory,
// 4 x 4 outputs per thread (rows ty + 16 r, columns tx + 16 c, so that neither the shared-memory reads nor
// the stores to C conflict); loads of A and B follow their contiguous axis.
template <typename A>
__device__ void gemm_cuda_cores(const A* a, int lda, bool a_trans, const A* b, int ldb, bool b_trans, A* c, int ldc,
                                int M, int N, int K, bool accumulate, bool negate) {
  constexpr int BM = 64, BN = 64, BK = 16;
  __shared__ A sa[BK][BM + 1];
  __shared__ A sb[BK][BN + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int m0 = 0; m0 < M; m0 += BM) {
    for (int n0 = 0; n0 < N; n0 += BN) {
      A acc[4][4] = {};
      for (int k0 = 0; k0 < K; k0 += BK) {
        for (int e = threadIdx.x; e < BM * BK; e += blockDim.x) {
          const int i = a_trans ? e % BM : e / BK, k = a_trans ? e / BM : e % BK;
          const int gi = m0 + i, gk = k0 + k;
          A x = 0;
          if (gi < M && gk < K) x = a_trans ? a[int64_t(gk) * lda + gi] : a[int64_t(gi) * lda + gk];
          sa[k][i] = x;
        }
        for (int e = threadIdx.x; e < BN * BK; e += blockDim.x) {
          const int j = b_trans ? e / BK : e % BN, k = b_trans ? e % BK : e / BN;
          const int gj = n0 + j, gk = k0 + k;
          A x = 0;
          if (gj < N && gk < K) x = b_trans ? b[int64_t(gj) * ldb + gk] : b[int64_t(gk) * ldb + gj];
          sb[k][j] = x;
        }
        __syncthreads();
        for (int k = 0; k < BK; ++k) {
          A ar[4], br[4];
          for (int r = 0; r < 4; ++r) ar[r] = sa[k][ty + 16 * r];
          for (int q = 0; q < 4; ++q) br[q] = sb[k][tx + 16 * q];
          for (int r = 0; r < 4; ++r) {
            for (int q = 0; q < 4; ++q) acc[r][q] += ar[r] * br[q];
          }
        }
        __syncthreads();
      }
      for (int r = 0; r < 4; ++r) {
        for (int q = 0; q < 4; ++q) {
          const int i = m0 + ty + 16 * r, j = n0 + tx + 16 * q;
          if (i < M && j < N) {
            const A v = negate ? -acc[r][q] : acc[r][q];
            A* x = c + int64_t(i) * ldc + j;
            *x = accumulate ? *x + v : v;
          }
        }
      }
    }
  }
  __syncthreads();
}

// lo[...] = x - round_to_Half(x) for the rows x cols of x (row stride ld), stored compactly (row stride cols).
template <typename Half>
__device__ void split_low(const float* x, int ld, int rows, int cols, float* lo) {
  for (int p = threadIdx.x; p < rows * cols; p += blockDim.x) {
    const float v = x[int64_t(p / cols) * ld + p % cols];
    lo[p] = v - to_acc(from_acc<Half>(v));
  }
}

// `scratch` holds M * N + M * K + K * N values (the tensor-core paths use it). `exact` asks for the state's
// precision: 16-bit inputs then take three tensor-core products of split operands, x = hi + lo with hi and
// lo in bfloat16 (hi hi + hi lo + lo hi, the lo lo term below the float rounding of a sum), about 2^-16
// relative instead of 2^-8.
template <typename T, typename A>
__device__ void block_gemm(const A* a, int lda, bool a_trans, const A* b, int ldb, bool b_trans, A* c, int ldc, int M,
                           int N, int K, bool accumulate, bool negate, A* scratch, bool exact) {
  if constexpr (kTensorCores<T>) {
    if (!negate && !exact) {
      tile_gemm<MmaType>(a, lda, a_trans, b, ldb, b_trans, c, ldc, M, N, K, accumulate);
      return;
    }
    tile_gemm<MmaType>(a, lda, a_trans, b, ldb, b_trans, scratch, N, M, N, K, false);
    if (exact) {
      // The operands as stored: op(A) is [M][K] (a_trans: stored [K][M]), op(B) [K][N] (b_trans: [N][K]).
      float* lo_a = scratch + M * N;
      float* lo_b = lo_a + M * K;
      const int a_cols = a_trans ? M : K, b_cols = b_trans ? K : N;
      split_low<MmaType>(a, lda, a_trans ? K : M, a_cols, lo_a);
      split_low<MmaType>(b, ldb, b_trans ? N : K, b_cols, lo_b);
      __syncthreads();
      tile_gemm<MmaType>(a, lda, a_trans, lo_b, b_cols, b_trans, scratch, N, M, N, K, true);
      tile_gemm<MmaType>(lo_a, a_cols, a_trans, b, ldb, b_trans, scratch, N, M, N, K, true);
    }
    for (int p = threadIdx.x; p < M * N; p += blockDim.x) {
      A* x = c + int64_t(p / N) * ldc + p % N;
      *x = (accumulate ? *x : A(0)) + (negate ? -scratch[p] : scratch[p]);
    }
    __syncthreads();
  } else {
    (void)scratch;
    (void)exact;
    gemm_cuda_cores(a, lda, a_trans, b, ldb, b_trans, c, ldc, M, N, K, accumulate, negate);
  }
}

}  // namespace miras::cuda
