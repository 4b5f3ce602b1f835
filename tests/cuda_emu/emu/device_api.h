// CUDA device functions for the emulator: barriers, warp shuffles/votes/reductions/match, atomics, fences and
// the usual intrinsics. Synchronising calls take a defaulted std::source_location, so that deadlock and
// divergence reports say where each thread waits.
#pragma once

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <source_location>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "runtime.h"

namespace emu::detail {

template <typename T>
inline constexpr bool is_shuffle_type_v =
    std::is_arithmetic_v<T> || std::is_same_v<T, __half> || std::is_same_v<T, __half2> ||
    std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __nv_bfloat162>;

template <typename T>
std::uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  std::uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
T from_bits(std::uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// What a lane reads from a lane outside the mask: NaN for floating types (all bits set), else 0xBAD...
template <typename T>
std::uint64_t poison_bits() {
  if constexpr (std::is_integral_v<T>) return 0xBADBADBADBADBADBull;
  return ~std::uint64_t(0);
}

template <typename T>
T shuffle(Op op, unsigned mask, T var, int b, int width, const std::source_location& loc) {
  static_assert(is_shuffle_type_v<T>, "warp shuffles take arithmetic, __half(2) or __nv_bfloat16(2) values");
  Thread& t = warp_arrive(op, mask, to_bits(var), poison_bits<T>(), b, width, std::is_signed_v<T>, loc);
  return from_bits<T>(t.result);
}

inline std::mutex& atomic_mutex(const void* p) {
  static std::mutex mus[64];
  return mus[(reinterpret_cast<std::uintptr_t>(p) >> 4) % 64];
}

// Read-modify-write of any type: lock-free for integers and float/double, a striped lock for 16-bit floats.
template <typename T, typename F>
T atomic_rmw(T* addr, F f) {
  if constexpr (std::is_arithmetic_v<T>) {
    std::atomic_ref<T> a(*addr);
    T old = a.load();
    while (!a.compare_exchange_weak(old, f(old))) {
    }
    return old;
  } else {
    std::lock_guard<std::mutex> lock(atomic_mutex(addr));
    const T old = *addr;
    *addr = f(old);
    return old;
  }
}

}  // namespace emu::detail

// ---- Barriers -------------------------------------------------------------------------------------------
inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  emu::detail::barrier_arrive(0, loc);
}
inline int __syncthreads_count(int pred, std::source_location loc = std::source_location::current()) {
  return emu::detail::barrier_arrive(pred, loc);
}
inline int __syncthreads_and(int pred, std::source_location loc = std::source_location::current()) {
  const int count = emu::detail::barrier_arrive(pred, loc);
  return count == emu::detail::cur_thread->bar_participants;
}
inline int __syncthreads_or(int pred, std::source_location loc = std::source_location::current()) {
  return emu::detail::barrier_arrive(pred, loc) != 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location loc = std::source_location::current()) {
  emu::detail::warp_arrive(emu::detail::Op::syncwarp, mask, 0, 0, 0, 32, false, loc);
}

// A scheduling point: lets other threads of the block run (spin-waits must call it, as on the GPU).
inline void __nanosleep(unsigned) { emu::detail::yield_to_scheduler(); }

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Lanes of the calling warp that have not exited (the emulator does not track divergence inside a warp).
inline unsigned __activemask() {
  using namespace emu::detail;
  const Thread& t = *cur_thread;
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) {
    const Thread* o = lane_thread(*t.block, t.linear / 32, l);
    if (o && o->wait != Wait::exited) m |= 1u << l;
  }
  return m;
}

// ---- Warp shuffles (PTX shfl.sync semantics) ------------------------------------------------------------
template <typename T>
T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize,
              std::source_location loc = std::source_location::current()) {
  return emu::detail::shuffle(emu::detail::Op::shfl_idx, mask, var, srcLane, width, loc);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 std::source_location loc = std::source_location::current()) {
  return emu::detail::shuffle(emu::detail::Op::shfl_up, mask, var, int(delta), width, loc);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   std::source_location loc = std::source_location::current()) {
  return emu::detail::shuffle(emu::detail::Op::shfl_down, mask, var, int(delta), width, loc);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                  std::source_location loc = std::source_location::current()) {
  return emu::detail::shuffle(emu::detail::Op::shfl_bfly, mask, var, laneMask, width, loc);
}

// ---- Votes, reductions, match ---------------------------------------------------------------------------
inline unsigned __ballot_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return unsigned(emu::detail::warp_arrive(emu::detail::Op::ballot, mask, pred != 0, 0, 0, 32, false, loc).result);
}
inline int __any_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return int(emu::detail::warp_arrive(emu::detail::Op::any, mask, pred != 0, 0, 0, 32, false, loc).result);
}
inline int __all_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return int(emu::detail::warp_arrive(emu::detail::Op::all, mask, pred != 0, 0, 0, 32, false, loc).result);
}

