// bias_grad CUDA kernels for float.
#define MIRAS_DTYPE float
#include "cuda/bias_grad_launch.inc"
