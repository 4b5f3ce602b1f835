// bias_grad CUDA kernels for double.
#define MIRAS_DTYPE double
#include "cuda/bias_grad_launch.inc"
