// One run of tokens that share an anchor (docs/math.md, Section 5): forward and explicit backward, for a
// group of G independent (sequence, head) pairs processed together with ATen ops on one thread.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/memory_params.h"

namespace miras {

// Inputs of a run of n tokens, in the compute dtype (float32 or float64): views into the op's flattened
// inputs (a group's rows strided by T). The delta run reads them in place; the general run copies them
// contiguous first (chunk::contiguous_inputs).
struct ChunkInputs {
  at::Tensor q, k, v;                  // [G, n, Dk], [G, n, Dk], [G, n, Dv]; q not yet scaled
  at::Tensor lr, alpha, momentum, delta;  // [G, n] or [G, n, Dv]; undefined when the spec has no such gate
};

// Memory, momentum and anchor, one tensor per weight tensor, each [G, *shape]; momentum empty for GD.
struct ChunkState {
  std::vector<at::Tensor> memory, momentum, anchor;
};

// Runs n tokens from `state` (the anchor already refreshed by the caller where the run starts a chunk,
// Eq. 5.6) and leaves the end state in `state`, whose tensors the caller owns: a run may update them in
// place. Returns o [G, n, Dv].
at::Tensor chunk_forward(const MemoryParams& params, const ChunkInputs& in, ChunkState& state);

// Gradients of one run. `start` is the state chunk_forward started from; grad_o [G, n, Dv]; grad_end the
// gradient of the end state (undefined tensors mean zero). Gates absent from `in` get undefined grads.
struct ChunkGrads {
  at::Tensor q, k, v, lr, alpha, momentum, delta;
  ChunkState state;  // gradient of the start state (memory, momentum, anchor)
};
ChunkGrads chunk_backward(const MemoryParams& params, const ChunkInputs& in, const ChunkState& start,
                          const at::Tensor& grad_o, const ChunkState& grad_end);

}  // namespace miras
