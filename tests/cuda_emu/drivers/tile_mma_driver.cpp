// The emulator's nvcuda::wmma (emu/wmma.h) and the tensor-core products of csrc/cuda/memory/tile_mma.cuh.
// Usage: tile_mma_driver MODE SCHEDULE. Emulator errors print "emu error: ...".
//   wmma          load / mma / store of m16n16k16, m32n8k16, m8n32k16 in every layout, __half and
//                 __nv_bfloat16, two warps, against float sums in k order on the host (bitwise); prints
//                 "summary: N checks, F failures"
//   products      tile_gemm as rows (X W^T), cols (D W) and outer (P^T Q) products for n in {1, 5, 16, 37, 64} and
//                 out, in in {3, 17, 64, 100}, __half and __nv_bfloat16, against a double-precision reference on
//                 the same rounded operands; one line per failing case, then "summary: N cases, F failures,
//                 max_err=E max_err_unrounded_half=H max_err_unrounded_bf16=B" (errors relative to the largest
//                 reference entry; "unrounded": against the float operands, i.e. the cost of the rounding)
//   no_staging_barrier | no_store_syncwarp   tile_gemm without the __syncthreads between staging and the
//                 loads, or without the __syncwarp between storing a tile and reading it back, on three rows
//                 products; prints "result: max_err=E"
//   divergent_fragment | divergent_store | missing_lane | exited_lane | mixed_ops | foreign_syncwarp |
//   misaligned | bad_ldm | different_args   misuse of wmma that the emulator must report
#include "emu/cuda_emu.h"

#include "cuda/memory/tile_mma.cuh"

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace wmma = nvcuda::wmma;
using miras::cuda::TileBarriers;

namespace {

// Deterministic values in [-scale, scale).
std::vector<float> random_vec(std::size_t n, unsigned seed, float scale = 1.0f) {
  std::vector<float> v(n);
  unsigned s = seed * 2654435761u + 12345u;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = scale * (2.0f * float(s >> 8) / float(1 << 24) - 1.0f);
  }
  return v;
}

template <typename T>
T to_half(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

template <typename T>
float rounded(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__float2half_rn(x));
  } else {
    return __bfloat162float(__float2bfloat16_rn(x));
  }
}

// n elements starting at a 256-bit boundary (wmma's requirement for its pointers).
template <typename T>
struct Aligned {
  std::vector<T> storage;
  T* data;
  explicit Aligned(std::size_t n) : storage(n + 32 / sizeof(T)) {
    const auto p = reinterpret_cast<std::uintptr_t>(storage.data());
    data = storage.data() + (32 - p % 32) % 32 / sizeof(T);
  }
};

template <typename T>
const char* type_name() {
  return std::is_same_v<T, __half> ? "half" : "bf16";
}

}  // namespace

// ---- wmma itself ----------------------------------------------------------------------------------------

// Warp w multiplies problem w: D = A B + C, then D = A B + D (d aliasing c).
template <typename T, int M, int N, int K, typename LA, typename LB>
__global__ void wmma_kernel(const T* a, const T* b, const float* c, float* d, int ld16, int ld32, int stride,
                            int c_col, int d_col) {
  const int w = threadIdx.x / 32;
  wmma::fragment<wmma::matrix_a, M, N, K, T, LA> fa;
  wmma::fragment<wmma::matrix_b, M, N, K, T, LB> fb;
  wmma::fragment<wmma::accumulator, M, N, K, float> fc, fd;
  wmma::load_matrix_sync(fa, a + w * stride, ld16);
  wmma::load_matrix_sync(fb, b + w * stride, ld16);
  wmma::load_matrix_sync(fc, c + w * stride, ld32, c_col ? wmma::mem_col_major : wmma::mem_row_major);
  wmma::mma_sync(fd, fa, fb, fc);
  wmma::mma_sync(fd, fa, fb, fd);
  wmma::store_matrix_sync(d + w * stride, fd, ld32, d_col ? wmma::mem_col_major : wmma::mem_row_major);
}

