// Memory CUDA kernels for float inputs (float accumulation).
#define MIRAS_DTYPE float
#define MIRAS_ACC float
#include "cuda/memory/memory_launch.inc"
