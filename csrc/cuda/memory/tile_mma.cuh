// Block-level matrix products on tensor cores for the memory kernels (memory_kernels.cuh): the chunk products
// of a run of n <= 64 tokens against a weight W [out][in] (row-major float, in global memory) with operands
// in the float workspace, as
//
//   C[M][N] (+)= op(A)[M][K] op(B)[K][N],  op(A)[i][k] = a_trans ? a[k * lda + i] : a[i * lda + k],
//                                          op(B)[k][j] = b_trans ? b[j * ldb + k] : b[k * ldb + j],
//
// through nvcuda::wmma m16n16k16: the operands are rounded to Half (__half or __nv_bfloat16) while they are
// staged in shared memory, zero-padded to multiples of 16, and multiplied with float accumulation. So the
// result is exact up to float rounding *for the rounded operands*; against the float operands expect the
// rounding of Half (about 1e-3 relative for __half, 1e-2 for __nv_bfloat16, with its wider range).
//
// Called by all kMemoryThreads threads of the (1-D) block, like the other block-level functions; ends with
// __syncthreads. C must not overlap A or B. Any M, N, K >= 0 (no alignment needed: the loads from A and B are
// scalar and coalesced, the stores to C go through shared memory).
//
// One pass covers up to 16 output tiles of 16 x 16: 16 tm x 16 (16 / tm) entries with tm = min(4, ceil(M / 16))
// tile rows (64 x 64 for M > 48, 16 x 256 for M <= 16), two tiles per warp at most. K is staged 32 at a time
// (A chunk [16 tm][32], B chunk [32][16 tn], 16-bit); each warp keeps its tiles' accumulators over the whole K
// loop, then writes them out through a 16 x 16 float slab of its own. Shared memory: kTileSmemBytes (21.5 KiB,
// static, shared by all instantiations).
//
// Compiles with nvcc (<mma.h>, sm_70+ for __half, sm_80+ for __nv_bfloat16) and with the CPU emulator of
// tests/cuda_emu (emu/wmma.h: every lane holds the whole tile, and the warp-collective calls are checked).
#pragma once

#include <cstdint>

#include "cuda/acc_types.cuh"
#include "cuda/memory/memory_args.h"

#if defined(__CUDACC__)
#include <mma.h>
#else
#include "emu/wmma.h"  // tests/cuda_emu: the emulator's nvcuda::wmma
#endif