// Element (i, j) of a matrix stored row- or column-major with leading dimension ld.
inline std::size_t at(int i, int j, int ld, bool col) { return col ? std::size_t(j) * ld + i : std::size_t(i) * ld + j; }

template <typename T, int M, int N, int K, typename LA, typename LB>
long check_wmma(const emu::Schedule& sched, long& checks) {
  constexpr bool a_col = std::is_same_v<LA, wmma::col_major>, b_col = std::is_same_v<LB, wmma::col_major>;
  const int ld16 = 40, ld32 = 36, stride = 40 * 40, warps = 2;  // ld: multiples of 16 bytes, larger than 32
  long failures = 0;
  for (int c_col = 0; c_col < 2; ++c_col) {
    for (int d_col = 0; d_col < 2; ++d_col) {
      const auto af = random_vec(std::size_t(stride) * warps, 1 + c_col, 2.0f);
      const auto bf = random_vec(std::size_t(stride) * warps, 3 + d_col, 2.0f);
      const auto cf = random_vec(std::size_t(stride) * warps, 5);
      Aligned<T> a(af.size()), b(bf.size());
      Aligned<float> c(cf.size()), d(cf.size());
      for (std::size_t i = 0; i < af.size(); ++i) {
        a.data[i] = to_half<T>(af[i]);
        b.data[i] = to_half<T>(bf[i]);
        c.data[i] = cf[i];
        d.data[i] = 777.0f;
      }
      emu::launch(emu::LaunchConfig{1, 32 * warps, 0, sched}, &wmma_kernel<T, M, N, K, LA, LB>, a.data, b.data,
                  c.data, d.data, ld16, ld32, stride, c_col, d_col);
      for (int w = 0; w < warps; ++w) {
        const std::size_t o = std::size_t(w) * stride;
        std::vector<bool> written(std::size_t(stride), false);
        for (int i = 0; i < M; ++i) {
          for (int j = 0; j < N; ++j) {
            float s = cf[o + at(i, j, ld32, c_col)];
            for (int rep = 0; rep < 2; ++rep) {
              for (int k = 0; k < K; ++k) {
                s += rounded<T>(af[o + at(i, k, ld16, a_col)]) * rounded<T>(bf[o + at(k, j, ld16, b_col)]);
              }
            }
            const std::size_t p = at(i, j, ld32, d_col);
            written[p] = true;
            ++checks;
            if (std::memcmp(&d.data[o + p], &s, sizeof s) != 0) {
              if (++failures <= 5) {
                std::printf("FAIL wmma %s m%dn%dk%d a_%s b_%s c_%s d_%s warp %d (%d,%d): %.9g vs %.9g\n", type_name<T>(),
                            M, N, K, a_col ? "col" : "row", b_col ? "col" : "row", c_col ? "col" : "row",
                            d_col ? "col" : "row", w, i, j, d.data[o + p], s);
              }
            }
          }
        }
        for (int p = 0; p < stride; ++p) {  // nothing else written
          ++checks;
          if (!written[std::size_t(p)] && d.data[o + std::size_t(p)] != 777.0f && ++failures <= 5) {
            std::printf("FAIL wmma %s m%dn%dk%d: entry %d outside the tile written\n", type_name<T>(), M, N, K, p);
          }
        }
      }
    }
  }
  return failures;
}

template <typename T>
long check_wmma_all(const emu::Schedule& sched, long& checks) {
  using R = wmma::row_major;
  using C = wmma::col_major;
  return check_wmma<T, 16, 16, 16, R, R>(sched, checks) + check_wmma<T, 16, 16, 16, R, C>(sched, checks) +
         check_wmma<T, 16, 16, 16, C, R>(sched, checks) + check_wmma<T, 16, 16, 16, C, C>(sched, checks) +
         check_wmma<T, 32, 8, 16, R, C>(sched, checks) + check_wmma<T, 8, 32, 16, C, R>(sched, checks);
}

// ---- the block-level products of tile_mma.cuh -----------------------------------------------------------

enum Variant { kRows, kCols, kOuter };
const char* const kVariantNames[] = {"rows", "cols", "outer"};

