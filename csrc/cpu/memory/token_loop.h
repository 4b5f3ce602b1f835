// The token recurrence of one weight tensor over a run, for the retention links and momentum (docs/math.md
// Eqs. 5.20-5.21, the CPU form of Eq. 9.6): Z_t (and S_t) by Eqs. 4.1-4.2 from the run's anchor factors
// (Eq. 5.3), and the read (Eq. 4.3) at W_t = phi(Z_t) (Eqs. 3.5-3.8), in plain loops over the state that
// never form an [n, |W|] tensor in the forward. The link's statistics (l_q's norm, KL's row normaliser)
// come from the same pass.
#pragma once

#include <ATen/ATen.h>

#include "common/memory_params.h"

namespace miras::chunk {

// One weight tensor [out, in] of G (sequence, head) pairs over a run of n tokens, contiguous, compute dtype.
struct LoopInputs {
  at::Tensor z0, s0;       // start memory and momentum [G, out, in]; s0 undefined for GD
  at::Tensor d, a;         // the run's gradient factors G_t = d_t a_t^T: [G, n, out], [G, n, in]
  at::Tensor h;            // read inputs [G, n, in]
  at::Tensor e, alpha, m;  // gates [G, n, Dg] (Dg = 1: per head); alpha undefined means 1, m undefined for GD
  int side = 0;            // the side a per-channel gate scales (Eq. 3.4): 0 rows, 1 columns
};

// u [G, n, out] = W_t h_t for every token, and the end state Z_n (S_n; undefined for GD).
struct LoopForward {
  at::Tensor u, z, s;
};
LoopForward token_loop_forward(const MemoryParams& p, const LoopInputs& in);

// Gradients of one weight tensor's run from du [G, n, out] (the read's upstream) and the end state's
// gradients gz, gs (undefined: zero). Gate gradients come in the gates' [G, n, Dg] layout.
struct LoopGrads {
  at::Tensor h, z0, s0, d, a, e, alpha, m;
};
LoopGrads token_loop_backward(const MemoryParams& p, const LoopInputs& in, const at::Tensor& du,
                              const at::Tensor& gz, const at::Tensor& gs);

}  // namespace miras::chunk
