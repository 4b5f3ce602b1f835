// Token recurrence of one weight tensor (cpu/memory/token_loop.h; docs/math.md Eqs. 5.20-5.21): one
// pass over each row of the state per token, the update and the read fused while the row is in cache.
#include "cpu/memory/token_loop.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

#include "cpu/memory/chunk_math.h"

namespace miras::chunk {

namespace {


// The link's constants (Eqs. 3.5-3.8) in the compute type.
template <typename T>
struct Link {
  T q = 4, g = 0;   // l_q order and exponent (q - 2) / q
  T c = 1;          // KL scale
  T gamma = 0;      // elastic-net shrinkage
  T floor = 0;      // added to sum |Z|^q (MemorySpec.norm_floor)
  T weight = 1;     // of sum |Z|^q in the normaliser (common/retention.h lq_weight)
};

template <typename T>
Link<T> make_link(const MemoryParams& p, int64_t out, int64_t fan_in) {
  Link<T> lk;
  lk.q = T(p.norm_order);
  lk.g = lq_gamma(lk.q);
  lk.c = simplex_scale<T>(p.simplex_scale, fan_in);
  lk.gamma = T(p.shrinkage);
  lk.floor = T(p.norm_floor);
  lk.weight = lq_weight<T>(p.norm_mean, out * fan_in);
  return lk;
}

// |z|^q and d|z|^q / dz / q = |z|^{q-2} z. QN is q when it is 3 or 4 (Moneta's), computed by
// multiplication, which vectorises; 0 means any other order, through std::pow, a library call per element
// (Moneta's spec at q = 3.5 ran 10x slower than at 3 or 4, fwd and fwd+bwd, one thread, T = 256).
template <int QN, typename T>
inline T pow_q(const Link<T>& lk, T z) {
  if constexpr (QN == 4) return (z * z) * (z * z);
  if constexpr (QN == 3) return std::abs(z) * (z * z);
  return std::pow(std::abs(z), lk.q);
}
template <int QN, typename T>
inline T pow_q1(const Link<T>& lk, T z) {
  if constexpr (QN == 4) return z * z * z;
  if constexpr (QN == 3) return std::abs(z) * z;
  return std::copysign(std::pow(std::abs(z), lk.q - T(1)), z);
}

// exp(x) for x <= 0 in a form the compiler vectorises (std::exp is a library call per element, the
// softmax's main cost): x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial (degree 12 in
// double, 7 in float: the truncation is below the unit roundoff), 2^n from the exponent bits. x is clamped
// where 2^n stays normal: results under e^-708 (double) or e^-87 (float) are off by less than that,
// next to the softmax's largest term 1. (The clamp vectorises because CMakeLists.txt compiles this file
// with -fno-trapping-math, which changes no result.)
template <typename T>
inline T exp_nonpositive(T x) {
  constexpr bool dbl = sizeof(T) == 8;
  using I = std::conditional_t<dbl, int64_t, int32_t>;
  constexpr T lo = dbl ? T(-708.0) : T(-87.0);
  constexpr T magic = dbl ? T(6755399441055744.0) : T(12582912.0);  // 1.5 * 2^52, 1.5 * 2^23: rounds to int
  constexpr T log2e = T(1.4426950408889634), ln2_hi = T(0.693145751953125), ln2_lo = T(1.4286068203094173e-06);
  x = std::max(x, lo);
  const T t = x * log2e + magic;
  const T n = t - magic;
  const T r = (x - n * ln2_hi) - n * ln2_lo;
  // Horner in the 1 / j! (straight-line: a loop here stops the vectoriser).
  T p;
  if constexpr (dbl) {
    p = T(2.08767569878680990e-09);
    p = p * r + T(2.50521083854417188e-08);
    p = p * r + T(2.75573192239858907e-07);
    p = p * r + T(2.75573192239858907e-06);
    p = p * r + T(2.48015873015873016e-05);
    p = p * r + T(1.98412698412698413e-04);
  } else {
    p = T(1.98412698412698413e-04);
  }
  p = p * r + T(1.38888888888888889e-03);
  p = p * r + T(8.33333333333333333e-03);
  p = p * r + T(4.16666666666666667e-02);
  p = p * r + T(1.66666666666666667e-01);
  p = p * r + T(0.5);
  p = p * r + T(1);
  p = p * r + T(1);
  const I k = std::bit_cast<I>(t) - std::bit_cast<I>(magic);
  return p * std::bit_cast<T>(static_cast<I>((k + (dbl ? 1023 : 127)) << (dbl ? 52 : 23)));
}

// Per-pair sizes and the pointers of one token.
struct Dims {
  int64_t n, out, in, Dg;
  int side;
};

template <typename T>
struct Token {
  const T *d, *a, *h, *e, *al, *m;  // [out], [in], [in], [Dg] x 3 (m null for GD)
};

template <typename T>
Token<T> token(const Dims& D, const T* d, const T* a, const T* h, const T* e, const T* al, const T* m, int64_t t) {
  return {d + t * D.out, a + t * D.in, h + t * D.in, e + t * D.Dg, al + t * D.Dg, m ? m + t * D.Dg : nullptr};
}

// Row o of Z_t (and S_t) from the previous state (Eqs. 4.1-4.2 with G_t = d_t a_t^T); zp may equal z.
// Side 1 takes ea = e (.) a, the gated input side.
template <typename T, bool Mom>
inline void update_row(const Dims& D, const Token<T>& k, const T* ea, int64_t o, const T* zp, T* z, const T* sp,
                       T* s) {
  const int64_t in = D.in;
  if (D.side == 0) {
    const int64_t gi = D.Dg > 1 ? o : 0;
    const T coef = k.e[gi] * k.d[o], al = k.al[gi];
    if constexpr (Mom) {
      const T m = k.m[gi];
#pragma omp simd
      for (int64_t i = 0; i < in; ++i) {
        s[i] = momentum_step(m, sp[i], coef * k.a[i]);
        z[i] = momentum_apply(al, zp[i], s[i]);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < in; ++i) z[i] = gd_step(al, zp[i], coef * k.a[i]);
    }
    return;
  }
  const T dv = k.d[o];
  if constexpr (Mom) {
#pragma omp simd
    for (int64_t i = 0; i < in; ++i) {
      s[i] = momentum_step(k.m[i], sp[i], dv * ea[i]);
      z[i] = momentum_apply(k.al[i], zp[i], s[i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < in; ++i) z[i] = gd_step(k.al[i], zp[i], dv * ea[i]);
  }
}

// sum_i phi(z)_i h_i for one row; phi(z) goes to w for the elementwise links. l_q returns the raw read
// sum z h and adds sum |z|^q to `norm` (the normaliser is applied once the whole tensor is known).
template <typename T, Retention R, int QN>
inline T read_row(const Link<T>& lk, const T* z, const T* h, T* w, int64_t in, T& norm) {
  T acc = 0;
  if constexpr (R == Retention::Kl) {  // c softmax(z) (Eq. 3.6)
    // The row max in 8 independent lanes (one running max is a chain of dependent instructions).
    constexpr int64_t lanes = 8;
    T part[lanes];
    for (int64_t j = 0; j < lanes; ++j) part[j] = -std::numeric_limits<T>::infinity();
    int64_t i0 = 0;
    for (; i0 + lanes <= in; i0 += lanes) {
      for (int64_t j = 0; j < lanes; ++j) part[j] = z[i0 + j] > part[j] ? z[i0 + j] : part[j];
    }
    for (; i0 < in; ++i0) part[0] = z[i0] > part[0] ? z[i0] : part[0];
    T mx = part[0];
    for (int64_t j = 1; j < lanes; ++j) mx = std::max(mx, part[j]);
    T sum = 0;
#pragma omp simd reduction(+ : sum, acc)
    for (int64_t i = 0; i < in; ++i) {
      const T x = exp_nonpositive(z[i] - mx);
      w[i] = x;
      sum += x;
      acc += x * h[i];
    }
    const T scale = lk.c / sum;
#pragma omp simd
    for (int64_t i = 0; i < in; ++i) w[i] *= scale;
    return acc * scale;
  } else if constexpr (R == Retention::Lq) {
    T nrm = 0;
#pragma omp simd reduction(+ : nrm, acc)
    for (int64_t i = 0; i < in; ++i) {
      nrm += pow_q<QN>(lk, z[i]);
      acc += z[i] * h[i];
    }
    norm += nrm;
    return acc;
  } else if constexpr (R == Retention::ElasticNet) {  // Eq. 3.7
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < in; ++i) {
      const T x = soft_threshold(z[i], lk.gamma);
      w[i] = x;
      acc += x * h[i];
    }
    return acc;
  } else if constexpr (R == Retention::Sigmoid) {  // Eq. 3.8
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < in; ++i) {
      const T e = exp_nonpositive(-std::abs(z[i]));  // sigmoid(z) = 1 / (1 + e^-z), without overflow
      const T x = z[i] >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
      w[i] = x;
      acc += x * h[i];
    }
    return acc;
  } else {  // W = Z
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < in; ++i) acc += z[i] * h[i];
    return acc;
  }
}

template <Retention R>
constexpr bool stores_w() {
  return R == Retention::Kl || R == Retention::ElasticNet || R == Retention::Sigmoid;
}

// One token: the state from zp/sp into z/s (the same buffers in the plain forward) and the reads into u [out]:
// W_t h_t, or for l_q the raw reads Z_t h_t, sum |Z_t|^q returned (0 for the other links). Elementwise links
// write W_t into w ([out, in] when w_rows, else a row scratch).
template <typename T, Retention R, bool Mom, int QN>
T step(const Dims& D, const Link<T>& lk, const Token<T>& k, const T* zp, T* z, const T* sp, T* s, T* w,
       bool w_rows, T* ea, T* u) {
  if (D.side == 1) {
    for (int64_t i = 0; i < D.in; ++i) ea[i] = k.e[i] * k.a[i];
  }
  T norm = 0;
  for (int64_t o = 0; o < D.out; ++o) {
    const int64_t off = o * D.in;
    update_row<T, Mom>(D, k, ea, o, zp + off, z + off, Mom ? sp + off : nullptr, Mom ? s + off : nullptr);
    u[o] = read_row<T, R, QN>(lk, z + off, k.h, w_rows ? w + off : w, D.in, norm);
  }
  return R == Retention::Lq ? norm : T(0);
}

// Contiguous [G, ...] views of the inputs, alpha filled with ones when absent.
struct Prepared {
  at::Tensor z0, s0, d, a, h, e, alpha, m;
  Dims D;
};

Prepared prepare(const LoopInputs& in) {
  Prepared P;
  auto c = [](const at::Tensor& x) { return x.defined() ? x.contiguous() : x; };
  P.z0 = c(in.z0);
  P.s0 = c(in.s0);
  P.d = c(in.d);
  P.a = c(in.a);
  P.h = c(in.h);
  P.e = c(in.e);
  P.alpha = in.alpha.defined() ? c(in.alpha) : at::ones_like(P.e);
  P.m = c(in.m);
  P.D = Dims{P.d.size(1), P.z0.size(1), P.z0.size(2), P.e.size(2), in.side};
  return P;
}

template <typename T>
const T* ptr(const at::Tensor& x, int64_t g, int64_t per) {
  return x.defined() ? x.const_data_ptr<T>() + g * per : nullptr;
}
template <typename T>
T* mptr(at::Tensor& x, int64_t g, int64_t per) {
  return x.defined() ? x.mutable_data_ptr<T>() + g * per : nullptr;
}

// A buffer per thread reused across calls: large blocks stay mapped instead of being faulted in each time.
template <typename T>
T* workspace(size_t count) {
  thread_local std::vector<double> buf;
  const size_t words = (count * sizeof(T) + sizeof(double) - 1) / sizeof(double);
  if (buf.size() < words) buf.resize(words);
  return reinterpret_cast<T*>(buf.data());
}

template <typename T, Retention R, bool Mom, int QN>
void forward_pairs(const Link<T>& lk, Prepared& P, LoopForward& f) {
  const Dims& D = P.D;
  const int64_t G = P.d.size(0), W = D.out * D.in;
  T* ea = workspace<T>(2 * static_cast<size_t>(D.in));
  T* wrow = ea + D.in;
  for (int64_t g = 0; g < G; ++g) {
    T* z = mptr<T>(f.z, g, W);
    T* s = Mom ? mptr<T>(f.s, g, W) : nullptr;
    const T *d = ptr<T>(P.d, g, D.n * D.out), *a = ptr<T>(P.a, g, D.n * D.in), *h = ptr<T>(P.h, g, D.n * D.in);
    const T *e = ptr<T>(P.e, g, D.n * D.Dg), *al = ptr<T>(P.alpha, g, D.n * D.Dg);
    const T* m = Mom ? ptr<T>(P.m, g, D.n * D.Dg) : nullptr;
    T* u = mptr<T>(f.u, g, D.n * D.out);
    for (int64_t t = 0; t < D.n; ++t) {
      T* ut = u + t * D.out;
      const T norm = step<T, R, Mom, QN>(D, lk, token(D, d, a, h, e, al, m, t), z, z, s, s, wrow, false, ea, ut);
      if constexpr (R == Retention::Lq) {  // W_t = Z_t / N_t^g (Eq. 3.5)
        const T r = lq_scale(norm, lk.weight, lk.floor, lk.q).s;
        for (int64_t o = 0; o < D.out; ++o) ut[o] *= r;
      }
    }
  }
}

// Calls f(R, Mom, QN) with the spec's link, algorithm and (l_q) the order's fast path (pow_q), as
// compile-time constants.
template <typename F>
void dispatch(const MemoryParams& p, F&& f) {
  using Lq = std::integral_constant<Retention, Retention::Lq>;
  auto with = [&](auto r, auto qn) {
    if (p.momentum()) {
      f(r, std::true_type{}, qn);
    } else {
      f(r, std::false_type{}, qn);
    }
  };
  auto plain = [&](auto r) { with(r, std::integral_constant<int, 0>{}); };
  switch (p.retention) {
    case Retention::Lq:
      if (p.norm_order == 4.0) return with(Lq{}, std::integral_constant<int, 4>{});
      if (p.norm_order == 3.0) return with(Lq{}, std::integral_constant<int, 3>{});
      return plain(Lq{});
    case Retention::Kl:
      return plain(std::integral_constant<Retention, Retention::Kl>{});
    case Retention::ElasticNet:
      return plain(std::integral_constant<Retention, Retention::ElasticNet>{});
    case Retention::Sigmoid:
      return plain(std::integral_constant<Retention, Retention::Sigmoid>{});
    case Retention::None:
    case Retention::L2:
      return plain(std::integral_constant<Retention, Retention::L2>{});
  }
}

// The reverse walk (Eq. 9.6) for one pair. X = dL/dZ_t, Y = dL/dS_t from later tokens, both [out, in].
template <typename T, Retention R, bool Mom, int QN>
void backward_pair(const Link<T>& lk, const Dims& D, const Token<T>* toks, const T* Zs, const T* Ss, const T* Ws,
                   const T* U, const T* Nq, const T* du, T* X, T* Y, T* dh, T* dd, T* da, T* de, T* dal, T* dm,
                   T* vd, T* vrow, T* ea) {
  const int64_t W = D.out * D.in, in = D.in;
  for (int64_t t = D.n; t-- > 0;) {
    const Token<T>& k = toks[t];
    const T* z = Zs + (t + 1) * W;
    const T* zp = Zs + t * W;
    const T* sp = Mom ? Ss + t * W : nullptr;
    const T* w = stores_w<R>() ? Ws + t * W : nullptr;
    const T* dut = du + t * D.out;
    const T* ut = U + t * D.out;
    T *dht = dh + t * in, *ddt = dd + t * D.out, *dat = da + t * in;
    T *det = de + t * D.Dg, *dalt = dal + t * D.Dg, *dmt = Mom ? dm + t * D.Dg : nullptr;
    // l_q: u = r raw with r = N^{-g}; dL/dZ = r du h^T + ct |Z|^{q-2} Z, ct = -g q N^{-g-1} <du, raw> (Eq. 9.3).
    T r = 1, ct = 0;
    if constexpr (R == Retention::Lq) {
      const LqScale<T> scale = lq_scale(Nq[t], lk.weight, lk.floor, lk.q);
      r = scale.s;
      T dot = 0;
      for (int64_t o = 0; o < D.out; ++o) dot += dut[o] * ut[o];
      ct = -scale.coef * dot;
    }
    if (D.side == 1) {
      std::fill(vd, vd + in, T(0));
      for (int64_t i = 0; i < in; ++i) ea[i] = k.e[i] * k.a[i];
    }
    for (int64_t o = 0; o < D.out; ++o) {
      const int64_t off = o * in;
      const T duo = dut[o];
      const T rdu = r * duo;
      // KL: dZ = w du (h - sh), sh = (softmax(z) . h) = u / c.
      const T sh = R == Retention::Kl ? ut[o] / lk.c : T(0);
      const T* zr = z + off;
      const T* zpr = zp + off;
      const T* spr = Mom ? sp + off : nullptr;
      const T* wr = w ? w + off : nullptr;
      T* xr = X + off;
      T* yr = Mom ? Y + off : nullptr;
      // dL/dZ_t[o, i] from the read at t (Eq. 9.3), and W_t[o, i] (for dh = W_t^T du).
      auto direct = [&](int64_t i) -> T {
        if constexpr (R == Retention::Lq) return rdu * k.h[i] + ct * pow_q1<QN>(lk, zr[i]);
        if constexpr (R == Retention::Kl) return wr[i] * duo * (k.h[i] - sh);
        if constexpr (R == Retention::ElasticNet) return wr[i] != T(0) ? duo * k.h[i] : T(0);
        if constexpr (R == Retention::Sigmoid) return duo * k.h[i] * wr[i] * (T(1) - wr[i]);
        return duo * k.h[i];
      };
      auto weight = [&](int64_t i) -> T {
        if constexpr (R == Retention::Lq) return r * zr[i];
        if constexpr (stores_w<R>()) return wr[i];
        return zr[i];
      };
      if (D.side == 0) {
        const int64_t gi = D.Dg > 1 ? o : 0;
        const T eo = k.e[gi], alo = k.al[gi], mo = Mom ? k.m[gi] : T(0), dv = k.d[o];
        const T ed = eo * dv;
        T ra = 0, rz = 0, rs = 0;
#pragma omp simd reduction(+ : ra, rz, rs)
        for (int64_t i = 0; i < in; ++i) {
          const T x = xr[i] + direct(i);
          dht[i] += weight(i) * duo;
          const T v = Mom ? yr[i] + x : x;
          ra += v * k.a[i];
          rz += x * zpr[i];
          if constexpr (Mom) rs += v * spr[i];
          dat[i] -= ed * v;
          xr[i] = alo * x;
          if constexpr (Mom) yr[i] = mo * v;
        }
        ddt[o] -= eo * ra;
        det[gi] -= dv * ra;
        dalt[gi] += rz;
        if constexpr (Mom) dmt[gi] += rs;
      } else {
        const T dv = k.d[o];
        // V goes to a row scratch and is reduced after: a reduction here stops the vectoriser (GCC 12).
#pragma omp simd
        for (int64_t i = 0; i < in; ++i) {
          const T x = xr[i] + direct(i);
          dht[i] += weight(i) * duo;
          const T v = Mom ? yr[i] + x : x;
          vrow[i] = v;
          vd[i] += v * dv;
          dalt[i] += x * zpr[i];
          if constexpr (Mom) dmt[i] += v * spr[i];
          xr[i] = k.al[i] * x;
          if constexpr (Mom) yr[i] = k.m[i] * v;
        }
        T rd = 0;
#pragma omp simd reduction(+ : rd)
        for (int64_t i = 0; i < in; ++i) rd += vrow[i] * ea[i];
        ddt[o] -= rd;
      }
    }
    if (D.side == 1) {
      for (int64_t i = 0; i < in; ++i) {
        dat[i] -= k.e[i] * vd[i];
        det[i] -= k.a[i] * vd[i];
      }
    }
  }
}

template <typename T, Retention R, bool Mom, int QN>
void backward_pairs(const Link<T>& lk, Prepared& P, const at::Tensor& du, const at::Tensor& gz,
                    const at::Tensor& gs, LoopGrads& out) {
  const Dims& D = P.D;
  const int64_t G = P.d.size(0), W = D.out * D.in, n = D.n;
  // Recomputed states Z_0..Z_n (S_0..S_n), weights W_1..W_n, reads, and scratch.
  const size_t zsz = static_cast<size_t>((n + 1) * W);
  const size_t total = zsz * (Mom ? 2 : 1) + (stores_w<R>() ? static_cast<size_t>(n * W) : 0) +
                       static_cast<size_t>(n * D.out + n + 3 * D.in);
  T* Zs = workspace<T>(total);
  T* Ss = Mom ? Zs + zsz : nullptr;
  T* Ws = (Mom ? Ss + zsz : Zs + zsz);
  T* U = Ws + (stores_w<R>() ? n * W : 0);
  T* Nq = U + n * D.out;
  T* ea = Nq + n;
  T* vd = ea + D.in;
  T* vrow = vd + D.in;
  std::vector<Token<T>> toks(static_cast<size_t>(n));
  for (int64_t g = 0; g < G; ++g) {
    const T *d = ptr<T>(P.d, g, n * D.out), *a = ptr<T>(P.a, g, n * D.in), *h = ptr<T>(P.h, g, n * D.in);
    const T *e = ptr<T>(P.e, g, n * D.Dg), *al = ptr<T>(P.alpha, g, n * D.Dg);
    const T* m = Mom ? ptr<T>(P.m, g, n * D.Dg) : nullptr;
    std::memcpy(Zs, ptr<T>(P.z0, g, W), sizeof(T) * W);
    if constexpr (Mom) std::memcpy(Ss, ptr<T>(P.s0, g, W), sizeof(T) * W);
    for (int64_t t = 0; t < n; ++t) {
      toks[t] = token(D, d, a, h, e, al, m, t);
      T* s_prev = Mom ? Ss + t * W : nullptr;
      T* s_next = Mom ? Ss + (t + 1) * W : nullptr;
      // U keeps the reads (l_q: before the normaliser).
      T* w = stores_w<R>() ? Ws + t * W : nullptr;
      Nq[t] = step<T, R, Mom, QN>(D, lk, toks[t], Zs + t * W, Zs + (t + 1) * W, s_prev, s_next, w, stores_w<R>(),
                                  ea, U + t * D.out);
    }
    T* X = mptr<T>(out.z0, g, W);
    T* Y = Mom ? mptr<T>(out.s0, g, W) : nullptr;
    if (gz.defined()) std::memcpy(X, ptr<T>(gz, g, W), sizeof(T) * W);
    if (Mom && gs.defined()) std::memcpy(Y, ptr<T>(gs, g, W), sizeof(T) * W);
    backward_pair<T, R, Mom, QN>(lk, D, toks.data(), Zs, Ss, Ws, U, Nq, ptr<T>(du, g, n * D.out), X, Y,
                                 mptr<T>(out.h, g, n * D.in), mptr<T>(out.d, g, n * D.out),
                                 mptr<T>(out.a, g, n * D.in), mptr<T>(out.e, g, n * D.Dg),
                                 mptr<T>(out.alpha, g, n * D.Dg), Mom ? mptr<T>(out.m, g, n * D.Dg) : nullptr, vd,
                                 vrow, ea);
  }
}

}  // namespace

