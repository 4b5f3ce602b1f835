// bias_grad CUDA kernels for __half.
#define MIRAS_DTYPE __half
#include "cuda/bias_grad_launch.inc"