// rows: y[n][out] (+)= x[n][in] w^T; cols: y[n][in] (+)= x[n][out] w; outer: y[out][in] += x[n][out]^T q[n][in].
struct Problem {
  int variant, n, out, in;
  const float* w;
  const float* x;
  int ldx;
  const float* q;
  int ldq;
  float* y;
  int ldy;
  bool accumulate;
};

// The three shapes of product the memory kernels take, for W [out][in] row-major and n token rows ld apart:
// rows U[n][out] (+)= X[n][in] W^T, cols R[n][in] (+)= D[n][out] W, outer dW[out][in] += P[n][out]^T Q[n][in].
template <typename Half>
__global__ void product_kernel(Problem p) {
  using miras::cuda::tile_gemm;
  if (p.variant == kRows) {
    tile_gemm<Half>(p.x, p.ldx, false, p.w, p.in, true, p.y, p.ldy, p.n, p.out, p.in, p.accumulate);
  } else if (p.variant == kCols) {
    tile_gemm<Half>(p.x, p.ldx, false, p.w, p.in, false, p.y, p.ldy, p.n, p.in, p.out, p.accumulate);
  } else {
    tile_gemm<Half>(p.x, p.ldx, true, p.q, p.ldq, false, p.y, p.in, p.out, p.in, p.n, true);
  }
}

// The rows product with a barrier left out.
template <typename Half, TileBarriers kBarriers>
__global__ void rows_product_broken(Problem p) {
  miras::cuda::tile_gemm<Half, kBarriers>(p.x, p.ldx, false, p.w, p.in, true, p.y, p.ldy, p.n, p.out, p.in,
                                          p.accumulate);
}

struct ProductResult {
  double err = 0;            // against the rounded operands
  double err_unrounded = 0;  // against the float operands
  long untouched_changed = 0;  // entries outside the output written
};

constexpr float kGuard = 12345.0f;