namespace miras::cuda {

constexpr int kTileMaxTiles = 2 * kMemoryWarps;  // 16 x 16 output tiles per pass, two per warp
constexpr int kTilesPerWarp = kTileMaxTiles / kMemoryWarps;
constexpr int kTileK = 32;    // K per staged chunk: two wmma k-steps
constexpr int kTilePad = 8;   // 16-bit elements after each staged row (ldm stays a multiple of 8, 32-byte tiles)
constexpr int kTileLdA = kTileK + kTilePad;
constexpr int kTileAElems = 4 * 16 * kTileLdA;                        // at most 4 tile rows
constexpr int kTileBElems = kTileK * (16 * kTileMaxTiles + kTilePad);  // at most 16 tile columns
constexpr int kTileStageBytes = 2 * (kTileAElems + kTileBElems);
constexpr int kTileSlabBytes = kMemoryWarps * 16 * 16 * int(sizeof(float));
constexpr int kTileSmemBytes = kTileStageBytes > kTileSlabBytes ? kTileStageBytes : kTileSlabBytes;
static_assert(kTileAElems * 2 % 32 == 0, "the B chunk must start 256-bit aligned");

// Which barriers tile_gemm takes: all of them, or (deliberately broken, for the emulator's tests only) not the
// __syncthreads between staging a chunk and the warps' loads of it, or not the __syncwarp between storing a
// tile to the warp's slab and reading it back.
enum class TileBarriers { all, skip_after_staging, skip_after_store };

// The staging buffers (16-bit A and B chunks) and, after the K loop, the warps' float output slabs.
__device__ __forceinline__ unsigned char* tile_smem() {
  __shared__ __align__(32) unsigned char smem[kTileSmemBytes];
  return smem;
}

__device__ __forceinline__ int tile_min(int a, int b) { return a < b ? a : b; }

// dst[r * ldd + c] = op(X)[row0 + r][col0 + c] rounded to Half for r < rows, c < cols, zero where row0 + r >=
// row_lim or col0 + c >= col_lim; op(X)[i][j] = trans ? x[j * ldx + i] : x[i * ldx + j]. Consecutive threads
// read consecutive addresses.
template <typename Half>
__device__ void tile_stage(Half* dst, int ldd, const float* x, int ldx, bool trans, int row0, int col0, int rows,
                           int cols, int row_lim, int col_lim) {
  const int fast = trans ? rows : cols;
  for (int e = threadIdx.x; e < rows * cols; e += kMemoryThreads) {
    const int f = e % fast, s = e / fast;
    const int r = trans ? f : s, c = trans ? s : f;
    const int i = row0 + r, j = col0 + c;
    float v = 0.0f;
    if (i < row_lim && j < col_lim) v = trans ? x[int64_t(j) * ldx + i] : x[int64_t(i) * ldx + j];
    dst[r * ldd + c] = from_acc<Half>(v);
  }
}

// C[M][N] (+)= op(A)[M][K] op(B)[K][N] (see the top of the file) for Half = __half or __nv_bfloat16.
template <typename Half, TileBarriers kBarriers = TileBarriers::all>
__device__ void tile_gemm(const float* a, int lda, bool a_trans, const float* b, int ldb, bool b_trans, float* c,
                          int ldc, int M, int N, int K, bool accumulate) {
  namespace wmma = nvcuda::wmma;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, Half, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, Half, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  if (M <= 0 || N <= 0) {
    __syncthreads();
    return;
  }
  unsigned char* smem = tile_smem();
  Half* sa = reinterpret_cast<Half*>(smem);
  Half* sb = sa + kTileAElems;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int tm = tile_min(4, (M + 15) / 16), tn = kTileMaxTiles / tm;
  for (int m0 = 0; m0 < M; m0 += 16 * tm) {
    for (int n0 = 0; n0 < N; n0 += 16 * tn) {
      const int tiles_m = tile_min(tm, (M - m0 + 15) / 16), tiles_n = tile_min(tn, (N - n0 + 15) / 16);
      const int tiles = tiles_m * tiles_n;
      const int ldb_s = 16 * tiles_n + kTilePad;
      FragC acc[kTilesPerWarp];
      for (int i = 0; i < kTilesPerWarp; ++i) wmma::fill_fragment(acc[i], 0.0f);
      for (int k0 = 0; k0 < K; k0 += kTileK) {
        const int ksteps = (tile_min(kTileK, K - k0) + 15) / 16;
        tile_stage(sa, kTileLdA, a, lda, a_trans, m0, k0, 16 * tiles_m, 16 * ksteps, M, K);
        tile_stage(sb, ldb_s, b, ldb, b_trans, k0, n0, 16 * ksteps, 16 * tiles_n, K, N);
        if constexpr (kBarriers != TileBarriers::skip_after_staging) __syncthreads();
        for (int i = 0; i < kTilesPerWarp; ++i) {
          const int t = warp + i * kMemoryWarps;  // the same in the whole warp
          if (t >= tiles) break;
          const Half* ta = sa + (t / tiles_n) * 16 * kTileLdA;
          const Half* tb = sb + (t % tiles_n) * 16;
          for (int kk = 0; kk < ksteps; ++kk) {
            FragA fa;
            FragB fb;
            wmma::load_matrix_sync(fa, ta + kk * 16, kTileLdA);
            wmma::load_matrix_sync(fb, tb + kk * 16 * ldb_s, ldb_s);
            wmma::mma_sync(acc[i], fa, fb, acc[i]);
          }
        }
        __syncthreads();  // the next chunk overwrites the staged one
      }
      // The slabs overlap the staging buffers: every warp is past its last load (the barrier above).
      float* slab = reinterpret_cast<float*>(smem) + warp * 16 * 16;
      for (int i = 0; i < kTilesPerWarp; ++i) {
        const int t = warp + i * kMemoryWarps;
        if (t >= tiles) break;
        wmma::store_matrix_sync(slab, acc[i], 16, wmma::mem_row_major);
        if constexpr (kBarriers != TileBarriers::skip_after_store) __syncwarp();  // lanes read others' entries
        const int r0 = m0 + (t / tiles_n) * 16, c0 = n0 + (t % tiles_n) * 16;
        for (int e = lane; e < 16 * 16; e += kWarp) {
          const int r = r0 + e / 16, col = c0 + e % 16;
          if (r < M && col < N) {
            float& o = c[int64_t(r) * ldc + col];
            o = accumulate ? o + slab[e] : slab[e];
          }
        }
        __syncwarp();  // the slab is rewritten by the warp's next tile
      }
      __syncthreads();  // the next pass stages over the slabs; the last one ends the function
    }
  }
}

}  // namespace miras::cuda
