// The exact chunk of the delta rule, forward and backward (docs/math.md Eqs. 5.13-5.19): the whole run for
// per-head gates on factored runs (delta_run_*), and the residuals for the general run otherwise.
//
// L (Eq. 5.15) is built from the run's coefficients: for factored runs (Eq. 5.12) Dec[t, i] eta_i =
// A'_t e~_i, a row and a column scaling of k k^T; otherwise from the products D^alpha (Eq. 5.7), so that a
// vanishing retention keeps exact gradients. The system is solved as [G * Dg, n, n] batches: all Dv columns
// at once for a gate per head, one right-hand side per row channel for gates per channel.
#include "cpu/memory/chunk_math.h"

namespace miras::chunk {

namespace {

// Token-major x [G, n, m] as the solve's right-hand sides [G * Dg, n, m / Dg], and back.
Tensor to_system(const Tensor& x, int64_t Dg) {
  return Dg == 1 ? x : x.transpose(1, 2).reshape({x.size(0) * x.size(2), x.size(1), 1});
}
Tensor from_system(const Tensor& x, int64_t G, int64_t Dg) {
  return Dg == 1 ? x : x.view({G, Dg, x.size(1)}).transpose(1, 2);
}
// A per-token gate [G, n, Dg] as the rows (t) or columns (i) of the [G * Dg, n, n] systems.
Tensor system_rows(const Tensor& g) { return g.transpose(1, 2).reshape({-1, g.size(1), 1}); }
Tensor system_cols(const Tensor& g) { return g.transpose(1, 2).reshape({-1, 1, g.size(1)}); }
// [G * Dg, n, 1] or [G * Dg, 1, n] back to [G, n, Dg].
Tensor gate_of(const Tensor& x, int64_t G, int64_t Dg) { return x.reshape({G, Dg, -1}).transpose(1, 2); }

// x[:, t] <- x[:, t + 1], the last row zero: the gradient of a quantity read one token later (Eq. 3.1's
// gradient point reads A_{t-1} and D^alpha[t-1, i]).
Tensor shift_up(const Tensor& x) {
  Tensor out = at::zeros_like(x);
  const int64_t n = x.size(1);
  if (n > 1) out.narrow(1, 0, n - 1).copy_(x.narrow(1, 1, n - 1));
  return out;
}

// The opposite shift, with `first` in row 0.
Tensor shift_down(const Tensor& x, double first) {
  Tensor out = at::full_like(x, first);
  const int64_t n = x.size(1);
  if (n > 1) out.narrow(1, 1, n - 1).copy_(x.narrow(1, 0, n - 1));
  return out;
}

// Eq. 5.14: A'_t = A_t for grad_at_retained (Eq. 3.2), A_{t-1} otherwise (Eq. 3.1).
Tensor a_prime(const MemoryParams& p, const Coefficients& c) {
  return p.grad_at_retained ? c.alpha.cum : shift_down(c.alpha.cum, 1.0);
}

Tensor strict_lower(int64_t n, const Tensor& like) { return at::ones({n, n}, like.options()).tril(-1); }

// (I + L)^{-1} b, or (I + L)^{-T} b, for L strictly lower [G * Dg, n, n] and b [G * Dg, n, m], solved from
// the right on the transposes: X (I + L)^T = b^T (or X (I + L) = b^T), X the transposed result. LAPACK then
// reads L and b in place: 2-3x faster than the left solve on row-major operands here (one thread, n = m = 64).
Tensor unit_lower_solve(const Tensor& L, const Tensor& b, bool transposed) {
  const Tensor a = transposed ? L : L.transpose(-1, -2);
  return at::linalg_solve_triangular(a, b.transpose(-1, -2), /*upper=*/!transposed, /*left=*/false,
                                     /*unitriangular=*/true)
      .transpose(-1, -2);
}

// The part of a run (per-head gates, factored) that its forward and backward both compute: with the gates
// folded into the keys, L = (A' (.) K)(e~ (.) K)^T below the diagonal (Eqs. 5.12, 5.15), the residuals R
// (Eq. 5.16), the factored gradients d~ = e~ (.) R and the read's masked K-Q products.
struct DeltaRun {
  bool decays;        // a retention gate: without one A = A' = 1 and no product scales by them
  Tensor ap, ak, ek;  // A' [G, n, 1] (undefined without decay); A' (.) K and e~ (.) K [G, n, Dk]
  Tensor sys;         // (A' (.) K)(e~ (.) K)^T [G, n, n]: L below the diagonal; the solves read no more
  Tensor r, d;        // R and e~ (.) R [G, n, Dv]
  Tensor qk;          // Q K^T on and below the diagonal [G, n, n] (q unscaled)
};

DeltaRun delta_run(const MemoryParams& p, const Coefficients& c, const ChunkInputs& in, const Tensor& z0) {
  DeltaRun s;
  s.decays = in.alpha.defined();
  if (s.decays) s.ap = a_prime(p, c);
  s.ak = s.decays ? in.k * s.ap : in.k;
  s.ek = in.k * c.et;
  s.sys = at::bmm(s.ak, s.ek.transpose(1, 2));
  // (I + L) R = (A' (.) K) Z_0^T - V.
  s.r = unit_lower_solve(s.sys, at::baddbmm(in.v, s.ak, z0.transpose(1, 2), /*beta=*/-1, /*alpha=*/1), false);
  s.d = s.r * c.et;
  s.qk = at::bmm(in.q, in.k.transpose(1, 2)).tril_();
  return s;
}

// The read before its gate: Q Z_0^T - tril(Q K^T) d~ (Eq. 5.12), so that o = scale A (.) this.
Tensor delta_read(const DeltaRun& s, const ChunkInputs& in, const Tensor& z0) {
  return at::bmm(in.q, z0.transpose(1, 2)).baddbmm_(s.qk, s.d, /*beta=*/1, /*alpha=*/-1);
}

}  // namespace

Tensor delta_run_forward(const MemoryParams& p, const Coefficients& c, const ChunkInputs& in, ChunkState& state) {
  Tensor& z = state.memory[0];
  const DeltaRun s = delta_run(p, c, in, z);
  Tensor o = delta_read(s, in, z);
  // Z_n = A_n (Z_0 - d~^T K) (Eq. 5.12 at t = n), in place (chunk.h); the anchor is unused by the exact rule
  // but kept as the general run keeps it.
  z.baddbmm_(s.d.transpose(1, 2), in.k, /*beta=*/1, /*alpha=*/-1);
  if (!s.decays) return o.mul_(p.scale);
  const Tensor a_end = c.alpha.cum.select(1, in.k.size(1) - 1).unsqueeze(-1);  // [G, 1, 1]
  z.mul_(a_end);
  if (p.grad_at_retained) state.anchor[0].mul_(a_end);
  return o.mul_(c.alpha.cum * p.scale);
}

ChunkGrads delta_run_backward(const MemoryParams& p, const Coefficients& c, const ChunkInputs& in,
                              const ChunkState& start, const Tensor& grad_o, const ChunkState& grad_end) {
  const Tensor& z0 = start.memory[0];
  const Tensor &q = in.q, &k = in.k;
  const int64_t n = k.size(1);
  const DeltaRun s = delta_run(p, c, in, z0);
  const Tensor a_end = c.alpha.cum.select(1, n - 1).unsqueeze(-1);
  ChunkGrads out;

  // The read o = A (.) U, U = scale (Q Z_0^T - tril(Q K^T) d~); with g = scale grad_o the products g Z_0 and
  // g d~^T give dA = rowsum(grad_o (.) U / A) without recomputing U, and A scales their rows after.
  const Tensor g = grad_o * p.scale;
  Tensor gz0 = at::bmm(g, z0);
  Tensor dqk = at::bmm(g, s.d.transpose(1, 2)).tril_();  // minus the gradient of tril(Q K^T), before A
  Tensor dA;
  if (s.decays) {
    dA = (gz0 * q).sum(-1, true).sub_((dqk * s.qk).sum(-1, true));
    gz0.mul_(c.alpha.cum);
    dqk.mul_(c.alpha.cum);
  }
  const Tensor du = s.decays ? g * c.alpha.cum : g;
  Tensor dz0 = at::bmm(du.transpose(1, 2), q);
  Tensor dd = at::bmm(s.qk.transpose(1, 2), du).neg_();
  out.q = gz0.baddbmm_(dqk, k, /*beta=*/1, /*alpha=*/-1);
  Tensor dk = at::bmm(dqk.transpose(1, 2), q).neg_();

  // The end state Z_n = A_n (Z_0 - d~^T K) (Eq. 9.1).
  const Tensor gz = grad_end.memory.empty() ? Tensor() : grad_end.memory[0];
  if (gz.defined()) {
    if (s.decays) {
      const Tensor u = at::baddbmm(z0, s.d.transpose(1, 2), k, /*beta=*/1, /*alpha=*/-1);
      dA.select(1, n - 1).add_((gz * u).sum({-2, -1}).unsqueeze(-1));
    }
    const Tensor dzu = s.decays ? gz * a_end : gz;
    dz0.add_(dzu);
    dd.baddbmm_(k, dzu.transpose(1, 2), /*beta=*/1, /*alpha=*/-1);
    dk.baddbmm_(s.d, dzu, /*beta=*/1, /*alpha=*/-1);
  }
  const Tensor gh = grad_end.anchor.empty() ? Tensor() : grad_end.anchor[0];
  if (gh.defined() && p.grad_at_retained && s.decays) {
    dA.select(1, n - 1).add_((gh * start.anchor[0]).sum({-2, -1}).unsqueeze(-1));
    out.state.anchor = {gh * a_end};
  } else {
    out.state.anchor = {gh};
  }

  // d~ = e~ (.) R, then the solve (Eq. 5.18): dY = (I + L)^{-T} dR, dL = -dY R^T below the diagonal.
  Tensor det = (dd * s.r).sum(-1, true);
  const Tensor dy = unit_lower_solve(s.sys, dd.mul_(c.et), true);
  const Tensor dl = at::bmm(dy, s.r.transpose(1, 2)).neg_().tril_(-1);
  // Y = (A' (.) K) Z_0^T - V and L = (A' (.) K)(e~ (.) K)^T (Eq. 5.19).
  out.v = dy.neg();
  const Tensor dak = at::bmm(dy, z0).baddbmm_(dl, s.ek);
  dz0.baddbmm_(dy.transpose(1, 2), s.ak);
  const Tensor dek = at::bmm(dl.transpose(1, 2), s.ak);
  dk.addcmul_(dek, c.et);
  det.add_((dek * k).sum(-1, true));
  if (s.decays) {
    dk.addcmul_(dak, s.ap);
    const Tensor dap = (dak * k).sum(-1, true);
    dA.add_(p.grad_at_retained ? dap : shift_up(dap));
  } else {
    dk.add_(dak);
  }

  out.k = dk;
  out.state.memory = {dz0};
  factored_gate_grads(c, in, det, dA, out);
  shape_gate_grads(in, out);
  return out;
}

DeltaSolve delta_residuals(const MemoryParams& p, const Coefficients& c, const Tensor& k, const Tensor& v,
                           const Tensor& z0) {
  DeltaSolve s;
  const int64_t G = k.size(0), n = k.size(1), Dg = c.e.size(-1);
  s.ap = a_prime(p, c);
  s.kk = at::matmul(k, k.transpose(-1, -2));
  s.kz = at::matmul(k, z0.transpose(-1, -2));
  const Tensor kk = Dg == 1 ? s.kk : s.kk.repeat_interleave(Dg, 0);  // [G * Dg, n, n]
  if (c.factored) {  // Dec[t, i] eta_i = A'_t e~_i (Eq. 5.12)
    s.sys = (kk * system_rows(s.ap)).mul_(system_cols(c.et)).tril_(-1);
  } else {
    s.dec = p.grad_at_retained ? c.alpha.D * strict_lower(n, k).unsqueeze(-1) : shift_down(c.alpha.D, 0.0);
    s.sys = (s.dec * c.e.unsqueeze(1) * s.kk.unsqueeze(-1)).permute({0, 3, 1, 2}).reshape({G * Dg, n, n});
  }
  // (I + L) R = A' (.) (K Z_0^T) - V by forward substitution (Eq. 5.16); the unit diagonal is implied.
  const Tensor y = (s.ap * s.kz).sub_(v);
  s.r = from_system(unit_lower_solve(s.sys, to_system(y, Dg), false), G, Dg);
  return s;
}

DeltaSolveGrads delta_residuals_backward(const MemoryParams& p, const Coefficients& c, const DeltaSolve& s,
                                         const Tensor& k, const Tensor& z0, const Tensor& dr) {
  const int64_t G = k.size(0), n = k.size(1), Dg = c.e.size(-1);
  DeltaSolveGrads g;
  // dY = (I + L)^{-T} dR by back substitution; dL = -dY R^T below the diagonal (Eq. 5.18).
  const Tensor dyb = unit_lower_solve(s.sys, to_system(dr, Dg), true);
  const Tensor dl = at::matmul(dyb, to_system(s.r, Dg).transpose(-1, -2)).neg_().tril_(-1);
  const Tensor dy = from_system(dyb, G, Dg);
  // Y = A' (.) (K Z_0^T) - V (Eq. 5.19).
  g.v = -dy;
  const Tensor dkz = s.ap * dy;
  g.z0 = at::matmul(dkz.transpose(-1, -2), k);
  g.k = at::matmul(dkz, z0);
  Tensor dap = channel_reduce(dy * s.kz, Dg), dkk;
  const Tensor kk = Dg == 1 ? s.kk : s.kk.repeat_interleave(Dg, 0);
  if (c.factored) {  // L = A'_t kk[t, i] e~_i
    const Tensor rows = system_rows(s.ap), cols = system_cols(c.et);
    const Tensor dlk = dl * kk;
    dap = dap + gate_of(at::matmul(dlk, cols.transpose(-1, -2)), G, Dg);
    g.et = gate_of(at::matmul(dlk.transpose(-1, -2), rows), G, Dg);
    dkk = (dl * rows).mul_(cols);
  } else {  // L = Dec[t, i] eta_i kk[t, i]
    const Tensor d4 = dl.view({G, Dg, n, n}).permute({0, 2, 3, 1});  // [G, n, n, Dg]
    const Tensor e_cols = c.e.unsqueeze(1);
    const Tensor kk4 = s.kk.unsqueeze(-1);
    g.lr = (d4 * s.dec * kk4).sum(1);
    const Tensor ddec = d4 * e_cols * kk4;
    g.D = p.grad_at_retained ? ddec : shift_up(ddec);
    dkk = (d4 * s.dec * e_cols).permute({0, 3, 1, 2}).reshape({G * Dg, n, n});
  }
  if (Dg > 1) dkk = dkk.view({G, Dg, n, n}).sum(1);
  g.k += at::matmul(dkk + dkk.transpose(-1, -2), k);
  g.cum = p.grad_at_retained ? dap : shift_up(dap);
  return g;
}

}  // namespace miras::chunk
