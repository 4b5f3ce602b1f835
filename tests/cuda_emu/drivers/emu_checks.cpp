// Kernels that show what the emulator catches, and a few that show it runs correct code correctly.
// Usage: emu_checks MODE SCHEDULE. Prints one "result: ..." line; emulator errors print "emu error: ...".
//   matmul_ok | matmul_no_sync_after_load | matmul_no_sync_after_use   tiled 48x48x48 matmul, max error
//   stencil_ok | stencil_no_sync                                      out[i] = x[i] - x[i-1] through static shared
//   stencil_dyn_no_sync                                               the same through dynamic shared (NaN poison)
//   dyn_template                                                      a namespaced kernel template with dynamic shared
//   divergent_barrier | barrier_vs_shuffle | exited_lane | bad_mask   misuse that must be reported, not hang
//   spin_wait                                                         a flag spin-wait with __nanosleep
//   atomics                                                           a histogram with atomicAdd over many blocks
#include "emu/cuda_emu.h"

EMU_DYNAMIC_SHARED(float, dyn_smem);
namespace miras::cuda { EMU_DYNAMIC_SHARED(unsigned char, smem); }

#include <cmath>
#include <string>
#include <vector>

constexpr int kTile = 16;

// C = A B, all n x n row-major, n a multiple of kTile; one thread per C entry.
template <int Variant>  // 0: correct, 1: no barrier after loading a tile, 2: no barrier before overwriting it
__global__ void tiled_matmul(const float* a, const float* b, float* c, int n) {
  __shared__ float as[kTile][kTile];
  __shared__ float bs[kTile][kTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int row = blockIdx.y * kTile + ty, col = blockIdx.x * kTile + tx;
  float acc = 0;
  for (int k0 = 0; k0 < n; k0 += kTile) {
    as[ty][tx] = a[row * n + k0 + tx];
    bs[ty][tx] = b[(k0 + ty) * n + col];
    if (Variant != 1) __syncthreads();
    for (int k = 0; k < kTile; ++k) acc += as[ty][k] * bs[k][tx];
    if (Variant != 2) __syncthreads();
  }
  c[row * n + col] = acc;
}

template <bool Sync>
__global__ void stencil(const float* x, float* out, int n) {
  __shared__ float s[256];
  const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  s[t] = x[i];
  if (Sync) __syncthreads();
  out[i] = t > 0 ? s[t] - s[t - 1] : s[t];
  (void)n;
}

__global__ void stencil_dyn(const float* x, float* out) {
  extern __shared__ float dyn_smem[];
  const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  dyn_smem[t] = x[i];
  out[i] = t > 0 ? dyn_smem[t] - dyn_smem[t - 1] : dyn_smem[t];
}

namespace miras::cuda {
// The layout the chunk kernels will use: a kernel template in a namespace, one byte array cast to T.
template <typename T>
__global__ void reverse_through_dyn_shared(const T* x, T* out) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* s = reinterpret_cast<T*>(smem);
  s[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}
}  // namespace miras::cuda

__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
    out[threadIdx.x] = 1;
  } else {
    out[threadIdx.x] = 2;
    __syncthreads();
  }
}

__global__ void barrier_vs_shuffle(float* out) {
  float x = float(threadIdx.x);
  if (threadIdx.x % 2 == 0) __syncthreads();  // a barrier inside a divergent branch
  x = __shfl_xor_sync(0xffffffffu, x, 1);
  out[threadIdx.x] = x;
}

__global__ void exited_lane(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, float(threadIdx.x), 1);
}

__global__ void bad_mask(float* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, float(threadIdx.x), 0);  // lanes 16-31 are not in their own mask
}

__global__ void spin_wait(volatile int* flag, float* out) {
  if (threadIdx.x == blockDim.x - 1) {
    out[0] = 42;
    __threadfence();
    *flag = 1;
  } else if (threadIdx.x == 0) {
    while (*flag == 0) __nanosleep(100);
    out[1] = out[0];
  }
}

__global__ void histogram(const int* x, int n, unsigned* bins, float* fsum) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    atomicAdd(&bins[x[i]], 1u);
    atomicAdd(fsum, 0.5f);
  }
}

namespace {

std::vector<float> random_vec(std::size_t n, unsigned seed) {
  std::vector<float> v(n);
  unsigned s = seed * 2654435761u + 1;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = float(s >> 8) / float(1 << 24) - 0.5f;
  }
  return v;
}