// Runs one product (operands with row strides wider than the rows, at odd offsets) and compares it with double
// sums over the rounded and the float operands. kernel == nullptr: product_kernel<Half>.
template <typename Half>
ProductResult run_product(int variant, int n, int out, int in, const emu::Schedule& sched,
                          void (*kernel)(Problem) = nullptr) {
  const int ins = in + 3, outs = out + 5, off = 1;  // workspace rows are wider; pointers need no alignment
  const bool rows = variant == kRows, cols = variant == kCols;
  const int ldx = rows ? ins : outs;  // x: [n][in] (rows), [n][out] (cols, outer)
  const int y_rows = variant == kOuter ? out : n, y_cols = rows ? out : in;
  const int ldy = variant == kOuter ? in : (rows ? outs : ins);
  const auto w = random_vec(std::size_t(out) * in, unsigned(7 * n + out + 3 * in + variant));
  auto xbuf = random_vec(std::size_t(off + n * ldx), unsigned(11 * n + out + in));
  const auto qbuf = random_vec(std::size_t(off + n * ins), unsigned(13 * n + out + in + 1));
  const bool accumulate = variant != kRows;
  std::vector<float> ybuf(std::size_t(2 * off + y_rows * ldy), kGuard);
  const auto y0 = random_vec(ybuf.size(), unsigned(17 * n + out + in));
  for (int i = 0; i < y_rows; ++i) {
    for (int j = 0; j < y_cols; ++j) {
      ybuf[std::size_t(off + i * ldy + j)] = accumulate ? y0[std::size_t(off + i * ldy + j)] : NAN;
    }
  }
  const std::vector<float> yinit = ybuf;
  Problem p{variant, n, out, in, w.data(), xbuf.data() + off, ldx, qbuf.data() + off, ins, ybuf.data() + off, ldy,
            accumulate};
  emu::launch(emu::LaunchConfig{1, miras::cuda::kMemoryThreads, 0, sched}, kernel ? kernel : &product_kernel<Half>, p);
  auto xat = [&](int t, int i) { return xbuf[std::size_t(off + t * ldx + i)]; };
  auto qat = [&](int t, int j) { return qbuf[std::size_t(off + t * ins + j)]; };
  auto wat = [&](int i, int j) { return w[std::size_t(i) * in + j]; };
  ProductResult res;
  double scale = 0, scale_unrounded = 0;
  std::vector<double> ref(std::size_t(y_rows) * y_cols), ref_unrounded(ref.size());
  for (int i = 0; i < y_rows; ++i) {
    for (int j = 0; j < y_cols; ++j) {
      double s = accumulate ? yinit[std::size_t(off + i * ldy + j)] : 0.0, su = s;
      const int K = rows ? in : (cols ? out : n);
      for (int k = 0; k < K; ++k) {
        // (a, b) of the product term k, as floats
        const float a = rows ? xat(i, k) : (cols ? xat(i, k) : xat(k, i));
        const float b = rows ? wat(j, k) : (cols ? wat(k, j) : qat(k, j));
        s += double(rounded<Half>(a)) * rounded<Half>(b);
        su += double(a) * b;
      }
      ref[std::size_t(i) * y_cols + j] = s;
      ref_unrounded[std::size_t(i) * y_cols + j] = su;
      scale = std::max(scale, std::abs(s));
      scale_unrounded = std::max(scale_unrounded, std::abs(su));
    }
  }
  for (int i = 0; i < y_rows; ++i) {
    for (int j = 0; j < y_cols; ++j) {
      const double v = ybuf[std::size_t(off + i * ldy + j)];
      const double e = std::abs(v - ref[std::size_t(i) * y_cols + j]) / std::max(scale, 1e-30);
      const double eu = std::abs(v - ref_unrounded[std::size_t(i) * y_cols + j]) / std::max(scale_unrounded, 1e-30);
      res.err = std::isnan(v) ? INFINITY : std::max(res.err, e);
      res.err_unrounded = std::isnan(v) ? INFINITY : std::max(res.err_unrounded, eu);
    }
  }
  for (std::size_t e = 0; e < ybuf.size(); ++e) {
    const long i = (long(e) - off) / ldy, j = (long(e) - off) % ldy;
    const bool inside = long(e) >= off && i < y_rows && j < y_cols;
    if (!inside && std::memcmp(&ybuf[e], &yinit[e], sizeof(float)) != 0) ++res.untouched_changed;
  }
  return res;
}

template <typename Half>
void check_products(const emu::Schedule& sched, int& cases, int& failures, double& max_err, double& max_unrounded) {
  const int ns[] = {1, 5, 16, 37, 64};
  const int dims[] = {3, 17, 64, 100};
  for (int variant = kRows; variant <= kOuter; ++variant) {
    for (int n : ns) {
      for (int out : dims) {
        for (int in : dims) {
          const ProductResult r = run_product<Half>(variant, n, out, in, sched);
          ++cases;
          max_err = std::max(max_err, r.err);
          max_unrounded = std::max(max_unrounded, r.err_unrounded);
          if (!(r.err < 2e-6) || r.untouched_changed) {
            ++failures;
            std::printf("FAIL %s %s n=%d out=%d in=%d: err=%g (unrounded %g), %ld entries outside the output changed\n",
                        kVariantNames[variant], type_name<Half>(), n, out, in, r.err, r.err_unrounded,
                        r.untouched_changed);
          }
        }
      }
    }
  }
}

