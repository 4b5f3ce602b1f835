// CPU emulation of CUDA kernels for tests (never a user path): include this instead of compiling with nvcc,
// then include the kernel headers (.cuh, no launch code) and launch with emu::launch. See
// docs/cuda-emulation.md.
//
// Order matters: the standard library first, then NVIDIA's host-safe headers (real dim3, float4, __half,
// __nv_bfloat16), then the qualifiers, which the NVIDIA headers already define as nothing outside nvcc
// except __shared__ (made thread_local: one object per block, see runtime.h), __noinline__ and
// __launch_bounds__.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is for host compilers; nvcc compiles the kernels natively"
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "runtime.h"
#include "device_api.h"
#include "wmma.h"

#define EMU_CUDA 1

#undef __shared__
#define __shared__ thread_local
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

#ifndef EMU_MAX_DYNAMIC_SHARED
#define EMU_MAX_DYNAMIC_SHARED (227 * 1024)
#endif

// Defines the storage of an `extern __shared__ TYPE NAME[];` array. Put it at namespace scope, in the namespace
// that encloses the kernel, before the kernel header, once per program:
//   namespace miras::cuda { EMU_DYNAMIC_SHARED(unsigned char, smem); }
// Every block starts with it filled with 0xFF bytes (NaN for float, double, __half and __nv_bfloat16).
// (The initializer is dynamic on purpose: g++ 12 then emits the TLS init function that the block-scope
// `extern __shared__` declaration of a kernel template calls; with a constant one it calls a null pointer.)
#define EMU_DYNAMIC_SHARED(TYPE, NAME)                                                                  \
  alignas(128) thread_local TYPE NAME[EMU_MAX_DYNAMIC_SHARED / sizeof(TYPE)] = {::emu::detail::dyn_init<TYPE>()}; \
  static ::emu::detail::DynSharedRegistrar emu_dyn_shared_registrar_##NAME{                              \
      []() -> void* { return static_cast<void*>(NAME); }, sizeof(TYPE) * (EMU_MAX_DYNAMIC_SHARED / sizeof(TYPE))}
