// Forward of one run of tokens sharing an anchor (docs/math.md, Section 5).
#include "cpu/memory/chunk_math.h"

namespace miras::chunk {

namespace {

// The dual-form read of weight tensor l at inputs h (Eq. 5.10), never forming W_t. Factored runs keep the
// products their backward needs in f.rdots / f.rv.
Tensor dual_read(Forward& f, int l, const Tensor& h, const Tensor& z0, const Tensor& s0) {
  const Coefficients& c = f.c;
  const Tensor& d = f.deltas[l];
  const Tensor& a = f.acts[l];
  if (c.factored) {  // Eq. 5.12
    const Factored ft = factored_terms(c, f.side[l], d, a);
    if (f.side[l] == 0) {
      f.rdots[l] = c.mask * at::matmul(h, a.transpose(-1, -2));
      f.rv[l] = at::matmul(h, z0.transpose(-1, -2)) - at::matmul(f.rdots[l], ft.d);
      return c.alpha.cum * f.rv[l];
    }
    const Tensor ha = c.alpha.cum * h;
    f.rdots[l] = c.mask * at::matmul(ha, ft.a.transpose(-1, -2));
    return at::matmul(ha, z0.transpose(-1, -2)) - at::matmul(f.rdots[l], d);
  }
  if (f.side[l] == 0) {
    Tensor u = c.alpha.cum * at::matmul(h, z0.transpose(-1, -2));
    if (s0.defined()) u = u + c.P * at::matmul(h, s0.transpose(-1, -2));
    const Tensor dots = at::matmul(h, a.transpose(-1, -2));
    if (f.Dg == 1) return u - at::matmul(c.C.squeeze(-1) * dots, d);
    return u - (c.C * dots.unsqueeze(-1) * d.unsqueeze(1)).sum(2);
  }
  Tensor u = at::matmul(c.alpha.cum * h, z0.transpose(-1, -2));
  if (s0.defined()) u = u + at::matmul(c.P * h, s0.transpose(-1, -2));
  const Tensor s = (c.C * a.unsqueeze(1) * h.unsqueeze(2)).sum(-1);
  return u - at::matmul(s, d);
}

// The gradients at the anchor as rank-one factors (Eqs. 5.1-5.5).
void anchor_pass(const MemoryParams& p, Forward& f, const ChunkInputs& in, const ChunkState& start) {
  const int L = p.num_layers();
  const bool residual = p.memory == Memory::Mlp && p.residual_norm;
  for (const Tensor& z : start.anchor) f.wb.push_back(link(p, z));
  Tensor h = in.k;
  for (int l = 0; l < L; ++l) {
    f.acts.push_back(h);
    Tensor u = at::matmul(h, f.wb[l].transpose(-1, -2));
    if (p.grad_at_retained) u = u * f.c.alpha.cum;  // Eq. 5.2
    f.pre.push_back(u);
    if (l < L - 1) h = activation(p, u);
  }
  f.y = residual ? in.k + layer_norm(p, f.pre.back()) : f.pre.back();
  f.g = bias_output_grad(p, f.y, in.v, in.delta);
  f.deltas.assign(L, Tensor());
  f.pre_grad.assign(L - 1, Tensor());
  f.back.assign(L - 1, Tensor());
  Tensor d = residual ? layer_norm_backward(p, f.pre.back(), f.g) : f.g;
  f.deltas[L - 1] = d;
  for (int l = L - 1; l > 0; --l) {  // Eq. 5.4
    f.back[l - 1] = at::matmul(d, f.wb[l]);
    f.pre_grad[l - 1] = activation_grad(p, f.pre[l - 1]);
    d = f.back[l - 1] * f.pre_grad[l - 1];
    f.deltas[l - 1] = d;
  }
}

}  // namespace

LoopInputs loop_inputs(const Forward& f, const ChunkInputs& in, int l, const Tensor& z0, const Tensor& s0) {
  return LoopInputs{z0,         s0,           f.deltas[l],   f.acts[l], f.rin[l], f.c.e, as_channels(in.alpha),
                    as_channels(in.momentum), f.side[l]};
}

Coefficients run_coefficients(const MemoryParams& p, const ChunkInputs& in) {
  // Contiguous: the token loop reads the gates' data in place.
  const auto gate = [](const Tensor& g) { return g.defined() ? as_channels(g).contiguous() : g; };
  if (uses_token_loop(p)) {  // the token loop (Eq. 5.20) takes the gates as they are
    Coefficients c;
    c.e = gate(in.lr);
    return c;
  }
  return coefficients(p, gate(in.lr), gate(in.alpha), gate(in.momentum));
}

Forward run_forward(const MemoryParams& p, const ChunkInputs& in, const ChunkState& start, Coefficients c) {
  Forward f;
  const int L = p.num_layers();
  f.c = std::move(c);
  f.Dg = f.c.e.size(-1);
  for (int l = 0; l < L; ++l) f.side.push_back(gate_side(p, l, p.per_channel));
  const bool residual = p.memory == Memory::Mlp && p.residual_norm;

  if (p.exact_chunks()) {  // the delta rule's exact gradients G_t = r_t k_t^T (Eqs. 5.13-5.16)
    f.exact = delta_residuals(p, f.c, in.k, in.v, start.memory[0]);
    f.acts = {in.k};
    f.deltas = {f.exact.r};
  } else {
    anchor_pass(p, f, in, start);
  }

  // The read (Eq. 4.3): dual form for W = Z without momentum, else the token loop (Eq. 5.20).
  f.x = in.q * p.scale;
  f.rdots.assign(L, Tensor());
  f.rv.assign(L, Tensor());
  Tensor h = f.x;
  for (int l = 0; l < L; ++l) {
    f.rin.push_back(h);
    const Tensor s0 = p.momentum() ? start.momentum[l] : Tensor();
    Tensor u;
    if (uses_token_loop(p)) {
      const LoopForward lf = token_loop_forward(p, loop_inputs(f, in, l, start.memory[l], s0));
      u = lf.u;
      f.zend.push_back(lf.z);
      f.send.push_back(lf.s);
    } else {
      u = dual_read(f, l, h, start.memory[l], s0);
    }
    f.rpre.push_back(u);
    if (l < L - 1) h = activation(p, u);
  }
  f.o = residual ? f.x + layer_norm(p, f.rpre.back()) : f.rpre.back();
  return f;
}

}  // namespace miras::chunk

