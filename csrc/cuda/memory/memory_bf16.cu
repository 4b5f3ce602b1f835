// Memory CUDA kernels for __nv_bfloat16 inputs (float accumulation).
#define MIRAS_DTYPE __nv_bfloat16
#define MIRAS_ACC float
#include "cuda/memory/memory_launch.inc"
