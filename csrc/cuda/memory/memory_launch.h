// Host entry points of the memory CUDA kernels (cuda/memory/memory_kernels.cuh): one explicit instantiation
// per input type T (with its accumulation type A) in memory_{f32,f64,f16,bf16}.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/memory/memory_args.h"

namespace miras::cuda {

// `blocks` blocks share args.items = N * H (sequence, head) pairs (pair p = sequence p / H, head p % H);
// args.work holds one workspace per block. Nothing is launched for zero blocks.
template <typename T, typename A>
void launch_memory_forward(const MemoryArgs<T, A>& args, int64_t blocks, cudaStream_t stream);

template <typename T, typename A>
void launch_memory_backward(const MemoryArgs<T, A>& args, int64_t blocks, cudaStream_t stream);

}  // namespace miras::cuda