namespace miras {

at::Tensor chunk_forward(const MemoryParams& p, const ChunkInputs& given, ChunkState& state) {
  using namespace chunk;
  TORCH_CHECK_VALUE(p.memory != Memory::Vector,
                    "memory: the compiled op implements matrix and mlp memory; vector memory runs in "
                    "miras_ext.reference");
  Coefficients coeffs = run_coefficients(p, given);
  if (delta_run_applies(p, coeffs)) return delta_run_forward(p, coeffs, given, state);
  const ChunkInputs in = contiguous_inputs(given);
  const Forward f = run_forward(p, in, state, std::move(coeffs));
  if (uses_token_loop(p)) {  // the token loop's end state (grad_at_retained is l2 only)
    state.memory = f.zend;
    if (p.momentum()) state.momentum = f.send;
    return f.o;
  }
  const Coefficients& c = f.c;
  const int64_t n = in.k.size(1);
  const Tensor a_end = c.alpha.cum.select(1, n - 1);
  for (int l = 0; l < p.num_layers(); ++l) {
    const int side = f.side[l];
    // End of the run (Eqs. 5.8-5.9, 5.12 at t = n).
    if (c.factored) {
      const Factored ft = factored_terms(c, side, f.deltas[l], f.acts[l]);
      state.memory[l] = gate_matrix(a_end, side) * (state.memory[l] - at::matmul(ft.d.transpose(-1, -2), ft.a));
      if (p.grad_at_retained) state.anchor[l] = gate_matrix(a_end, side) * state.anchor[l];
      continue;
    }
    Tensor z = gate_matrix(a_end, side) * state.memory[l];
    if (p.momentum()) {
      const Tensor& s0 = state.momentum[l];
      z = z + gate_matrix(c.P.select(1, n - 1), side) * s0;
      state.momentum[l] = gate_matrix(c.mom.cum.select(1, n - 1), side) * s0 -
                          accumulate(c.CS.narrow(1, n - 1, 1), f.deltas[l], f.acts[l], side).squeeze(1);
    }
    state.memory[l] = z - accumulate(c.C.narrow(1, n - 1, 1), f.deltas[l], f.acts[l], side).squeeze(1);
    if (p.grad_at_retained) state.anchor[l] = gate_matrix(a_end, side) * state.anchor[l];
  }
  return f.o;
}

}  // namespace miras
