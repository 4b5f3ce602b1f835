// The exact chunk of the delta rule, forward and backward (docs/math.md Eqs. 5.13-5.19).
#include "cpu/memory/chunk_math.h"

namespace miras::chunk {

namespace {

// The system's layout [G, Dg, n, m] for a token-major x [G, n, Dv]: one right-hand side per channel when the
// gates are per channel (each row of Z has its own L, Eq. 5.16), all Dv columns at once for a gate per head.
Tensor to_system(const Tensor& x, int64_t Dg) { return Dg == 1 ? x.unsqueeze(1) : x.transpose(1, 2).unsqueeze(-1); }
Tensor from_system(const Tensor& x, int64_t Dg) { return Dg == 1 ? x.squeeze(1) : x.squeeze(-1).transpose(1, 2); }

// x[:, t] <- x[:, t + 1] (the last row zero): the gradient of a tensor read one token later (Eq. 3.1's
// gradient point is A_{t-1}, D[t-1, i]).
Tensor shift_up(const Tensor& x) {
  Tensor out = at::zeros_like(x);
  const int64_t n = x.size(1);
  if (n > 1) out.narrow(1, 0, n - 1).copy_(x.narrow(1, 1, n - 1));
  return out;
}

Tensor strict_lower(int64_t n, const Tensor& like) { return at::ones({n, n}, like.options()).tril(-1); }

}  // namespace

DeltaSolve delta_residuals(const MemoryParams& p, const Tensor& k, const Tensor& v, const Tensor& lr,
                           const Tensor& alpha, const Tensor& z0) {
  DeltaSolve s;
  const int64_t n = k.size(1), Dg = lr.size(-1);
  const Tensor strict = strict_lower(n, k).unsqueeze(-1);
  if (alpha.defined()) {
    s.alpha = decay(alpha);
    if (p.grad_at_retained) {  // Eq. 3.2: token t's gradient is at alpha_t Z_{t-1}
      s.dec = s.alpha.D * strict;
      s.ap = s.alpha.cum;
    } else {  // Eq. 3.1: at Z_{t-1}
      s.dec = at::zeros_like(s.alpha.D);
      if (n > 1) s.dec.narrow(1, 1, n - 1).copy_(s.alpha.D.narrow(1, 0, n - 1));
      s.ap = at::ones_like(s.alpha.cum);
      if (n > 1) s.ap.narrow(1, 1, n - 1).copy_(s.alpha.cum.narrow(1, 0, n - 1));
    }
  } else {
    s.dec = strict.expand({k.size(0), n, n, Dg});
  }
  s.kk = at::matmul(k, k.transpose(-1, -2));
  s.kz = at::matmul(k, z0.transpose(-1, -2));
  // L[t, i] = Dec[t, i] eta_i (k_t . k_i), i < t (Eq. 5.15).
  s.sys = (s.dec * lr.unsqueeze(1) * s.kk.unsqueeze(-1)).permute({0, 3, 1, 2});
  const Tensor y = (s.ap.defined() ? s.ap * s.kz : s.kz) - v;
  // (I + L) r = y by forward substitution (Eq. 5.16); the unit diagonal is implied.
  s.r = from_system(at::linalg_solve_triangular(s.sys, to_system(y, Dg), /*upper=*/false, /*left=*/true,
                                                /*unitriangular=*/true),
                    Dg);
  return s;
}

DeltaSolveGrads delta_residuals_backward(const MemoryParams& p, const DeltaSolve& s, const Tensor& k,
                                         const Tensor& lr, const Tensor& z0, const Tensor& dr) {
  const int64_t n = k.size(1), Dg = lr.size(-1);
  DeltaSolveGrads g;
  // dy = (I + L)^{-T} dr by back substitution; dL = -dy r^T below the diagonal (Eq. 5.18).
  const Tensor dyb = at::linalg_solve_triangular(s.sys.transpose(-1, -2), to_system(dr, Dg), /*upper=*/true,
                                                 /*left=*/true, /*unitriangular=*/true);
  const Tensor dsys = -at::matmul(dyb, to_system(s.r, Dg).transpose(-1, -2)) * strict_lower(n, k);
  const Tensor dl = dsys.permute({0, 2, 3, 1});  // [G, n, n, Dg]
  const Tensor dy = from_system(dyb, Dg);
  // y = A' (k Z_0^T) - v (Eq. 5.19).
  g.v = -dy;
  const Tensor dkz = s.ap.defined() ? s.ap * dy : dy;
  g.z0 = at::matmul(dkz.transpose(-1, -2), k);
  g.k = at::matmul(dkz, z0);
  // L = Dec eta_i kk.
  const Tensor lr_cols = lr.unsqueeze(1);
  const Tensor dkk = (dl * s.dec * lr_cols).sum(-1);
  g.k += at::matmul(dkk, k) + at::matmul(dkk.transpose(-1, -2), k);
  g.lr = (dl * s.dec * s.kk.unsqueeze(-1)).sum(1);
  if (s.alpha.D.defined()) {
    const Tensor ddec = dl * lr_cols * s.kk.unsqueeze(-1);
    const Tensor dap = channel_reduce(dy * s.kz, Dg);
    // Back from the gradient point to D^alpha and A (Eq. 9.5).
    g.alpha = p.grad_at_retained ? decay_backward(s.alpha, ddec, dap)
                                 : decay_backward(s.alpha, shift_up(ddec), shift_up(dap));
  }
  return g;
}

}  // namespace miras::chunk
