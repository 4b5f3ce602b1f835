// bias_grad CUDA kernels for __nv_bfloat16.
#define MIRAS_DTYPE __nv_bfloat16
#include "cuda/bias_grad_launch.inc"
