// Memory CUDA kernels for __half inputs (float accumulation).
#define MIRAS_DTYPE __half
#define MIRAS_ACC float
#include "cuda/memory/memory_launch.inc"
