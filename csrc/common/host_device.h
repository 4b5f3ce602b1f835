// MIRAS_HD marks a formula shared by host and device code: __host__ __device__ under nvcc, inline elsewhere
// (the CPU op and the CUDA emulator compile the same headers with a host compiler).
#pragma once

#if defined(__CUDACC__)
#define MIRAS_HD __host__ __device__ __forceinline__
#else
#define MIRAS_HD inline
#endif
