// Host entry points of the bias_grad CUDA kernels, one explicit instantiation per dtype (.cu file).
#pragma once

#include <cuda_runtime_api.h>

#include "common/bias.h"

namespace miras::cuda {

template <typename T>
void launch_bias_grad(const RowProblem& pr, const T* y, const T* v, const T* delta, T* g, cudaStream_t stream);

template <typename T>
void launch_bias_grad_backward(const RowProblem& pr, const T* u, const T* y, const T* v, const T* delta, T* gy,
                               T* gv, T* gd, cudaStream_t stream);

}  // namespace miras::cuda