// ---- misuse ---------------------------------------------------------------------------------------------

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Misuse kernels: one warp, a (16 x 16 __half, ld 16), c (16 x 16 float, ld 16), 256-bit aligned.
__global__ void misuse_kernel(int mode, const __half* a, float* c) {
  const int lane = threadIdx.x % 32;
  FragA fa;
  FragB fb;
  FragC acc;
  wmma::fill_fragment(acc, 0.0f);
  switch (mode) {
    case 0:  // divergent_fragment: one lane's accumulator differs
      wmma::fill_fragment(acc, lane == 7 ? 1.0f : 0.0f);
      wmma::load_matrix_sync(fa, a, 16);
      wmma::load_matrix_sync(fb, a, 16);
      wmma::mma_sync(acc, fa, fb, acc);
      break;
    case 1:  // divergent_store: an element-wise update that depends on the lane
      acc.x[5] += float(lane == 3);
      wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
      break;
    case 2:  // missing_lane: lane 5 skips the mma and waits at a barrier
      wmma::load_matrix_sync(fa, a, 16);
      wmma::load_matrix_sync(fb, a, 16);
      if (lane != 5) wmma::mma_sync(acc, fa, fb, acc);
      __syncthreads();
      break;
    case 3:  // exited_lane
      if (lane == 5) return;
      wmma::load_matrix_sync(fa, a, 16);
      break;
    case 4:  // mixed_ops: half the warp loads, the other half multiplies
      if (lane < 16) {
        wmma::load_matrix_sync(fa, a, 16);
      } else {
        wmma::mma_sync(acc, fa, fb, acc);
      }
      break;
    case 5:  // foreign_syncwarp: half the warp multiplies, the other half meets it in a __syncwarp
      wmma::load_matrix_sync(fa, a, 16);
      wmma::load_matrix_sync(fb, a, 16);
      if (lane < 16) {
        wmma::mma_sync(acc, fa, fb, acc);
      } else {
        __syncwarp();
      }
      break;
    case 6:  // misaligned: 16 bytes past a 256-bit boundary
      wmma::load_matrix_sync(fa, a + 8, 16);
      break;
    case 7:  // bad_ldm: 20 halves = 40 bytes
      wmma::load_matrix_sync(fa, a, 20);
      break;
    default:  // different_args: two pointers in one warp
      wmma::load_matrix_sync(fa, a + (lane / 16) * 16, 16);
      break;
  }
  if (lane == 0) c[0] = acc.x[0];
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: tile_mma_driver MODE SCHEDULE\n");
    return 2;
  }
  const std::string mode = argv[1];
  const emu::Schedule sched = emu::parse_schedule(argv[2]);
  const char* const misuse[] = {"divergent_fragment", "divergent_store", "missing_lane", "exited_lane",
                                "mixed_ops",          "foreign_syncwarp", "misaligned",  "bad_ldm",
                                "different_args"};
  try {
    if (mode == "wmma") {
      long checks = 0;
      const long failures = check_wmma_all<__half>(sched, checks) + check_wmma_all<__nv_bfloat16>(sched, checks);
      std::printf("summary: %ld checks, %ld failures\n", checks, failures);
    } else if (mode == "products") {
      int cases = 0, failures = 0;
      double max_err = 0, unrounded_half = 0, unrounded_bf16 = 0;
      check_products<__half>(sched, cases, failures, max_err, unrounded_half);
      check_products<__nv_bfloat16>(sched, cases, failures, max_err, unrounded_bf16);
      std::printf("summary: %d cases, %d failures, max_err=%g max_err_unrounded_half=%g max_err_unrounded_bf16=%g\n",
                  cases, failures, max_err, unrounded_half, unrounded_bf16);
    } else if (mode == "no_staging_barrier" || mode == "no_store_syncwarp") {
      const auto kernel = mode == "no_staging_barrier" ? &rows_product_broken<__half, TileBarriers::skip_after_staging>
                                                       : &rows_product_broken<__half, TileBarriers::skip_after_store>;
      double err = 0;
      for (const int n : {5, 37, 64}) err = std::max(err, run_product<__half>(kRows, n, 100, 64, sched, kernel).err);
      std::printf("result: max_err=%g\n", err);
    } else {
      int m = 0;
      while (m < int(std::size(misuse)) && mode != misuse[m]) ++m;
      if (m == int(std::size(misuse))) {
        std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
        return 2;
      }
      alignas(32) static __half a[16 * 40];
      alignas(32) static float c[16 * 16];
      for (int i = 0; i < 16 * 40; ++i) a[i] = __float2half_rn(float(i % 7) - 3.0f);
      emu::launch(emu::LaunchConfig{1, 32, 0, sched}, &misuse_kernel, m, static_cast<const __half*>(a), c);
      std::printf("result: no error\n");
    }
  } catch (const emu::Error& e) {
    std::printf("emu error: %s\n", e.what());
  }
  return 0;
}
