// Memory CUDA kernels for double inputs (double accumulation).
#define MIRAS_DTYPE double
#define MIRAS_ACC double
#include "cuda/memory/memory_launch.inc"
