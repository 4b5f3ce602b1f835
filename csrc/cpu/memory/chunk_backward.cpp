// Explicit backward of one run (docs/math.md, Section 9): the forward is recomputed from the run's start
// state, then every step is differentiated by hand, including the second-order terms of the gradients taken
// at the anchor (Eqs. 2.17-2.20 for the bias, the LayerNorm and activation second derivatives).
#include "cpu/memory/chunk_math.h"

namespace miras::chunk {

namespace {

// Gradient accumulators of one run.
struct Acc {
  Tensor dC, dA, dP, dCS, dMc;
  Tensor det;  // gradient of e~ (factored runs, Eq. 5.12)
  Tensor de, dalpha, dmom;  // gate gradients [G, n, Dg] of token-loop runs (Eq. 5.21)
  std::vector<Tensor> dz0, ds0, danchor, dd, da;
};

// Gradients of the factored terms d~ = e~ d, a~ = a (rows) or d~ = d, a~ = e~ a (columns) of layer l
// (Eq. 5.12), passed on to e~, the deltas and the layer inputs.
void add_factored_grads(const Forward& f, Acc& g, int l, const Tensor& dft_d, const Tensor& dft_a) {
  const Tensor& et = f.c.et;
  if (f.side[l] == 0) {
    g.det += channel_reduce(dft_d * f.deltas[l], f.Dg);
    g.dd[l] += dft_d * et;
    g.da[l] += dft_a;
  } else {
    g.det += channel_reduce(dft_a * f.acts[l], f.Dg);
    g.da[l] += dft_a * et;
    g.dd[l] += dft_d;
  }
}

// Backward of the dual-form read of layer l (Eqs. 5.10, 9.2); returns the gradient of its input h.
Tensor dual_read_backward(const Forward& f, Acc& g, int l, const Tensor& h, const Tensor& du, const Tensor& z0,
                          const Tensor& s0) {
  const Coefficients& c = f.c;
  const Tensor& d = f.deltas[l];
  const Tensor& a = f.acts[l];
  const Tensor& A = c.alpha.cum;
  if (c.factored) {  // Eq. 5.12
    const Factored ft = factored_terms(c, f.side[l], d, a);
    if (f.side[l] == 0) {  // u = A v, v = h Z0^T - (mask dots) d~
      const Tensor& mdots = f.rdots[l];
      g.dA += channel_reduce(du * f.rv[l], f.Dg);
      const Tensor dv = du * A;
      g.dz0[l] += at::matmul(dv.transpose(-1, -2), h);
      const Tensor ddots = -c.mask * at::matmul(dv, ft.d.transpose(-1, -2));
      add_factored_grads(f, g, l, -at::matmul(mdots.transpose(-1, -2), dv),
                         at::matmul(ddots.transpose(-1, -2), h));
      return at::matmul(dv, z0) + at::matmul(ddots, a);
    }
    // u = hA Z0^T - s d, hA = A h, s = mask (hA a~^T), a~ = e~ a
    const Tensor ha = A * h;
    const Tensor& s = f.rdots[l];
    g.dz0[l] += at::matmul(du.transpose(-1, -2), ha);
    const Tensor ds = -c.mask * at::matmul(du, d.transpose(-1, -2));
    const Tensor dha = at::matmul(du, z0) + at::matmul(ds, ft.a);
    add_factored_grads(f, g, l, -at::matmul(s.transpose(-1, -2), du), at::matmul(ds.transpose(-1, -2), ha));
    g.dA += channel_reduce(dha * h, f.Dg);
    return dha * A;
  }
  if (f.side[l] == 0) {
    g.dA += channel_reduce(du * at::matmul(h, z0.transpose(-1, -2)), f.Dg);
    Tensor dh = at::matmul(du * A, z0);
    g.dz0[l] += at::matmul((du * A).transpose(-1, -2), h);
    if (s0.defined()) {
      g.dP += channel_reduce(du * at::matmul(h, s0.transpose(-1, -2)), f.Dg);
      dh = dh + at::matmul(du * c.P, s0);
      g.ds0[l] += at::matmul((du * c.P).transpose(-1, -2), h);
    }
    const Tensor dots = at::matmul(h, a.transpose(-1, -2));
    Tensor ddots;
    if (f.Dg == 1) {
      const Tensor c0 = c.C.squeeze(-1);
      const Tensor dm = -at::matmul(du, d.transpose(-1, -2));
      g.dC += (dm * dots).unsqueeze(-1);
      ddots = dm * c0;
      g.dd[l] -= at::matmul((c0 * dots).transpose(-1, -2), du);
    } else {
      const Tensor du_t = du.unsqueeze(2);  // [G, t, 1, out]
      g.dC -= du_t * dots.unsqueeze(-1) * d.unsqueeze(1);
      ddots = -(du_t * c.C * d.unsqueeze(1)).sum(-1);
      g.dd[l] -= (du_t * c.C * dots.unsqueeze(-1)).sum(1);
    }
    g.da[l] += at::matmul(ddots.transpose(-1, -2), h);
    return dh + at::matmul(ddots, a);
  }
  const Tensor ha = A * h;
  g.dz0[l] += at::matmul(du.transpose(-1, -2), ha);
  const Tensor dha = at::matmul(du, z0);
  g.dA += dha * h;
  Tensor dh = dha * A;
  if (s0.defined()) {
    g.ds0[l] += at::matmul(du.transpose(-1, -2), c.P * h);
    const Tensor dhs = at::matmul(du, s0);
    g.dP += dhs * h;
    dh = dh + dhs * c.P;
  }
  const Tensor s = (c.C * a.unsqueeze(1) * h.unsqueeze(2)).sum(-1);
  const Tensor ds = -at::matmul(du, d.transpose(-1, -2)).unsqueeze(-1);  // [G, t, n, 1]
  g.dd[l] -= at::matmul(s.transpose(-1, -2), du);
  g.dC += ds * a.unsqueeze(1) * h.unsqueeze(2);
  g.da[l] += (ds * c.C * h.unsqueeze(2)).sum(1);
  return dh + (ds * c.C * a.unsqueeze(1)).sum(2);
}

// Backward of a token-loop read (Eq. 5.21): the loop walks the run in reverse from the end state's
// gradients gz, gs; returns the gradient of h.
Tensor loop_read_backward(const MemoryParams& p, const Forward& f, const ChunkInputs& in, Acc& g, int l,
                            const Tensor& du, const Tensor& z0, const Tensor& s0, const Tensor& gz,
                            const Tensor& gs) {
  const LoopGrads lg = token_loop_backward(p, loop_inputs(f, in, l, z0, s0), du, gz, gs);
  g.dz0[l] += lg.z0;
  if (s0.defined()) g.ds0[l] += lg.s0;
  g.dd[l] += lg.d;
  g.da[l] += lg.a;
  g.de += lg.e;
  g.dalpha += lg.alpha;
  if (g.dmom.defined()) g.dmom += lg.m;
  return lg.h;
}

// Through the gradients taken at the anchor: deltas and layer inputs back to the anchor weights, k, v and
// delta (second order, Eq. 9.4), into out's k, v, delta and anchor.
void anchor_backward(const MemoryParams& p, const Forward& f, const ChunkInputs& in, const ChunkState& start,
                     Acc& g, ChunkGrads& out) {
  const Coefficients& c = f.c;
  const int L = p.num_layers();
  const bool residual = p.memory == Memory::Mlp && p.residual_norm;
  std::vector<Tensor> dwb, dpre;
  for (int l = 0; l < L; ++l) {
    dwb.push_back(at::zeros_like(f.wb[l]));
    dpre.push_back(at::zeros_like(f.pre[l]));
  }
  for (int l = 1; l < L; ++l) {  // deltas[l-1] = (deltas[l] W_l) s'(pre[l-1]) (Eq. 5.4)
    const Tensor dw = g.dd[l - 1] * f.pre_grad[l - 1];
    dpre[l - 1] += g.dd[l - 1] * f.back[l - 1] * activation_grad2(p, f.pre[l - 1]);
    g.dd[l] += at::matmul(dw, f.wb[l].transpose(-1, -2));
    dwb[l] += at::matmul(f.deltas[l].transpose(-1, -2), dw);
  }
  Tensor dg = g.dd[L - 1];
  if (residual) {
    const LayerNormBackwardGrads lg = layer_norm_backward_backward(p, f.pre.back(), f.g, dg);
    dg = lg.g;
    dpre[L - 1] += lg.u;
  }
  const BiasGrads bg = bias_backward(p, dg, f.y, in.v, in.delta);
  Tensor dk = at::zeros_like(in.k);
  if (residual) {
    dk += bg.y;
    dpre[L - 1] += layer_norm_backward(p, f.pre.back(), bg.y);
  } else {
    dpre[L - 1] += bg.y;
  }
  for (int l = L - 1; l >= 0; --l) {
    Tensor dul = dpre[l];
    if (p.grad_at_retained) {  // u = (a W^T) A (Eq. 5.2)
      g.dA += channel_reduce(dul * at::matmul(f.acts[l], f.wb[l].transpose(-1, -2)), f.Dg);
      dul = dul * c.alpha.cum;
    }
    dwb[l] += at::matmul(dul.transpose(-1, -2), f.acts[l]);
    g.da[l] += at::matmul(dul, f.wb[l]);
    if (l > 0) dpre[l - 1] += g.da[l] * f.pre_grad[l - 1];
  }
  dk += g.da[0];

  for (int l = 0; l < L; ++l) out.state.anchor.push_back(g.danchor[l] + link_backward(p, start.anchor[l], dwb[l]));
  out.k = dk;
  out.v = bg.v;
  out.delta = bg.delta;
}

}  // namespace

}  // namespace miras::chunk

