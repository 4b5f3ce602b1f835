// The one TORCH_LIBRARY block of the extension: operator schemas. Backends register in their own files.
#include <torch/library.h>

TORCH_LIBRARY(miras_ext, m) {
  m.def("bias_grad(Tensor y, Tensor v, Tensor? delta, str bias, float p, float eps) -> Tensor");
  m.def(
      "bias_grad_backward(Tensor grad, Tensor y, Tensor v, Tensor? delta, str bias, float p, float eps)"
      " -> (Tensor, Tensor, Tensor)");
  // The chunkwise memory update (docs/math.md, Section 5). `spec` is MemorySpec.encode(); states are one
  // tensor per weight tensor, [N, H, *shape], in the compute dtype (float64 for float64 q, else float32);
  // o is in q's dtype. N = position.size(0): the batch, or the number of sequences with cu_seqlens.
  //
  // Checkpoints (empty unless save_checkpoints): memory[0..L), momentum[0..M), anchor[0..L) at the start of
  // every run of tokens sharing an anchor (after the anchor is refreshed where the run starts a chunk), one
  // tensor [S_max, H, *shape] each. A row holds one (run, sequence) pair: without cu_seqlens the batch shares
  // one schedule and run r of sequence n is row r * N + n, S_max = N * (ceil(T / chunk) + 1) * f; with
  // cu_seqlens sequence n's runs are consecutive rows after those of sequences 0..n-1,
  // S_max = (ceil(T / chunk) + 2 N) * f; f = 2 with lag_token and chunk > 1, else 1. Unused rows are zero.
  // S_max depends on shapes and options only (for register_fake). The backward recomputes each run from
  // its checkpoint (memory O(T D + S_max |state|)).
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
