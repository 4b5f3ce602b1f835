// What the CUDA memory kernels read: the spec as plain fields, the pointers of one call, and the layout of
// each block's workspace. Torch-free, so that the CPU emulator's drivers fill the same structs as the host.
#pragma once

#include <cstdint>

#include "common/bias.h"
#include "common/retention.h"
#include "common/schedule.h"

namespace miras::cuda {

constexpr int kMaxLayers = 4;       // MLP layers the kernels take
constexpr int kMemoryThreads = 256;  // threads per block; a block runs one (sequence, head) pair at a time
constexpr int kMemoryWarps = kMemoryThreads / 32;

// MemoryParams (common/memory_params.h) resolved against the tensors' sizes.
struct KernelSpec {
  int32_t layers = 1;                   // 1 for matrix memory
  int32_t dims[kMaxLayers + 1] = {};    // layer l maps dims[l] -> dims[l + 1]; dims[0] = Dk, dims[layers] = Dv
  int32_t gelu = 1;                     // activation: GELU (1) or SiLU (0)
  int32_t residual = 0;                 // o = x + LN(u_L) (Eq. 1.4)
  double ln_eps = 1e-5;                 // that LayerNorm's epsilon
  Bias bias = Bias::l2;
  DeltaLayout delta_layout = DeltaLayout::none;
  double p = 2, eps = 1e-6;             // bias options
  Retention retention = Retention::L2;  // common/retention.h
  double norm_order = 4, norm_floor = 1e-12, shrinkage = 1e-3;
  int32_t norm_mean = 0;                // l_q's normaliser averages |Z|^q (common/retention.h lq_weight)
  double simplex_scale = -1;            // < 0: sqrt(fan_in) of each weight tensor
  int32_t has_alpha = 0;                // retention gate given (absent: alpha = 1)
  int32_t momentum = 0;                 // algorithm "momentum"
  int32_t per_channel = 0;              // gates [.., Dv] rather than one per head
  int32_t retained = 0;                 // grad_at_retained (Eq. 5.2)
  int32_t exact = 0;                    // the delta rule exactly: gradients at the previous state (Eq. 5.13)
  double scale = 1;                     // multiplies q (Eq. 4.3)