template <int V>
double run_matmul(const emu::Schedule& sched) {
  const int n = 48;
  const auto a = random_vec(n * n, 1), b = random_vec(n * n, 2);
  std::vector<float> c(n * n, NAN);
  emu::launch(emu::LaunchConfig{dim3(n / kTile, n / kTile), dim3(kTile, kTile), 0, sched}, &tiled_matmul<V>, a.data(),
              b.data(), c.data(), n);
  double err = 0;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double ref = 0;
      for (int k = 0; k < n; ++k) ref += double(a[i * n + k]) * b[k * n + j];
      const double e = std::abs(c[i * n + j] - ref);
      err = std::isnan(c[i * n + j]) ? INFINITY : std::max(err, e);
    }
  return err;
}

double stencil_error(const std::vector<float>& x, const std::vector<float>& out, int block) {
  double err = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double ref = i % block ? double(x[i]) - x[i - 1] : x[i];
    err = std::isnan(out[i]) ? INFINITY : std::max(err, std::abs(out[i] - ref));
  }
  return err;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: emu_checks MODE SCHEDULE\n");
    return 2;
  }
  const std::string mode = argv[1];
  const emu::Schedule sched = emu::parse_schedule(argv[2]);
  std::vector<float> out(256, 0.0f);
  auto cfg = [&](dim3 g, dim3 b, std::size_t sh = 0) { return emu::LaunchConfig{g, b, sh, sched}; };
  try {
    if (mode == "matmul_ok") std::printf("result: max_err=%g\n", run_matmul<0>(sched));
    else if (mode == "matmul_no_sync_after_load") std::printf("result: max_err=%g\n", run_matmul<1>(sched));
    else if (mode == "matmul_no_sync_after_use") std::printf("result: max_err=%g\n", run_matmul<2>(sched));
    else if (mode == "stencil_ok" || mode == "stencil_no_sync" || mode == "stencil_dyn_no_sync") {
      const int block = 64, blocks = 4;
      const auto x = random_vec(block * blocks, 3);
      std::vector<float> o(x.size(), NAN);
      if (mode == "stencil_ok") emu::launch(cfg(blocks, block), &stencil<true>, x.data(), o.data(), block * blocks);
      else if (mode == "stencil_no_sync") emu::launch(cfg(blocks, block), &stencil<false>, x.data(), o.data(), block * blocks);
      else emu::launch(cfg(blocks, block, block * sizeof(float)), &stencil_dyn, x.data(), o.data());
      std::printf("result: max_err=%g\n", stencil_error(x, o, block));
    } else if (mode == "dyn_template") {
      const auto x = random_vec(3 * 96, 5);
      std::vector<double> xd(x.begin(), x.end()), o(x.size(), NAN);
      emu::launch(cfg(3, 96, 96 * sizeof(double)), &miras::cuda::reverse_through_dyn_shared<double>, xd.data(), o.data());
      double err = 0;
      for (int i = 0; i < 3 * 96; ++i) err = std::max(err, std::abs(o[i] - xd[(i / 96) * 96 + 95 - i % 96]));
      std::printf("result: max_err=%g\n", std::isnan(err) ? INFINITY : err);
    } else if (mode == "divergent_barrier") emu::launch(cfg(1, 64), &divergent_barrier, out.data());
    else if (mode == "barrier_vs_shuffle") emu::launch(cfg(1, 64), &barrier_vs_shuffle, out.data());
    else if (mode == "exited_lane") emu::launch(cfg(1, 32), &exited_lane, out.data());
    else if (mode == "bad_mask") emu::launch(cfg(1, 32), &bad_mask, out.data());
    else if (mode == "spin_wait") {
      int flag = 0;
      emu::launch(cfg(1, 64), &spin_wait, &flag, out.data());
      std::printf("result: flag=%d out1=%g\n", flag, out[1]);
    } else if (mode == "atomics") {
      const int n = 20000;
      std::vector<int> x(n);
      std::vector<unsigned> ref(16, 0), bins(16, 0);
      for (int i = 0; i < n; ++i) ref[x[i] = (i * 7 + i / 3) % 16]++;
      float fsum = 0;
      emu::LaunchConfig c = cfg((n + 255) / 256, 256);
      c.workers = 2;  // blocks on two OS threads: the atomics must be real
      emu::launch(c, &histogram, x.data(), n, bins.data(), &fsum);
      std::printf("result: bins_match=%d fsum=%g\n", int(bins == ref), fsum);
    } else {
      std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
      return 2;
    }
  } catch (const emu::Error& e) {
    std::printf("emu error: %s\n", e.what());
  }
  return 0;
}
