// Building blocks of a chunk run (docs/math.md, Sections 1-5), shared by its forward and backward.
// Tensors carry a leading group axis G; gates are [G, n, Dg] with Dg = 1 (one per head) or Dv.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/memory_params.h"
#include "cpu/memory/chunk.h"
#include "cpu/memory/token_loop.h"

namespace miras::chunk {

using at::Tensor;

// A gate [G, n] (one per head) or [G, n, Dv] as [G, n, Dg]; undefined stays undefined.
Tensor as_channels(const Tensor& g);

// Eq. 5.7: D[t, i] = prod_{i < j <= t} g_j (i <= t, else 0) as [G, n, n, Dg], and cum_t = prod_{j <= t} g_j.
struct Decay {
  Tensor D, cum;
};
Decay decay(const Tensor& g);
// Gradient of g from gradients of D and cum, by the product rule without division (Eq. 9.5).
Tensor decay_backward(const Decay& d, const Tensor& dD, const Tensor& dcum);

// Coefficients of one run: C and A (Eq. 5.8); with momentum also P, CS, Mc (Eq. 5.9). Token-loop runs
// (Eq. 5.20) only use e.
//
// Without momentum C[t, i] = A_t e_i / A_i, so every sum over i <= t factors into A_t times a masked matrix
// product of e~_i = e_i / A_i (Eq. 5.12): `factored` runs use that and never form the [n, n, Dg] tensors.
// A run factors when the smallest A_t keeps 1 / A_t finite with room to spare; others use C.
struct Coefficients {
  Tensor e;          // learning rate [G, n, Dg]
  Decay alpha;       // D^alpha and A (only A when factored)
  Decay mom;         // D^m and M (momentum only)
  Tensor Cm;         // D^alpha D^m (momentum only)
  Tensor C, P, CS;   // [G, n, n, Dg], [G, n, Dg], [G, n, n, Dg]
  bool factored = false;
  Tensor et;         // e~ = e / A [G, n, Dg] (factored only)
  Tensor mask;       // [n, n] lower triangle with the diagonal (factored only)
};
Coefficients coefficients(const MemoryParams& p, const Tensor& lr, const Tensor& alpha, const Tensor& momentum);

// Side of weight tensor l that a gate scales (Eq. 3.4): 0 rows (outputs), 1 columns (inputs).
int gate_side(const MemoryParams& p, int l, bool per_channel);
// A gate [..., Dg] broadcast over a weight [..., out, in].
Tensor gate_matrix(const Tensor& g, int side);
// x [..., out, in] reduced onto the gate layout [..., Dg].
Tensor gate_reduce(const Tensor& x, int side, int64_t Dg);
// Reduces a trailing channel axis to Dg (sum when Dg = 1).
Tensor channel_reduce(const Tensor& x, int64_t Dg);

// sum_j Ct[t, j] G_j for G_j = d_j a_j^T (Eq. 5.3): Ct [G, t, n, Dg], d [G, n, out], a [G, n, in].
Tensor accumulate(const Tensor& Ct, const Tensor& d, const Tensor& a, int side);
struct AccumulateGrads {
  Tensor Ct, d, a;
};
AccumulateGrads accumulate_backward(const Tensor& grad, const Tensor& Ct, const Tensor& d, const Tensor& a,
                                    int side);

// The factored gradients of a run (Eq. 5.12): G~_i = d~_i a~_i^T with e~ on the gated side, so that
// Z_t = A_t (Z_0 - sum_{i <= t} G~_i).
struct Factored {
  Tensor d, a;  // [G, n, out], [G, n, in]
};
Factored factored_terms(const Coefficients& c, int side, const Tensor& d, const Tensor& a);

// Retention link W = phi(Z) (Eqs. 3.1, 3.5-3.8) over the last two axes, and its vector-Jacobian product
// (Eq. 9.3).
Tensor link(const MemoryParams& p, const Tensor& z);
Tensor link_backward(const MemoryParams& p, const Tensor& z, const Tensor& grad_w);

Tensor activation(const MemoryParams& p, const Tensor& u);
Tensor activation_grad(const MemoryParams& p, const Tensor& u);   // s'(u)
Tensor activation_grad2(const MemoryParams& p, const Tensor& u);  // s''(u)

// LayerNorm without affine over the last axis (Eq. 1.4), its backward (Eq. 5.5) and the backward of that
// (Eq. 9.4); epsilon p.ln_eps.
Tensor layer_norm(const MemoryParams& p, const Tensor& u);
Tensor layer_norm_backward(const MemoryParams& p, const Tensor& u, const Tensor& g);
struct LayerNormBackwardGrads {
  Tensor g, u;
};
LayerNormBackwardGrads layer_norm_backward_backward(const MemoryParams& p, const Tensor& u, const Tensor& g,
                                                   const Tensor& grad);

// The attentional bias row by row (common/bias.h): g = dl/dy (Eqs. 2.9-2.16), and (H u, -H u, dl/ddelta)
// for the backward (Eqs. 2.17-2.20). delta [G, n] or [G, n, Dv] or undefined.
Tensor bias_output_grad(const MemoryParams& p, const Tensor& y, const Tensor& v, const Tensor& delta);
struct BiasGrads {
  Tensor y, v, delta;
};
BiasGrads bias_backward(const MemoryParams& p, const Tensor& grad, const Tensor& y, const Tensor& v,
                        const Tensor& delta);

// The exact chunk of the delta rule (docs/math.md Eqs. 5.13-5.19, cpu/memory/delta_rule.cpp): matrix memory,
// l2 bias, GD, retention none or l2 in either gradient order (Eqs. 3.1, 3.2), gates per head or per row
// channel. The run's residuals r_t solve one unit lower-triangular system per channel; with them the run's
// gradients are G_t = r_t k_t^T and the reads and end state are Eqs. 5.8-5.12 unchanged.
struct DeltaSolve {
  Tensor ap;   // A'_t, the decay of Z_0 at token t's gradient point (Eq. 5.14) [G, n, Dg]
  Tensor dec;  // Dec[t, i] of Eq. 5.14 [G, n, n, Dg] (unfactored runs only)
  Tensor kk;   // k k^T [G, n, n]
  Tensor kz;   // k Z_0^T [G, n, Dv]
  Tensor sys;  // L of Eq. 5.15, strictly lower, [G * Dg, n, n]
  Tensor r;    // the residuals [G, n, Dv] (Eq. 5.16)
};

// k [G, n, Dk], v [G, n, Dv], z0 the run's start memory [G, Dv, Dk]; c the run's coefficients.
DeltaSolve delta_residuals(const MemoryParams& p, const Coefficients& c, const Tensor& k, const Tensor& v,
                           const Tensor& z0);

// The backward of delta_residuals for an upstream gradient dr of the residuals (Eqs. 5.18-5.19), with the
// gate gradients in the run's coefficients: A (cum) always, e~ for factored runs, D^alpha and eta otherwise.
struct DeltaSolveGrads {
  Tensor k, v, z0, cum, et, D, lr;
};
DeltaSolveGrads delta_residuals_backward(const MemoryParams& p, const Coefficients& c, const DeltaSolve& s,
                                         const Tensor& k, const Tensor& z0, const Tensor& dr);

// The exact delta rule on a factored run with a gate per head, the presets' case, as one specialised run
// (cpu/memory/delta_rule.cpp): Eqs. 5.12-5.19 with the gates folded into the keys, so that L is one product
// (A' (.) K)(e~ (.) K)^T, and the read and end state written for the matrix memory with fused products.
// Other exact runs (gates per channel, runs that do not factor) take delta_residuals and the general run.
inline bool delta_run_applies(const MemoryParams& p, const Coefficients& c) {
  return p.exact_chunks() && c.factored && c.e.size(-1) == 1;
}
Tensor delta_run_forward(const MemoryParams& p, const Coefficients& c, const ChunkInputs& in, ChunkState& state);
ChunkGrads delta_run_backward(const MemoryParams& p, const Coefficients& c, const ChunkInputs& in,
                              const ChunkState& start, const Tensor& grad_o, const ChunkState& grad_end);

// The gates' gradients of a factored run (Eq. 9.5 with e~ = e / A, A = cumprod(alpha)) from those of e~
// and A, each [G, n, Dg], in the gates' own shapes.
void factored_gate_grads(const Coefficients& c, const ChunkInputs& in, const Tensor& det, const Tensor& dA,
                         ChunkGrads& out);
// Gate gradients [G, n, 1] of gates given one per head ([G, n]) back in that shape.
void shape_gate_grads(const ChunkInputs& in, ChunkGrads& out);

// The run's inputs as contiguous tensors (the general run reshapes them with view()).
ChunkInputs contiguous_inputs(const ChunkInputs& in);

// The coefficients of a run (Eqs. 5.7-5.9, 5.12); token-loop runs only keep e.
Coefficients run_coefficients(const MemoryParams& p, const ChunkInputs& in);

// Everything the forward of a run computes; the backward recomputes it from the run's start state.
struct Forward {
  int64_t Dg = 1;
  std::vector<int> side;
  Coefficients c;
  Tensor x;                               // scale * q
  std::vector<Tensor> wb;                 // anchor weights phi(anchor)
  std::vector<Tensor> acts, pre, deltas;  // anchor pass: layer inputs, pre-activations, Eq. 5.3-5.4 deltas
  std::vector<Tensor> pre_grad, back;     // s'(pre[l]) and deltas[l + 1] W_{l+1}, for l < L - 1 (Eq. 5.4)
  Tensor y, g;                            // anchor prediction and bias gradient
  DeltaSolve exact;                       // the exact delta rule's residuals (MemoryParams::exact_chunks)
  std::vector<Tensor> rin, rpre;          // read pass: layer inputs and pre-activations
  std::vector<Tensor> rdots, rv;          // factored dual reads: masked n x n products, and rows' u / A
  std::vector<Tensor> zend, send;         // end states of token-loop runs (Eq. 5.20)
  Tensor o;
};
Forward run_forward(const MemoryParams& p, const ChunkInputs& in, const ChunkState& start, Coefficients c);

// Runs whose read takes the token loop (Eq. 5.20): every nonlinear link, and momentum, whose coefficients
// (Eq. 5.9) do not factor; grad_at_retained (Eq. 5.2, l2 only) keeps the chunk form.
inline bool uses_token_loop(const MemoryParams& p) {
  return p.linked() || (p.momentum() && !p.grad_at_retained);
}

// The token loop's inputs for layer l of a run (Eq. 5.20): its factors, gates and read inputs.
LoopInputs loop_inputs(const Forward& f, const ChunkInputs& in, int l, const Tensor& z0, const Tensor& s0);

}  // namespace miras::chunk
