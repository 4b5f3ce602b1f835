// The host side of miras_ext::memory_chunk_fwd / memory_chunk_bwd (csrc/ops.cpp) that both backends share:
// the argument checks, the problem a call describes, the state and checkpoint layouts and the new positions.
// The CPU op (cpu/memory/memory_cpu.cpp) and the CUDA op (cuda/memory/memory_cuda.cpp) differ only in how
// they compute the runs of the chunk schedule (common/schedule.h).
//
// Devices: q, k, v, the gates, states, gradients and checkpoints must all be on q's device, which must be of
// the op's backend (CPU, or one CUDA device); position and cu_seqlens may also be CPU tensors (they are read
// to the host, a synchronisation for CUDA tensors).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/memory_params.h"

namespace miras {

using TensorVec = std::vector<at::Tensor>;

// What the ops return (csrc/ops.cpp): forward o, memory, momentum, anchor, new position, checkpoints; backward
// the gradients of q, k, v, lr, alpha, momentum, delta (empty [0] tensors for absent gates) and of the
// initial memory, momentum and anchor.
using FwdResult = std::tuple<at::Tensor, TensorVec, TensorVec, TensorVec, at::Tensor, TensorVec>;
using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             TensorVec, TensorVec, TensorVec>;

struct Problem {
  MemoryParams mp;
  int64_t B = 0, T = 0, H = 0, Dk = 0, Dv = 0, N = 0, chunk = 1;
  at::ScalarType in_dtype = at::kFloat, ct = at::kFloat;  // q's dtype; the compute dtype (float64 or float32)
  at::Device device = at::kCPU;                          // q's device
  std::vector<std::vector<int64_t>> shapes;  // per-head shape of each weight tensor
  bool varlen = false;
  std::vector<int64_t> cu;   // [N + 1] offsets (varlen), else empty
  std::vector<int64_t> pos;  // [N] positions
  int L() const { return static_cast<int>(shapes.size()); }
  int M() const { return mp.momentum() ? L() : 0; }
  std::vector<int64_t> state_shape(int l, int64_t lead0, int64_t lead1 = -1) const;
  at::TensorOptions options() const;  // compute dtype on q's device
};

// Per-head shape of each weight tensor (MemorySpec.weight_shapes).
std::vector<std::vector<int64_t>> weight_shapes(const MemoryParams& mp, int64_t dk, int64_t dv);

// Parses the spec and checks every argument of both ops but the states, gradients and checkpoints; `backend`
// is the device type of the op (CPU or CUDA).
Problem make_problem(c10::DeviceType backend, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& lr, const std::optional<at::Tensor>& alpha,
                     const std::optional<at::Tensor>& momentum, const std::optional<at::Tensor>& delta,
                     const at::Tensor& position, const std::optional<at::Tensor>& cu_seqlens, c10::string_view spec,
                     double scale, int64_t chunk_size);

// memory_chunk_fwd's memory, momentum_state and anchor lists: `count` tensors [N, H, *shape] in the compute
// dtype on q's device.
void check_states(const char* name, at::TensorList xs, int count, const Problem& P);

// [N, H, *shape] -> a new [N*H, *shape] tensor in the compute dtype (never aliasing the input), contiguous.
at::Tensor flat_state_copy(const at::Tensor& x, const Problem& P, int l);

// [N*H, *shape] -> [N, H, *shape], in place on the list.
void unflat_states(TensorVec& xs, const Problem& P);

// Checkpoint rows the runs of the call use (the rest of S_max stays zero).
int64_t used_checkpoint_rows(const Problem& P);

// Checkpoint list layout: memory[0..L), momentum[0..M), anchor[0..L), each flattened to [S_max*H, *shape].
struct Checkpoints {
  TensorVec memory, momentum, anchor;
};

// The forward's checkpoints: `out` receives the op's [S_max, H, *shape] tensors (rows from `used` on zero),
// the result their flattened views.
Checkpoints allocate_checkpoints(const Problem& P, int64_t used, TensorVec& out);

// The backward's checkpoint list, checked against the `used` rows of the call's schedule.
Checkpoints split_checkpoints(const Problem& P, at::TensorList ck, int64_t used);

// grad_o: the shape of o, on q's device.
void check_grad_o(const at::Tensor& grad_o, const Problem& P);

// The final-state gradient list, flattened to [N*H, *shape] in the compute dtype (a view where possible); an
// empty list or undefined entries give undefined tensors (zero).
TensorVec final_state_grads(const char* name, at::TensorList xs, int count, const Problem& P);

// position + the tokens of each sequence, on position's device.
at::Tensor advanced_position(const Problem& P, const at::Tensor& position);

}  // namespace miras