#define EMU_REDUCE(NAME, OP)                                                                                   \
  inline unsigned NAME(unsigned mask, unsigned value, std::source_location loc = std::source_location::current()) { \
    return unsigned(emu::detail::warp_arrive(emu::detail::Op::OP, mask, value, 0, 0, 32, false, loc).result);      \
  }                                                                                                              \
  inline int NAME(unsigned mask, int value, std::source_location loc = std::source_location::current()) {          \
    return int(std::uint32_t(                                                                                    \
        emu::detail::warp_arrive(emu::detail::Op::OP, mask, std::uint32_t(value), 0, 0, 32, true, loc).result));  \
  }
EMU_REDUCE(__reduce_add_sync, reduce_add)
EMU_REDUCE(__reduce_min_sync, reduce_min)
EMU_REDUCE(__reduce_max_sync, reduce_max)
#undef EMU_REDUCE
inline unsigned __reduce_and_sync(unsigned mask, unsigned v, std::source_location loc = std::source_location::current()) {
  return unsigned(emu::detail::warp_arrive(emu::detail::Op::reduce_and, mask, v, 0, 0, 32, false, loc).result);
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v, std::source_location loc = std::source_location::current()) {
  return unsigned(emu::detail::warp_arrive(emu::detail::Op::reduce_or, mask, v, 0, 0, 32, false, loc).result);
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v, std::source_location loc = std::source_location::current()) {
  return unsigned(emu::detail::warp_arrive(emu::detail::Op::reduce_xor, mask, v, 0, 0, 32, false, loc).result);
}

template <typename T>
unsigned __match_any_sync(unsigned mask, T value, std::source_location loc = std::source_location::current()) {
  return unsigned(emu::detail::warp_arrive(emu::detail::Op::match_any, mask, emu::detail::to_bits(value), 0, 0, 32,
                                           false, loc).result);
}
template <typename T>
unsigned __match_all_sync(unsigned mask, T value, int* pred, std::source_location loc = std::source_location::current()) {
  auto& t = emu::detail::warp_arrive(emu::detail::Op::match_all, mask, emu::detail::to_bits(value), 0, 0, 32, false, loc);
  *pred = t.result_pred;
  return unsigned(t.result);
}

// ---- Atomics (global and shared memory alike) -----------------------------------------------------------
template <typename T>
T atomicAdd(T* a, T v) { return emu::detail::atomic_rmw(a, [v](T o) { return T(o + v); }); }
template <typename T>
T atomicSub(T* a, T v) { return emu::detail::atomic_rmw(a, [v](T o) { return T(o - v); }); }
template <typename T>
T atomicExch(T* a, T v) { return emu::detail::atomic_rmw(a, [v](T) { return v; }); }
template <typename T>
T atomicMin(T* a, T v) { return emu::detail::atomic_rmw(a, [v](T o) { return v < o ? v : o; }); }
template <typename T>
T atomicMax(T* a, T v) { return emu::detail::atomic_rmw(a, [v](T o) { return o < v ? v : o; }); }
template <typename T>
T atomicAnd(T* a, T v) { return emu::detail::atomic_rmw(a, [v](T o) { return T(o & v); }); }
template <typename T>
T atomicOr(T* a, T v) { return emu::detail::atomic_rmw(a, [v](T o) { return T(o | v); }); }
template <typename T>
T atomicXor(T* a, T v) { return emu::detail::atomic_rmw(a, [v](T o) { return T(o ^ v); }); }
inline unsigned atomicInc(unsigned* a, unsigned v) {
  return emu::detail::atomic_rmw(a, [v](unsigned o) { return o >= v ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* a, unsigned v) {
  return emu::detail::atomic_rmw(a, [v](unsigned o) { return (o == 0 || o > v) ? v : o - 1; });
}
template <typename T>
T atomicCAS(T* a, T compare, T v) {
  return emu::detail::atomic_rmw(a, [compare, v](T o) { return o == compare ? v : o; });
}

// ---- Intrinsics -----------------------------------------------------------------------------------------
template <typename T>
T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(unsigned(x)); }
inline int __clzll(long long x) { return std::countl_zero((unsigned long long)x); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(unsigned(x)) + 1; }
inline int __ffsll(long long x) { return x == 0 ? 0 : std::countr_zero((unsigned long long)x) + 1; }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((unsigned long long)a * b >> 32); }
inline int __mulhi(int a, int b) { return int((long long)a * b >> 32); }
