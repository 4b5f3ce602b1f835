#include "cpu/memory/chunk_math.h"

#include <ATen/Dispatch.h>

#include <cmath>

#include "common/factored_floor.h"
#include "cpu/bias_rows.h"

namespace miras::chunk {

namespace {

Tensor tril_mask(int64_t n, int64_t diagonal, const Tensor& like) {
  return at::ones({n, n}, like.options().dtype(at::kBool)).tril(diagonal).unsqueeze(-1);
}

}  // namespace

Tensor as_channels(const Tensor& g) { return !g.defined() || g.dim() == 3 ? g : g.unsqueeze(-1); }

Decay decay(const Tensor& g) {
  const int64_t n = g.size(1);
  const Tensor rows = g.unsqueeze(2);  // [G, n(t), 1, Dg]
  // L[t, i] = g_t for i < t, else 1; its running product over t is D on and below the diagonal.
  const Tensor steps = at::where(tril_mask(n, -1, g), rows, at::ones_like(rows));
  return {at::cumprod(steps, 1) * tril_mask(n, 0, g), at::cumprod(g, 1)};
}

Tensor decay_backward(const Decay& d, const Tensor& dD, const Tensor& dcum) {
  // dD[t, i] / dg_j = D[t, j] D[j - 1, i] for i < j <= t; dcum_t / dg_j = cum_{j-1} D[t, j].
  Tensor prev = at::zeros_like(d.D);
  prev.narrow(1, 1, d.D.size(1) - 1).copy_(d.D.narrow(1, 0, d.D.size(1) - 1));
  // X[t, j, c] = sum_i dD[t, i, c] prev[j, i, c], as a batched product over (G, c).
  const Tensor x = at::matmul(dD.permute({0, 3, 1, 2}), prev.permute({0, 3, 2, 1})).permute({0, 2, 3, 1});
  Tensor dg = (d.D * x).sum(1);
  const Tensor cum_prev = at::cat({at::ones_like(d.cum.narrow(1, 0, 1)), d.cum.narrow(1, 0, d.cum.size(1) - 1)}, 1);
  return dg + cum_prev * (dcum.unsqueeze(2) * d.D).sum(1);
}

Coefficients coefficients(const MemoryParams& p, const Tensor& lr, const Tensor& alpha, const Tensor& momentum) {
  Coefficients c;
  c.e = lr;
  const Tensor a = alpha.defined() ? alpha : at::ones_like(lr);
  if (!p.momentum()) {
    // Eq. 5.12 where its gate gradients stay accurate (common/factored_floor.h).
    const Tensor cum = at::cumprod(a, 1);
    const double floor = cum.scalar_type() == at::kDouble ? factored_floor<double>() : factored_floor<float>();
    if (cum.min().item<double>() > floor) {
      c.factored = true;
      c.alpha.cum = cum;
      c.et = lr / cum;
      const int64_t n = lr.size(1);
      c.mask = at::ones({n, n}, lr.options()).tril();
      return c;
    }
  }
  c.alpha = decay(a);
  const Tensor e_cols = lr.unsqueeze(1);  // e_i scales column i
  if (p.momentum()) {
    c.mom = decay(momentum);
    // Cm[t, i] = sum_j D^alpha[t, j] D^m[j, i], per channel (Eq. 5.9).
    c.Cm = at::matmul(c.alpha.D.permute({0, 3, 1, 2}), c.mom.D.permute({0, 3, 1, 2})).permute({0, 2, 3, 1});
    c.C = c.Cm * e_cols;
    c.P = (c.alpha.D * c.mom.cum.unsqueeze(1)).sum(2);
    c.CS = c.mom.D * e_cols;
  } else {
    c.C = c.alpha.D * e_cols;  // Eq. 5.8
  }
  return c;
}

int gate_side(const MemoryParams& p, int l, bool per_channel) {
  if (!per_channel) return 0;
  return l == p.num_layers() - 1 ? 0 : 1;
}

Tensor gate_matrix(const Tensor& g, int side) { return side == 0 ? g.unsqueeze(-1) : g.unsqueeze(-2); }

Tensor channel_reduce(const Tensor& x, int64_t Dg) { return Dg > 1 ? x : x.sum(-1, true); }

Tensor gate_reduce(const Tensor& x, int side, int64_t Dg) {
  return channel_reduce(side == 0 ? x.sum(-1) : x.sum(-2), Dg);
}

Tensor accumulate(const Tensor& Ct, const Tensor& d, const Tensor& a, int side) {
  if (side == 0) {
    const Tensor e = Ct * d.unsqueeze(1);                      // [G, t, n, out]
    return at::matmul(e.transpose(-1, -2), a.unsqueeze(1));    // [G, t, out, in]
  }
  const Tensor e = Ct * a.unsqueeze(1);                        // [G, t, n, in]
  return at::matmul(d.transpose(-1, -2).unsqueeze(1), e);
}

AccumulateGrads accumulate_backward(const Tensor& grad, const Tensor& Ct, const Tensor& d, const Tensor& a,
                                    int side) {
  const int64_t Dg = Ct.size(-1);
  if (side == 0) {
    const Tensor e = Ct * d.unsqueeze(1);
    const Tensor de = at::matmul(grad, a.unsqueeze(1).transpose(-1, -2)).transpose(-1, -2);  // [G, t, n, out]
    return {channel_reduce(de * d.unsqueeze(1), Dg), (de * Ct).sum(1), at::matmul(e, grad).sum(1)};
  }
  const Tensor e = Ct * a.unsqueeze(1);
  const Tensor de = at::matmul(d.unsqueeze(1), grad);  // [G, t, n, in]
  return {channel_reduce(de * a.unsqueeze(1), Dg), at::matmul(e, grad.transpose(-1, -2)).sum(1),
          (de * Ct).sum(1)};
}

Factored factored_terms(const Coefficients& c, int side, const Tensor& d, const Tensor& a) {
  return side == 0 ? Factored{c.et * d, a} : Factored{d, c.et * a};
}

namespace {
// l_q's normaliser N of each weight tensor [.., out, in] (common/retention.h).
Tensor lq_norm(const MemoryParams& p, const Tensor& z) {
  const double weight = lq_weight<double>(p.norm_mean, z.size(-2) * z.size(-1));
  return z.abs().pow(p.norm_order).sum({-2, -1}, true) * weight + p.norm_floor;
}
}  // namespace

Tensor link(const MemoryParams& p, const Tensor& z) {
  switch (p.retention) {
    case Retention::None:
    case Retention::L2:
      return z;
    case Retention::Lq: {
      const double q = p.norm_order;
      return z * lq_norm(p, z).pow(-lq_gamma(q));
    }
    case Retention::Kl: {
      return at::softmax(z, -1) * simplex_scale<double>(p.simplex_scale, z.size(-1));
    }
    case Retention::ElasticNet:
      return z.sign() * at::relu(z.abs() - p.shrinkage);
    case Retention::Sigmoid:
      return at::sigmoid(z);
  }
  return z;
}

Tensor link_backward(const MemoryParams& p, const Tensor& z, const Tensor& grad_w) {
  switch (p.retention) {
    case Retention::None:
    case Retention::L2:
      return grad_w;
    case Retention::Lq: {
      const double q = p.norm_order, gamma = lq_gamma(q);
      const double weight = lq_weight<double>(p.norm_mean, z.size(-2) * z.size(-1));
      const Tensor total = lq_norm(p, z);
      const Tensor inner = (grad_w * z).sum({-2, -1}, true);
      return grad_w * total.pow(-gamma) -
             gamma * q * weight * total.pow(-gamma - 1.0) * inner * z.abs().pow(q - 2.0) * z;
    }
    case Retention::Kl: {
      const double c = simplex_scale<double>(p.simplex_scale, z.size(-1));
      const Tensor s = at::softmax(z, -1);
      return c * s * (grad_w - (grad_w * s).sum(-1, true));
    }
    case Retention::ElasticNet:
      return grad_w * (z.abs() > p.shrinkage);
    case Retention::Sigmoid: {
      const Tensor s = at::sigmoid(z);
      return grad_w * s * (1 - s);
    }
  }
  return grad_w;
}

Tensor activation(const MemoryParams& p, const Tensor& u) {
  return p.activation == Activation::Gelu ? at::gelu(u) : at::silu(u);
}

Tensor activation_grad(const MemoryParams& p, const Tensor& u) {
  return p.activation == Activation::Gelu ? gelu_grad(u) : silu_grad(u, at::sigmoid(u));
}

Tensor activation_grad2(const MemoryParams& p, const Tensor& u) {
  return p.activation == Activation::Gelu ? gelu_grad2(u) : silu_grad2(u, at::sigmoid(u));
}

namespace {

struct Normalised {
  Tensor xhat, rstd;
};

Normalised normalise(const MemoryParams& p, const Tensor& u) {
  const Tensor mu = u.mean(-1, true);
  const Tensor rstd = at::rsqrt((u - mu).pow(2).mean(-1, true) + p.ln_eps);
  return {(u - mu) * rstd, rstd};
}

}  // namespace

Tensor layer_norm(const MemoryParams& p, const Tensor& u) { return normalise(p, u).xhat; }

Tensor layer_norm_backward(const MemoryParams& p, const Tensor& u, const Tensor& g) {
  const auto [xhat, rstd] = normalise(p, u);
  return layer_norm_vjp(rstd, g, g.mean(-1, true), xhat, (g * xhat).mean(-1, true));
}

LayerNormBackwardGrads layer_norm_backward_backward(const MemoryParams& p, const Tensor& u, const Tensor& g,
                                                   const Tensor& grad) {
  // f = r (g - mean(g) - xhat m), m = mean(g xhat); with a = <grad, g - mean g>, b = <grad, xhat>:
  // df/du^T grad = -(a - m b) r^2 xhat / n - r b dm/du - r m db/du, dm/du = LNb(u, g) / n, db/du = LNb(u, grad)
  // (common/memory.h).
  const auto [xhat, rstd] = normalise(p, u);
  const double n = double(u.size(-1));
  const Tensor a = (grad * (g - g.mean(-1, true))).sum(-1, true);
  const Tensor b = (grad * xhat).sum(-1, true);
  const Tensor m = (g * xhat).mean(-1, true);
  const Tensor db = layer_norm_backward(p, u, grad);
  const Tensor du = layer_norm_vjp_du(a, b, m, rstd, xhat, layer_norm_backward(p, u, g), db, n);
  return {db, du};
}

namespace {

RowProblem row_problem(const MemoryParams& p, const Tensor& y, const Tensor& delta) {
  DeltaLayout layout = DeltaLayout::none;
  if (delta.defined()) layout = delta.dim() == y.dim() ? DeltaLayout::per_channel : DeltaLayout::per_row;
  return {p.bias, layout, p.p, p.eps, y.numel() / y.size(-1), y.size(-1)};
}

}  // namespace

Tensor bias_output_grad(const MemoryParams& p, const Tensor& y, const Tensor& v, const Tensor& delta) {
  const Tensor yc = y.contiguous(), vc = v.contiguous();
  const Tensor dc = delta.defined() ? delta.contiguous() : delta;
  Tensor g = at::empty_like(yc);
  AT_DISPATCH_FLOATING_TYPES(yc.scalar_type(), "miras_ext::memory bias", [&] {
    forward_rows<scalar_t>(row_problem(p, yc, dc), yc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
                           in_or_null<scalar_t>(dc), g.mutable_data_ptr<scalar_t>());
  });
  return g;
}

BiasGrads bias_backward(const MemoryParams& p, const Tensor& grad, const Tensor& y, const Tensor& v,
                        const Tensor& delta) {
  const Tensor gc = grad.contiguous(), yc = y.contiguous(), vc = v.contiguous();
  const Tensor dc = delta.defined() ? delta.contiguous() : delta;
  Tensor gy = at::empty_like(yc), gv = at::empty_like(vc);
  Tensor gd = dc.defined() ? at::empty_like(dc) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(yc.scalar_type(), "miras_ext::memory bias backward", [&] {
    backward_rows<scalar_t>(row_problem(p, yc, dc), gc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(),
                            vc.const_data_ptr<scalar_t>(), in_or_null<scalar_t>(dc), gy.mutable_data_ptr<scalar_t>(),
                            gv.mutable_data_ptr<scalar_t>(), gd.defined() ? gd.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {gy, gv, gd};
}

void factored_gate_grads(const Coefficients& c, const ChunkInputs& in, const Tensor& det, const Tensor& dA,
                         ChunkGrads& out) {
  out.lr = det / c.alpha.cum;
  if (!in.alpha.defined()) return;
  // dA_t in full, then dalpha_j = sum_{t >= j} dA_t A_t / alpha_j (alpha > 0 on a factored run).
  const Tensor da = dA - det * c.et / c.alpha.cum;
  out.alpha = at::flip(at::cumsum(at::flip(da * c.alpha.cum, {1}), 1), {1}) / as_channels(in.alpha);
}

ChunkInputs contiguous_inputs(const ChunkInputs& in) {
  const auto c = [](const Tensor& x) { return x.defined() ? x.contiguous() : x; };
  return ChunkInputs{c(in.q), c(in.k), c(in.v), c(in.lr), c(in.alpha), c(in.momentum), c(in.delta)};
}

void shape_gate_grads(const ChunkInputs& in, ChunkGrads& out) {
  const auto shaped = [](const Tensor& grad, const Tensor& gate) {
    return !grad.defined() || gate.dim() == 3 ? grad : grad.squeeze(-1);
  };
  out.lr = shaped(out.lr, in.lr);
  out.alpha = shaped(out.alpha, in.alpha);
  out.momentum = shaped(out.momentum, in.momentum);
}

}  // namespace miras::chunk