  MIRAS_HD int64_t size(int l) const { return int64_t(dims[l]) * dims[l + 1]; }
  MIRAS_HD int64_t state_size() const {
    int64_t s = 0;
    for (int l = 0; l < layers; ++l) s += size(l);
    return s;
  }
  MIRAS_HD int dg() const { return per_channel ? dims[layers] : 1; }
  // Side of weight l a per-channel gate scales (Eq. 3.4): 0 rows (outputs), 1 columns (inputs).
  MIRAS_HD int side(int l) const { return per_channel && l != layers - 1 ? 1 : 0; }
  MIRAS_HD int widest() const {
    int w = 0;
    for (int l = 0; l <= layers; ++l) w = dims[l] > w ? dims[l] : w;
    return w;
  }
};

// Offsets (in elements of the accumulation type) of one block's workspace; n = the longest run.
struct Workspace {
  int64_t wb;        // phi(anchor), [|W|] (only when the link is not the identity)
  int64_t acts;      // anchor pass, per token and layer: inputs [n, sum dims[l]], l < L
  int64_t pre;       // pre-activations [n, sum dims[l + 1]]
  int64_t deltas;    // Eq. 5.4 deltas [n, sum dims[l + 1]]
  int64_t back;      // deltas[l + 1] W_{l + 1} (Eq. 5.4), stored at the offset of layer l + 1's inputs [n, sum dims[l]]
  int64_t y, g;      // prediction and bias gradient [n, Dv]
  int64_t gates;     // lr, alpha, momentum and the running product of alpha A_t [4, n, Dg]
  int64_t rin, rpre; // read pass inputs / pre-activations [n, sum dims[l]] / [n, sum dims[l + 1]]
  int64_t vec;       // per-token scratch vectors [4, widest]
  int64_t rows;      // per-row link statistics [2, sum dims[l + 1]]
  int64_t dual;      // factored runs (Eq. 5.12), per layer: d~ [n, out], the read's u / A [n, out], a~ [n, in],
                     // the read's inputs (A-scaled on gated columns) [n, in], masked products [n, n]
  int64_t scratch;   // one product's output and its operands' low parts (block_gemm.cuh)
  // Backward only.
  int64_t states;    // Z_t (then S_t with momentum) after each token [n, |W|] (x2 with momentum)
  int64_t dwb;       // gradient of phi(anchor) [|W|]
  int64_t dd, dpre, tmp;  // gradients of deltas / of pre-activations, and scratch [n, sum dims[l + 1]] each
  int64_t da;        // gradients of layer inputs [n, sum dims[l]]
  int64_t dgates;    // gradients of lr, alpha, momentum and A_t [4, n, Dg]
  int64_t dual_bwd;  // factored runs: upstream, input gradient, dx, and the d~ / a~ / product gradients
                     // [6, n, widest] and [n, n]
  int64_t total;
};

MIRAS_HD Workspace workspace_layout(const KernelSpec& s, int64_t n, bool backward) {
  int64_t ins = 0, outs = 0;
  for (int l = 0; l < s.layers; ++l) {
    ins += s.dims[l];
    outs += s.dims[l + 1];
  }
  const int64_t W = s.state_size(), dv = s.dims[s.layers];
  Workspace w{};
  int64_t at = 0;
  auto take = [&](int64_t count) {
    const int64_t off = at;
    at += (count + 31) / 32 * 32;  // 128-byte aligned for float
    return off;
  };
  w.wb = take(has_link(s.retention) ? W : 0);
  w.acts = take(n * ins);
  w.pre = take(n * outs);
  w.deltas = take(n * outs);
  w.back = take(n * ins);
  w.y = take(n * dv);
  w.g = take(n * dv);
  w.gates = take(4 * n * s.dg());
  w.rin = take(n * ins);
  w.rpre = take(n * outs);
  w.vec = take(4 * int64_t(s.widest()));
  w.rows = take(2 * outs);
  w.dual = take(n * (2 * outs + 2 * ins) + int64_t(s.layers) * n * n);
  const int64_t wide = n * (n > s.widest() ? n : s.widest());
  // The exact delta rule's chunk products (n x n from [n, widest] operands) need n * widest more.
  w.scratch = take((wide > W ? wide : W) + wide + W + (s.exact ? n * s.widest() : 0));
  if (backward) {
    w.states = take(n * W * (s.momentum ? 2 : 1));
    w.dwb = take(W);
    w.dd = take(n * outs);
    w.dpre = take(n * outs);
    w.tmp = take(n * outs);
    w.da = take(n * ins);
    w.dgates = take(4 * n * s.dg());
    w.dual_bwd = take(6 * n * s.widest() + n * n);
  }
  w.total = at;
  return w;
}

// The pointers of one call. Tokens are [B, T, H, D] contiguous (q, k, v, o and their gradients in the input
// type T); gates [B, T, H, Dg] and delta [B, T, H] or [B, T, H, Dv] contiguous in the accumulation type A;
// states [N * H, *shape] contiguous in A, updated in place; checkpoints [S_max * H, *shape] in A.
template <typename T, typename A>
struct MemoryArgs {
  KernelSpec spec;
  int64_t T_len = 0, H = 0;
  const RunDesc* runs = nullptr;
  const int64_t* seq_begin = nullptr;  // [N + 1]
  const int64_t* batch = nullptr;      // [N]
  const T *q = nullptr, *k = nullptr, *v = nullptr;
  const A *lr = nullptr, *alpha = nullptr, *mom = nullptr, *delta = nullptr;
  A* memory[kMaxLayers] = {};
  A* momentum[kMaxLayers] = {};
  A* anchor[kMaxLayers] = {};
  A* ck_memory[kMaxLayers] = {};  // null: no checkpoints (forward); read by the backward
  A* ck_momentum[kMaxLayers] = {};
  A* ck_anchor[kMaxLayers] = {};
  int64_t items = 0;  // N * H (sequence, head) pairs; block b takes pairs b, b + gridDim.x, ...
  A* work = nullptr;  // [gridDim.x, workspace_layout(...).total]: one workspace per block, not per pair
  int64_t work_stride = 0;
  int64_t max_run = 0;  // Schedule::max_len, the n of workspace_layout
  // Forward output.
  T* o = nullptr;
  // Backward: inputs grad_o; outputs the token and gate gradients; memory/momentum/anchor hold the gradient of
  // the final state on entry and that of the initial state on exit.
  const T* grad_o = nullptr;
  T *dq = nullptr, *dk = nullptr, *dv = nullptr;
  A *dlr = nullptr, *dalpha = nullptr, *dmom = nullptr, *ddelta = nullptr;
};

}  // namespace miras::cuda
