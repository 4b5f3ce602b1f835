// The one TORCH_LIBRARY block of the extension: operator schemas. Backends register in their own files.
#include <torch/library.h>

TORCH_LIBRARY(miras_ext, m) {
  m.def("bias_grad(Tensor y, Tensor v, Tensor? delta, str bias, float p, float eps) -> Tensor");
  m.def(
      "bias_grad_backward(Tensor grad, Tensor y, Tensor v, Tensor? delta, str bias, float p, float eps)"
      " -> (Tensor, Tensor, Tensor)");
  // The chunkwise memory update (docs/math.md, Section 5). `spec` is MemorySpec.encode(); states are one
  // tensor per weight tensor, [N, H, *shape]. Checkpoints hold memory, momentum and anchor at the start of
  // every run of tokens sharing an anchor, [S_max, H, *shape] each with S_max = (ceil(T / chunk) + N) *
  // (lag_token ? 2 : 1); the backward recomputes each run from them (memory O(T D + S_max |state|)).
  m.def(
      "memory_chunk_fwd(Tensor q, Tensor k, Tensor v, Tensor lr, Tensor? alpha, Tensor? momentum,"
      " Tensor? delta, Tensor[] memory, Tensor[] momentum_state, Tensor[] anchor, Tensor position,"
      " Tensor? cu_seqlens, str spec, float scale, int chunk_size, bool save_checkpoints)"
      " -> (Tensor, Tensor[], Tensor[], Tensor[], Tensor, Tensor[])");
  m.def(
      "memory_chunk_bwd(Tensor grad_o, Tensor[] grad_memory, Tensor[] grad_momentum, Tensor[] grad_anchor,"
      " Tensor q, Tensor k, Tensor v, Tensor lr, Tensor? alpha, Tensor? momentum, Tensor? delta,"
      " Tensor[] checkpoints, Tensor position, Tensor? cu_seqlens, str spec, float scale, int chunk_size)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor[], Tensor[], Tensor[])");
}