namespace miras {

ChunkGrads chunk_backward(const MemoryParams& p, const ChunkInputs& given, const ChunkState& start,
                          const at::Tensor& grad_o, const ChunkState& grad_end) {
  using namespace chunk;
  Coefficients coeffs = run_coefficients(p, given);
  if (delta_run_applies(p, coeffs)) return delta_run_backward(p, coeffs, given, start, grad_o, grad_end);
  const ChunkInputs in = contiguous_inputs(given);
  const Forward f = run_forward(p, in, start, std::move(coeffs));
  const Coefficients& c = f.c;
  const int L = p.num_layers();
  const int64_t n = in.k.size(1);
  const bool residual = p.memory == Memory::Mlp && p.residual_norm;
  const auto end_grad = [](const std::vector<Tensor>& v, int l, const Tensor& like) {
    return size_t(l) < v.size() && v[l].defined() ? v[l] : at::zeros_like(like);
  };

  Acc g;
  if (uses_token_loop(p)) {
    g.de = at::zeros_like(c.e);
    g.dalpha = at::zeros_like(c.e);
    if (p.momentum()) g.dmom = at::zeros_like(c.e);
  } else if (c.factored) {
    g.det = at::zeros_like(c.et);
  } else {
    g.dC = at::zeros_like(c.C);
  }
  if (!uses_token_loop(p)) g.dA = at::zeros_like(c.alpha.cum);
  if (p.momentum() && !uses_token_loop(p)) {
    g.dP = at::zeros_like(c.P);
    g.dCS = at::zeros_like(c.CS);
    g.dMc = at::zeros_like(c.mom.cum);
  }
  for (int l = 0; l < L; ++l) {
    g.dz0.push_back(at::zeros_like(start.memory[l]));
    g.danchor.push_back(at::zeros_like(start.anchor[l]));
    if (p.momentum()) g.ds0.push_back(at::zeros_like(start.momentum[l]));
    g.dd.push_back(at::zeros_like(f.deltas[l]));
    g.da.push_back(at::zeros_like(f.acts[l]));
  }

  // The end state (Eq. 9.1).
  for (int l = 0; l < L; ++l) {
    const int side = f.side[l];
    const Tensor gz = end_grad(grad_end.memory, l, start.memory[l]);
    const Tensor gh = end_grad(grad_end.anchor, l, start.anchor[l]);
    if (uses_token_loop(p)) {  // the end state enters the token loop's reverse walk
      g.danchor[l] += gh;
      continue;
    }
    if (p.grad_at_retained) {
      g.danchor[l] += gate_matrix(c.alpha.cum.select(1, n - 1), side) * gh;
      g.dA.select(1, n - 1).add_(gate_reduce(gh * start.anchor[l], side, f.Dg));
    } else {
      g.danchor[l] += gh;
    }
    if (c.factored) {  // Z_n = A_n (Z_0 - d~^T a~) (Eq. 5.12)
      const Factored ft = factored_terms(c, side, f.deltas[l], f.acts[l]);
      const Tensor u = start.memory[l] - at::matmul(ft.d.transpose(-1, -2), ft.a);
      g.dA.select(1, n - 1).add_(gate_reduce(gz * u, side, f.Dg));
      const Tensor du = gate_matrix(c.alpha.cum.select(1, n - 1), side) * gz;
      g.dz0[l] += du;
      const Tensor dft_d = -at::matmul(ft.a, du.transpose(-1, -2));  // [G, n, out]
      const Tensor dft_a = -at::matmul(ft.d, du);                     // [G, n, in]
      add_factored_grads(f, g, l, dft_d, dft_a);
      continue;
    }
    g.dz0[l] += gate_matrix(c.alpha.cum.select(1, n - 1), side) * gz;
    g.dA.select(1, n - 1).add_(gate_reduce(gz * start.memory[l], side, f.Dg));
    AccumulateGrads ag = accumulate_backward(-gz.unsqueeze(1), c.C.narrow(1, n - 1, 1), f.deltas[l], f.acts[l], side);
    g.dC.narrow(1, n - 1, 1).add_(ag.Ct);
    g.dd[l] += ag.d;
    g.da[l] += ag.a;
    if (p.momentum()) {
      const Tensor& s0 = start.momentum[l];
      g.ds0[l] += gate_matrix(c.P.select(1, n - 1), side) * gz;
      g.dP.select(1, n - 1).add_(gate_reduce(gz * s0, side, f.Dg));
      const Tensor gs = end_grad(grad_end.momentum, l, s0);
      g.ds0[l] += gate_matrix(c.mom.cum.select(1, n - 1), side) * gs;
      g.dMc.select(1, n - 1).add_(gate_reduce(gs * s0, side, f.Dg));
      ag = accumulate_backward(-gs.unsqueeze(1), c.CS.narrow(1, n - 1, 1), f.deltas[l], f.acts[l], side);
      g.dCS.narrow(1, n - 1, 1).add_(ag.Ct);
      g.dd[l] += ag.d;
      g.da[l] += ag.a;
    }
  }

  // The read, last layer first.
  Tensor dx = residual ? grad_o.clone() : at::zeros_like(f.x);
  Tensor du = residual ? layer_norm_backward(p, f.rpre.back(), grad_o) : grad_o;
  for (int l = L - 1; l >= 0; --l) {
    const Tensor s0 = p.momentum() ? start.momentum[l] : Tensor();
    const auto given = [l](const std::vector<Tensor>& v) { return size_t(l) < v.size() ? v[l] : Tensor(); };
    const Tensor dh =
        uses_token_loop(p) ? loop_read_backward(p, f, in, g, l, du, start.memory[l], s0, given(grad_end.memory),
                                          given(grad_end.momentum))
                   : dual_read_backward(f, g, l, f.rin[l], du, start.memory[l], s0);
    if (l > 0) {
      du = dh * activation_grad(p, f.rpre[l - 1]);
    } else {
      dx += dh;
    }
  }

  ChunkGrads out;
  DeltaSolveGrads exact;
  if (p.exact_chunks()) {  // through the residuals' triangular solve (Eqs. 5.18-5.19)
    exact = delta_residuals_backward(p, c, f.exact, in.k, start.memory[0], g.dd[0]);
    out.k = exact.k + g.da[0];
    out.v = exact.v;
    out.state.anchor = g.danchor;
    g.dz0[0] += exact.z0;
    g.dA += exact.cum;
    if (c.factored) g.det += exact.et;
  } else {
    anchor_backward(p, f, in, start, g, out);
  }
  out.state.memory = g.dz0;
  out.state.momentum = g.ds0;

  // Coefficients to gates (Eq. 9.5).
  const Tensor e_cols = c.e.unsqueeze(1);
  Tensor de, dDa;
  if (uses_token_loop(p)) {
    out.lr = g.de;
    if (in.alpha.defined()) out.alpha = g.dalpha;
    out.momentum = g.dmom;
  } else if (c.factored) {
    factored_gate_grads(c, in, g.det, g.dA, out);
  } else if (p.momentum()) {
    const Tensor dCm = g.dC * e_cols;
    de = (g.dC * c.Cm).sum(1) + (g.dCS * c.mom.D).sum(1);
    // dD^alpha[t, j] = sum_i dCm[t, i] D^m[j, i] + dP[t] M[j]; dD^m[j, i] = sum_t D^alpha[t, j] dCm[t, i].
    dDa = at::matmul(dCm.permute({0, 3, 1, 2}), c.mom.D.permute({0, 3, 2, 1})).permute({0, 2, 3, 1}) +
          g.dP.unsqueeze(2) * c.mom.cum.unsqueeze(1);
    const Tensor dDm =
        at::matmul(c.alpha.D.permute({0, 3, 2, 1}), dCm.permute({0, 3, 1, 2})).permute({0, 2, 3, 1}) +
        g.dCS * e_cols;
    const Tensor dMc = g.dMc + (g.dP.unsqueeze(2) * c.alpha.D).sum(1);
    out.momentum = decay_backward(c.mom, dDm, dMc);
  } else {
    de = (g.dC * c.alpha.D).sum(1);
    dDa = g.dC * e_cols;
    if (p.exact_chunks()) {
      de = de + exact.lr;
      dDa = dDa + exact.D;
    }
  }
  if (!c.factored && !uses_token_loop(p)) {
    if (in.alpha.defined()) out.alpha = decay_backward(c.alpha, dDa, g.dA);
    out.lr = de;
  }
  shape_gate_grads(in, out);
  out.q = dx * p.scale;
  return out;
}

}  // namespace miras