LoopForward token_loop_forward(const MemoryParams& p, const LoopInputs& in) {
  Prepared P = prepare(in);
  LoopForward f;
  f.u = at::empty({P.d.size(0), P.D.n, P.D.out}, P.d.options());
  f.z = P.z0.clone();
  if (p.momentum()) f.s = P.s0.clone();
  AT_DISPATCH_FLOATING_TYPES(P.d.scalar_type(), "miras_ext::memory token loop", [&] {
    const Link<scalar_t> lk = make_link<scalar_t>(p, P.D.out, P.D.in);
    dispatch(p, [&](auto r, auto mom, auto qn) {
      forward_pairs<scalar_t, decltype(r)::value, decltype(mom)::value, decltype(qn)::value>(lk, P, f);
    });
  });
  return f;
}

LoopGrads token_loop_backward(const MemoryParams& p, const LoopInputs& in, const at::Tensor& du,
                              const at::Tensor& gz, const at::Tensor& gs) {
  Prepared P = prepare(in);
  LoopGrads out;
  out.h = at::zeros_like(P.h);
  out.z0 = at::zeros_like(P.z0);
  if (p.momentum()) {
    out.s0 = at::zeros_like(P.z0);
    out.m = at::zeros_like(P.e);
  }
  out.d = at::zeros_like(P.d);
  out.a = at::zeros_like(P.a);
  out.e = at::zeros_like(P.e);
  out.alpha = at::zeros_like(P.e);
  const at::Tensor duc = du.contiguous();
  const at::Tensor gzc = gz.defined() ? gz.contiguous() : gz;
  const at::Tensor gsc = gs.defined() ? gs.contiguous() : gs;
  AT_DISPATCH_FLOATING_TYPES(P.d.scalar_type(), "miras_ext::memory token loop backward", [&] {
    const Link<scalar_t> lk = make_link<scalar_t>(p, P.D.out, P.D.in);
    dispatch(p, [&](auto r, auto mom, auto qn) {
      backward_pairs<scalar_t, decltype(r)::value, decltype(mom)::value, decltype(qn)::value>(lk, P, duc, gzc,
                                                                                              gsc, out);
    });
  });
  return out;
}

}  // namespace miras::chunk
