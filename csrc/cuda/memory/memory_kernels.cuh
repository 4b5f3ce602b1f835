// CUDA kernels of miras_ext::memory_chunk_fwd / memory_chunk_bwd (docs/math.md Sections 4-5 and 9; docs/cuda.md
// for the design). A block takes one (sequence, head) pair at a time and walks its runs of tokens sharing an anchor
// (Eq. 5.6). Within a run the gradients at the anchor are taken for all tokens at once (Eqs. 5.1-5.5);
// the state then advances token by token, Z_t = alpha_t Z_{t-1} - eta_t G_t or, with momentum,
// S_t = m_t S_{t-1} - eta_t G_t, Z_t = alpha_t Z_{t-1} + S_t (the recurrences that Eqs. 5.8-5.9 sum), and
// each token reads phi(Z_t) exactly (Eqs. 4.3, 5.11). The backward recomputes a run from its checkpoint,
// keeps Z_t for every token of the run, and walks it in reverse, then differentiates the gradients at the
// anchor (second order, Eq. 9.4); Eq. 9.6 writes this token recurrence out. The exact delta rule
// (KernelSpec::exact) replaces the anchor's gradients by the exact residuals (Eqs. 5.13-5.19). State and
// arithmetic are in A (float, or double for double inputs).
// Launch code lives in memory_launch.inc only, so that the CPU emulator can run these kernels.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/algorithm.h"
#include "common/factored_floor.h"
#include "cuda/acc_types.cuh"
#include "cuda/memory/block_gemm.cuh"
#include "cuda/memory/block_ops.cuh"
#include "cuda/memory/link.cuh"
#include "cuda/memory/memory_args.h"

namespace miras::cuda {

enum GateKind : int { kLr = 0, kAlpha = 1, kMom = 2, kCum = 3 };

// Everything one block needs: its sequence and head, the spec, and pointers into its workspace.
template <typename T, typename A>
struct MemoryBlock {
  static_assert(std::is_same_v<A, acc_of<T>>, "the state type is the accumulation type of the inputs");
  const MemoryArgs<T, A>& args;
  const KernelSpec& sp;
  int64_t seq, head, batch;
  int L, Dk, Dv, Dg, ins, outs;
  int64_t W;
  int64_t woff[kMaxLayers];
  int insoff[kMaxLayers], outoff[kMaxLayers];
  Workspace lay;
  A* ws;
  BiasParams<A> bp;

  __device__ MemoryBlock(const MemoryArgs<T, A>& a, bool backward, int64_t item) : args(a), sp(a.spec) {
    seq = item / a.H;
    head = item % a.H;
    batch = a.batch[seq];
    L = sp.layers;
    Dk = sp.dims[0];
    Dv = sp.dims[L];
    Dg = sp.dg();
    W = 0;
    ins = outs = 0;
    for (int l = 0; l < L; ++l) {
      woff[l] = W;
      insoff[l] = ins;
      outoff[l] = outs;
      W += sp.size(l);
      ins += sp.dims[l];
      outs += sp.dims[l + 1];
    }
    lay = workspace_layout(sp, a.max_run, backward);
    ws = a.work + blockIdx.x * a.work_stride;
    bp = BiasParams<A>{sp.bias, A(sp.p), A(sp.eps)};
  }

  __device__ int64_t max_run() const { return args.max_run; }

  __device__ int out_of(int l) const { return sp.dims[l + 1]; }
  __device__ int in_of(int l) const { return sp.dims[l]; }
  __device__ int64_t state_row(int l) const { return (seq * args.H + head) * sp.size(l); }
  __device__ int64_t ck_row(int l, int64_t row) const { return (row * args.H + head) * sp.size(l); }
  __device__ int64_t token(int64_t t) const { return (batch * args.T_len + t) * args.H + head; }

  // This pair's rows of per-layer tensors: states [N*H, *shape] (row < 0) or checkpoints [S_max*H, *shape]
  // at checkpoint row `row`; null where a tensor is absent (momentum of GD).
  __device__ void rows_of(A* const base[], int64_t row, A* out[]) const {
    for (int l = 0; l < L; ++l) {
      out[l] = base[l] == nullptr ? nullptr : base[l] + (row < 0 ? state_row(l) : ck_row(l, row));
    }
  }

  // Per-token arrays of the workspace.
  __device__ A* acts(int t, int l) const { return ws + lay.acts + int64_t(t) * ins + insoff[l]; }
  __device__ A* back(int t, int l) const { return ws + lay.back + int64_t(t) * ins + insoff[l]; }
  __device__ A* pre(int t, int l) const { return ws + lay.pre + int64_t(t) * outs + outoff[l]; }
  __device__ A* deltas(int t, int l) const { return ws + lay.deltas + int64_t(t) * outs + outoff[l]; }
  __device__ A* rin(int t, int l) const { return ws + lay.rin + int64_t(t) * ins + insoff[l]; }
  __device__ A* rpre(int t, int l) const { return ws + lay.rpre + int64_t(t) * outs + outoff[l]; }
  __device__ A* dd(int t, int l) const { return ws + lay.dd + int64_t(t) * outs + outoff[l]; }
  __device__ A* dpre(int t, int l) const { return ws + lay.dpre + int64_t(t) * outs + outoff[l]; }
  __device__ A* tmp(int t, int l) const { return ws + lay.tmp + int64_t(t) * outs + outoff[l]; }
  __device__ A* da(int t, int l) const { return ws + lay.da + int64_t(t) * ins + insoff[l]; }
  __device__ A* yv(int t) const { return ws + lay.y + int64_t(t) * Dv; }
  __device__ A* gv(int t) const { return ws + lay.g + int64_t(t) * Dv; }
  __device__ A* vec(int k) const { return ws + lay.vec + int64_t(k) * sp.widest(); }
  __device__ A* rows(int l) const { return ws + lay.rows + 2 * outoff[l]; }
  __device__ A* gate(int kind, int t) const { return ws + lay.gates + (int64_t(kind) * max_run() + t) * Dg; }
  __device__ A* dgate(int kind, int t) const { return ws + lay.dgates + (int64_t(kind) * max_run() + t) * Dg; }
  __device__ A* state_t(int t) const { return ws + lay.states + int64_t(t) * W; }
  __device__ A* mom_t(int t) const { return ws + lay.states + (max_run() + t) * W; }

  // Gate channel of element (i, j) of weight l (Eq. 3.4).
  __device__ int channel(int l, int i, int j) const { return sp.per_channel ? (sp.side(l) == 0 ? i : j) : 0; }

  // ------------------------------------------------------------------------------------------------------
  // Gates of a run: lr, alpha (1 without retention), momentum (0 for GD) and A_t = prod_{s <= t} alpha_s.
  __device__ void load_gates(int64_t t0, int n) const {
    for (int c = threadIdx.x; c < Dg; c += blockDim.x) {
      A cum = 1;
      for (int t = 0; t < n; ++t) {
        const int64_t g = token(t0 + t) * Dg + c;
        const A al = sp.has_alpha ? args.alpha[g] : A(1);
        cum *= al;
        gate(kLr, t)[c] = args.lr[g];
        gate(kAlpha, t)[c] = al;
        gate(kMom, t)[c] = sp.momentum ? args.mom[g] : A(0);
        gate(kCum, t)[c] = cum;
      }
    }
    __syncthreads();
  }

  // The anchor weights phi(anchor), materialised in the workspace unless the link is the identity.
  __device__ void anchor_weights(A* const anc[], const A* wb[]) const {
    for (int l = 0; l < L; ++l) {
      if (!has_link(sp.retention)) {
        wb[l] = anc[l];
        continue;
      }
      A* w = ws + lay.wb + woff[l];
      const LinkStats<A> st = link_stats(sp, anc[l], out_of(l), in_of(l), rows(l));
      for (int64_t e = threadIdx.x; e < sp.size(l); e += blockDim.x) w[e] = phi(sp, st, anc[l][e], int(e / in_of(l)));
      __syncthreads();
      wb[l] = w;
    }
  }

  // ------------------------------------------------------------------------------------------------------
  // The keys of the run's tokens, the first layer's inputs of their gradients.
  __device__ void load_keys(int64_t t0, int n) const {
    for (int p = threadIdx.x; p < n * Dk; p += blockDim.x) {
      acts(p / Dk, 0)[p % Dk] = to_acc(args.k[token(t0 + p / Dk) * Dk + p % Dk]);
    }
    __syncthreads();
  }

  // The gradients at the anchor for the n tokens of a run (Eqs. 5.1-5.5): layer inputs, pre-activations,
  // prediction y, bias gradient g and the deltas, kept in the workspace.
  __device__ void anchor_pass(int64_t t0, int n, const A* const wb[]) const {
    load_keys(t0, n);
    for (int l = 0; l < L; ++l) {
      const A* w = wb[l];
      const int in = in_of(l), out = out_of(l);
      // The prediction y feeds the bias's nonlinear gradient, whose Hessian (Yaad's, l_p's) amplifies its
      // rounding: products of the anchor pass keep the state's precision (split operands on tensor cores).
      gemm(acts(0, l), ins, false, w, in, true, pre(0, l), outs, n, out, in, false, false, true);  // a W^T
      if (sp.retained) {  // Eq. 5.2
        for (int p = threadIdx.x; p < n * out; p += blockDim.x) {
          pre(p / out, l)[p % out] *= gate(kCum, p / out)[sp.per_channel ? p % out : 0];
        }
        __syncthreads();
      }
      if (l + 1 < L) {
        for (int p = threadIdx.x; p < n * out; p += blockDim.x) {
          acts(p / out, l + 1)[p % out] = act(sp.gelu != 0, pre(p / out, l)[p % out]);
        }
        __syncthreads();
      }
    }
    for (int t = threadIdx.x / kWarp; t < n; t += kMemoryWarps) {
      const int64_t tok = token(t0 + t);
      const A* u = pre(t, L - 1);
      if (sp.residual) {
        row_layer_norm(u, acts(t, 0), yv(t), Dv, A(sp.ln_eps));
      } else {
        for (int j = threadIdx.x % kWarp; j < Dv; j += kWarp) yv(t)[j] = u[j];
      }
      __syncwarp();
      row_bias_grad(bp, sp.delta_layout, yv(t), args.v + tok * Dv, delta_ptr(tok), gv(t), Dv);
      __syncwarp();
      if (sp.residual) {
        row_layer_norm_backward(u, gv(t), deltas(t, L - 1), Dv, A(sp.ln_eps), false);
      } else {
        for (int j = threadIdx.x % kWarp; j < Dv; j += kWarp) deltas(t, L - 1)[j] = gv(t)[j];
      }
    }
    __syncthreads();
    for (int l = L - 1; l > 0; --l) {  // Eq. 5.4
      const A* w = wb[l];
      const int in = in_of(l), out = out_of(l);
      gemm(deltas(0, l), outs, false, w, in, false, back(0, l), ins, n, in, out, false, false, true);  // delta W
      for (int p = threadIdx.x; p < n * in; p += blockDim.x) {
        const int t = p / in, j = p % in;
        deltas(t, l - 1)[j] = back(t, l)[j] * act_grad(sp.gelu != 0, pre(t, l - 1)[j]);
      }
      __syncthreads();
    }
  }

  __device__ const A* delta_ptr(int64_t tok) const {
    if (sp.delta_layout == DeltaLayout::none) return nullptr;
    return args.delta + tok * (sp.delta_layout == DeltaLayout::per_channel ? Dv : 1);
  }

  // The exact delta rule (sp.exact, Eq. 5.13; matrix memory, rows gated): token t's residual at the previous
  // state z, r_t = alpha'_t (.) (Z_{t-1} k_t) - v_t with alpha'_t = alpha_t for grad_at_retained (else 1), into
  // deltas(t, 0) in place of the anchor pass's gradient. A warp per row.
  __device__ A retained_gate(int t, int i) const {
    return sp.retained ? gate(kAlpha, t)[sp.per_channel ? i : 0] : A(1);
  }
  __device__ void exact_residual(int64_t t0, int t, const A* z) const {
    const int64_t tok = token(t0 + t);
    const A* k = acts(t, 0);
    const int lane = threadIdx.x % kWarp;
    for (int i = threadIdx.x / kWarp; i < Dv; i += kMemoryWarps) {
      A dot = 0;
      for (int j = lane; j < Dk; j += kWarp) dot += z[int64_t(i) * Dk + j] * k[j];
      dot = warp_sum(dot);
      if (lane == 0) deltas(t, 0)[i] = retained_gate(t, i) * dot - to_acc(args.v[tok * Dv + i]);
    }
    __syncthreads();
  }

  // exact_residual reversed (Eq. 9.6's exact form): dd(t, 0) holds dL/dr_t; adds alpha'_t dr k^T to gz
  // (dL/dZ_{t-1}), alpha'_t Z_{t-1}^T dr to da(t, 0) and, for grad_at_retained, <dr, Z_{t-1} k_t> to alpha_t's
  // gradient; writes dv = -dr.
  __device__ void exact_residual_backward(int64_t t0, int t, const A* z, A* gz) const {
    const int64_t tok = token(t0 + t);
    const A* k = acts(t, 0);
    const A* dr = dd(t, 0);
    A* dal = dgate(kAlpha, t);
    const int lane = threadIdx.x % kWarp;
    A part = 0;
    for (int i = threadIdx.x / kWarp; i < Dv; i += kMemoryWarps) {
      const A g = retained_gate(t, i) * dr[i];
      A dot = 0;
      for (int j = lane; j < Dk; j += kWarp) {
        const int64_t x = int64_t(i) * Dk + j;
        dot += z[x] * k[j];
        gz[x] += g * k[j];
      }
      dot = warp_sum(dot);
      if (lane == 0) {
        args.dv[tok * Dv + i] = from_acc<T>(-dr[i]);
        if (sp.per_channel) {
          if (sp.retained) dal[i] += dr[i] * dot;
        } else {
          part += dr[i] * dot;
        }
      }
    }
    if (sp.retained && !sp.per_channel) {
      part = block_sum(part);
      if (threadIdx.x == 0) dal[0] += part;
    }
    for (int j = threadIdx.x; j < Dk; j += blockDim.x) {
      A s = 0;
      for (int i = 0; i < Dv; ++i) s += retained_gate(t, i) * z[int64_t(i) * Dk + j] * dr[i];
      da(t, 0)[j] += s;
    }
    __syncthreads();
  }

  // Token t of the token loop: each weight tensor steps from src to dst (which may alias) by Eq. 4.1 or 4.2,
  // and the read (Eq. 4.3) at phi(Z_t) follows in the same pass: a warp updates a row and takes its dot
  // product with the layer's input at once (KL by an online softmax, l_q scaled by its norm afterwards).
  // Keeps the read's inputs and pre-activations (rin, rpre); writes o when `write` (the forward).
  __device__ void token_step(int64_t t0, int t, const A* const zsrc[], A* const zdst[], const A* const ssrc[],
                             A* const sdst[], bool write) const {
    using std::exp;
    using std::pow;
    using std::sqrt;
    const int64_t tok = token(t0 + t);
    const A* e = gate(kLr, t);
    const A* al = gate(kAlpha, t);
    const A* m = gate(kMom, t);
    if (sp.exact) exact_residual(t0, t, zsrc[0]);
    for (int j = threadIdx.x; j < Dk; j += blockDim.x) rin(t, 0)[j] = A(sp.scale) * to_acc(args.q[tok * Dk + j]);
    __syncthreads();
    const int lane = threadIdx.x % kWarp;
    for (int l = 0; l < L; ++l) {
      const int in = in_of(l), out = out_of(l);
      const A* d = deltas(t, l);
      const A* a = acts(t, l);
      const A* h = rin(t, l);
      A* u = rpre(t, l);
      const LinkStats<A> none{};
      A norm_part = 0;  // l_q: sum |Z_t|^q
      for (int i = threadIdx.x / kWarp; i < out; i += kMemoryWarps) {
        A dot = 0, top = -INFINITY, mass = 0;  // KL: running max and sum exp(z - top) of the lane's entries
        for (int j = lane; j < in; j += kWarp) {
          const int64_t x = int64_t(i) * in + j;
          const int c = channel(l, i, j);
          const A grad = d[i] * a[j];
          A z = zsrc[l][x];
          if (sp.momentum) {
            const A sv = momentum_step(m[c], ssrc[l][x], e[c] * grad);
            sdst[l][x] = sv;
            z = momentum_apply(al[c], z, sv);
          } else {
            z = gd_step(al[c], z, e[c] * grad);
          }
          zdst[l][x] = z;
          if (sp.retention == Retention::Kl) {
            if (z > top) {
              const A shrink = exp(top - z);
              mass = mass * shrink + A(1);
              dot = dot * shrink + h[j];
              top = z;
            } else {
              const A w = exp(z - top);
              mass += w;
              dot += w * h[j];
            }
          } else {
            if (sp.retention == Retention::Lq) norm_part += pow(std::abs(z), A(sp.norm_order));
            dot += (sp.retention == Retention::Lq ? z : phi(sp, none, z, i)) * h[j];
          }
        }
        if (sp.retention == Retention::Kl) {
          const A row_top = warp_max(top);
          const A w = top == -INFINITY ? A(0) : exp(top - row_top);
          mass = warp_sum(mass * w);
          dot = warp_sum(dot * w);
          const A c = simplex_scale<A>(sp.simplex_scale, in);
          if (lane == 0) u[i] = c * dot / mass;
        } else {
          dot = warp_sum(dot);
          if (lane == 0) u[i] = dot;
        }
      }
      if (sp.retention == Retention::Lq) {  // W = Z N^(-(q - 2) / q) (Eq. 3.5, common/retention.h)
        const A scale = lq_scale(block_sum(norm_part), lq_weight<A>(sp.norm_mean != 0, int64_t(out) * in),
                                 A(sp.norm_floor), A(sp.norm_order)).s;
        for (int i = threadIdx.x; i < out; i += blockDim.x) u[i] *= scale;
      }
      __syncthreads();
      if (l + 1 < L) {
        for (int j = threadIdx.x; j < out; j += blockDim.x) rin(t, l + 1)[j] = act(sp.gelu != 0, u[j]);
        __syncthreads();
      }
    }
    if (write && threadIdx.x < kWarp) write_output(t0, t);
  }

  // o_t = x + LN(u_L) with the residual norm, else u_L (Eqs. 1.4, 4.3), from the kept read; by one warp.
  __device__ void write_output(int64_t t0, int t) const {
    const A* u = rpre(t, L - 1);
    const A* x = rin(t, 0);
    T* o = args.o + token(t0 + t) * Dv;
    const int lane = threadIdx.x % kWarp;
    if (sp.residual) {
      const RowNorm<A> nrm = row_norm(u, Dv, A(sp.ln_eps));
      for (int j = lane; j < Dv; j += kWarp) o[j] = from_acc<T>(x[j] + (u[j] - nrm.mean) * nrm.rstd);
    } else {
      for (int j = lane; j < Dv; j += kWarp) o[j] = from_acc<T>(u[j]);
    }
  }

  // The read-out reversed for token t, by one warp: du, the upstream of the last layer's pre-activations,
  // and dx, the gradient of scale q through the residual; `stage` holds grad_o in A.
  __device__ void output_backward(int64_t t0, int t, A* stage, A* du, A* dx) const {
    const T* go = args.grad_o + token(t0 + t) * Dv;
    const int lane = threadIdx.x % kWarp;
    for (int j = lane; j < Dv; j += kWarp) stage[j] = to_acc(go[j]);
    __syncwarp();
    for (int j = lane; j < Dk; j += kWarp) dx[j] = sp.residual ? stage[j] : A(0);  // residual: Dk = Dv
    if (sp.residual) {
      row_layer_norm_backward(rpre(t, L - 1), stage, du, Dv, A(sp.ln_eps), false);
    } else {
      for (int j = lane; j < Dv; j += kWarp) du[j] = stage[j];
    }
  }

  // x *= A_t (gate side) for every weight tensor: the retained anchor at the end of a run (Eq. 5.2).
  __device__ void scale_by_cum(int t, A* const x[]) const {
    const A* cum = gate(kCum, t);
    for (int l = 0; l < L; ++l) {
      const int in = in_of(l);
      for (int64_t e = threadIdx.x; e < sp.size(l); e += blockDim.x) {
        x[l][e] *= cum[channel(l, int(e / in), int(e % in))];
      }
    }
    __syncthreads();
  }

  // dst[c] += sum over the elements of channel c of f(i, j) for weight l (per head: c = 0). Block-level.
  template <typename F>
  __device__ void gate_reduce_add(int l, F f, A* dst) const {
    const int in = in_of(l), out = out_of(l);
    if (!sp.per_channel) {
      A part = 0;
      for (int64_t e = threadIdx.x; e < sp.size(l); e += blockDim.x) part += f(int(e / in), int(e % in));
      part = block_sum(part);
      if (threadIdx.x == 0) dst[0] += part;
    } else if (sp.side(l) == 0) {
      const int lane = threadIdx.x % kWarp;
      for (int i = threadIdx.x / kWarp; i < out; i += kMemoryWarps) {
        A s = 0;
        for (int j = lane; j < in; j += kWarp) s += f(i, j);
        s = warp_sum(s);
        if (lane == 0) dst[i] += s;
      }
    } else {
      for (int j = threadIdx.x; j < in; j += blockDim.x) {
        A s = 0;
        for (int i = 0; i < out; ++i) s += f(i, j);
        dst[j] += s;
      }
    }
    __syncthreads();
  }
  // ------------------------------------------------------------------------------------------------------
  // Backward pieces (docs/math.md Section 9, per token).

  // Token t's read, reversed: adds dL/dZ_t of every layer into dz (through the link, Eq. 9.3) and writes dq.
  __device__ void read_backward(int64_t t0, int t, A* const z[], A* const dz[]) const {
    const int64_t tok = token(t0 + t);
    A* du = vec(0);
    A* dh = vec(1);
    A* dx = vec(2);
    if (threadIdx.x < kWarp) output_backward(t0, t, vec(3), du, dx);
    __syncthreads();
    for (int l = L - 1; l >= 0; --l) {
      const int in = in_of(l), out = out_of(l);
      const A* zl = z[l];
      const A* h = rin(t, l);
      const LinkStats<A> st = link_stats(sp, zl, out, in, rows(l));
      link_backward_add(sp, st, zl, out, in, [du, h](int i, int j) { return du[i] * h[j]; }, dz[l]);
      for (int j = threadIdx.x; j < in; j += blockDim.x) {
        A s = 0;
        for (int i = 0; i < out; ++i) s += phi(sp, st, zl[int64_t(i) * in + j], i) * du[i];
        dh[j] = s;
      }
      __syncthreads();
      for (int j = threadIdx.x; j < in; j += blockDim.x) {
        if (l > 0) {
          du[j] = dh[j] * act_grad(sp.gelu != 0, rpre(t, l - 1)[j]);
        } else {
          dx[j] += dh[j];
        }
      }
      __syncthreads();
    }
    for (int j = threadIdx.x; j < Dk; j += blockDim.x) args.dq[tok * Dk + j] = from_acc<T>(A(sp.scale) * dx[j]);
    __syncthreads();
  }

  // Token t's step, reversed: dz holds dL/dZ_t (ds dL/dS_t from later tokens); writes the gradients of its
  // deltas and layer inputs (of G_t = d a^T) and adds its gate gradients; leaves dL/dZ_{t-1}, dL/dS_{t-1}.
  __device__ void update_backward(int t, const A* const zp[], const A* const spv[], A* const dz[],
                                  A* const ds[]) const {
    const A* e = gate(kLr, t);
    const A* al = gate(kAlpha, t);
    const A* m = gate(kMom, t);
    A* de = dgate(kLr, t);
    A* dal = dgate(kAlpha, t);
    A* dm = dgate(kMom, t);
    const bool mo = sp.momentum != 0;
    for (int l = 0; l < L; ++l) {
      const int in = in_of(l), out = out_of(l), side = sp.side(l);
      const A* d = deltas(t, l);
      const A* a = acts(t, l);
      const A* Z = zp[l];
      const A* S = mo ? spv[l] : nullptr;
      A* gz = dz[l];
      A* gs = mo ? ds[l] : nullptr;
      // X = dL/dS_t with momentum (all of dL/dZ_t flows into S_t too), else dL/dZ_t: G_t's upstream.
      auto X = [&](int64_t x) { return mo ? gs[x] + gz[x] : gz[x]; };
      A p_alpha = 0, p_mom = 0, p_lr = 0;  // per-head partial sums
      const int lane = threadIdx.x % kWarp;
      for (int i = threadIdx.x / kWarp; i < out; i += kMemoryWarps) {
        A rz = 0, rs = 0, rx = 0;
        for (int j = lane; j < in; j += kWarp) {
          const int64_t x = int64_t(i) * in + j;
          rx += X(x) * a[j] * (side == 1 ? e[j] : A(1));
          if (side == 0) {
            rz += gz[x] * Z[x];
            if (mo) rs += X(x) * S[x];
          }
        }
        rx = warp_sum(rx);
        rz = warp_sum(rz);
        rs = warp_sum(rs);
        if (lane == 0) {
          dd(t, l)[i] = -(side == 0 ? e[sp.per_channel ? i : 0] : A(1)) * rx;
          if (side == 0 && sp.per_channel) {
            dal[i] += rz;
            dm[i] += rs;
            de[i] -= d[i] * rx;
          } else if (side == 0) {
            p_alpha += rz;
            p_mom += rs;
            p_lr -= d[i] * rx;
          }
        }
      }
      for (int j = threadIdx.x; j < in; j += blockDim.x) {
        A cx = 0, cz = 0, cs = 0;
        for (int i = 0; i < out; ++i) {
          const int64_t x = int64_t(i) * in + j;
          cx += X(x) * d[i] * (side == 0 ? e[sp.per_channel ? i : 0] : A(1));
          if (side == 1) {
            cz += gz[x] * Z[x];
            if (mo) cs += X(x) * S[x];
          }
        }
        da(t, l)[j] = -(side == 1 ? e[j] : A(1)) * cx;
        if (side == 1) {
          dal[j] += cz;
          dm[j] += cs;
          de[j] -= a[j] * cx;
        }
      }
      if (!sp.per_channel) {
        p_alpha = block_sum(p_alpha);
        p_mom = block_sum(p_mom);
        p_lr = block_sum(p_lr);
        if (threadIdx.x == 0) {
          dal[0] += p_alpha;
          dm[0] += p_mom;
          de[0] += p_lr;
        }
      }
      __syncthreads();
      for (int64_t x = threadIdx.x; x < sp.size(l); x += blockDim.x) {
        const int c = channel(l, int(x / in), int(x % in));
        if (mo) gs[x] = m[c] * (gs[x] + gz[x]);
        gz[x] *= al[c];
      }
      __syncthreads();
    }
  }

  // The gradients at the anchor, reversed (Eq. 9.4): from dd / da of every token to dk, dv, ddelta, the
  // anchor weights (dwb) and, with grad_at_retained, A_t.
  __device__ void anchor_backward(int64_t t0, int n, const A* const wb[], A* dwb) const {
    for (int64_t e = threadIdx.x; e < W; e += blockDim.x) dwb[e] = 0;
    for (int p = threadIdx.x; p < n * outs; p += blockDim.x) ws[lay.dpre + p] = 0;
    __syncthreads();
    for (int l = 1; l < L; ++l) {  // deltas[l-1] = (deltas[l] W_l) s'(pre[l-1]) (Eq. 5.4)
      const int in = in_of(l), out = out_of(l);
      for (int p = threadIdx.x; p < n * in; p += blockDim.x) {
        const int t = p / in, j = p % in;
        const A u = pre(t, l - 1)[j], g = dd(t, l - 1)[j];
        tmp(t, l - 1)[j] = g * act_grad(sp.gelu != 0, u);
        dpre(t, l - 1)[j] += g * back(t, l)[j] * act_grad2(sp.gelu != 0, u);
      }
      __syncthreads();
      // The second-order pass feeds the bias Hessian too: float precision, as the anchor pass.
      gemm(tmp(0, l - 1), outs, false, wb[l], in, true, dd(0, l), outs, n, out, in, true, false, true);
      gemm(deltas(0, l), outs, true, tmp(0, l - 1), outs, false, dwb + woff[l], in, out, in, n, true, false, true);
    }
    for (int t = threadIdx.x / kWarp; t < n; t += kMemoryWarps) {
      const int64_t tok = token(t0 + t);
      A* dg = dd(t, L - 1);
      if (sp.residual) {  // dg <- d/dg, dpre += d/du of LN's backward
        row_layer_norm_double_backward(pre(t, L - 1), gv(t), dd(t, L - 1), tmp(t, L - 1), dpre(t, L - 1), Dv,
                                       A(sp.ln_eps));
        dg = tmp(t, L - 1);
        __syncwarp();
      }
      A* gy = gv(t);  // g is no longer needed: reuse it for dl/dy
      A* gd = nullptr;
      if (sp.delta_layout != DeltaLayout::none) {
        gd = args.ddelta + tok * (sp.delta_layout == DeltaLayout::per_channel ? Dv : 1);
      }
      row_bias_backward(bp, sp.delta_layout, dg, yv(t), args.v + tok * Dv, delta_ptr(tok), gy, args.dv + tok * Dv, gd,
                        Dv);
      __syncwarp();
      if (sp.residual) {
        row_layer_norm_backward(pre(t, L - 1), gy, dpre(t, L - 1), Dv, A(sp.ln_eps), true);
      } else {
        for (int j = threadIdx.x % kWarp; j < Dv; j += kWarp) dpre(t, L - 1)[j] += gy[j];
      }
    }
    __syncthreads();
    for (int l = L - 1; l >= 0; --l) {
      const int in = in_of(l), out = out_of(l);
      if (sp.retained) {  // u = (a W^T) A_t (Eq. 5.2)
        for (int t = threadIdx.x / kWarp; t < n; t += kMemoryWarps) {
          const int lane = threadIdx.x % kWarp;
          A part = 0;
          for (int i = lane; i < out; i += kWarp) {
            A raw = 0;
            for (int j = 0; j < in; ++j) raw += wb[l][int64_t(i) * in + j] * acts(t, l)[j];
            const A g = dpre(t, l)[i];
            if (sp.per_channel) {
              dgate(kCum, t)[i] += g * raw;
            } else {
              part += g * raw;
            }
            dpre(t, l)[i] = g * gate(kCum, t)[sp.per_channel ? i : 0];
          }
          part = warp_sum(part);
          if (lane == 0 && !sp.per_channel) dgate(kCum, t)[0] += part;
        }
        __syncthreads();
      }
      gemm(dpre(0, l), outs, true, acts(0, l), ins, false, dwb + woff[l], in, out, in, n, true, false, true);
      gemm(dpre(0, l), outs, false, wb[l], in, false, da(0, l), ins, n, in, out, true, false, true);
      if (l > 0) {
        for (int p = threadIdx.x; p < n * in; p += blockDim.x) {
          const int t = p / in, j = p % in;
          dpre(t, l - 1)[j] += da(t, l)[j] * act_grad(sp.gelu != 0, pre(t, l - 1)[j]);
        }
        __syncthreads();
      }
    }
    for (int p = threadIdx.x; p < n * Dk; p += blockDim.x) {
      const int t = p / Dk, j = p % Dk;
      const A g = da(t, 0)[j] + (sp.residual ? gv(t)[j] : A(0));
      args.dk[token(t0 + t) * Dk + j] = from_acc<T>(g);
    }
    __syncthreads();
  }

  // Gate gradients of the run's tokens: A_t = prod_{s <= t} alpha_s passes dL/dA_t on to each alpha_s
  // without dividing by alpha (R_s = dA_s + alpha_{s+1} R_{s+1}; dalpha_s += A_{s-1} R_s).
  __device__ void write_gate_grads(int64_t t0, int n) const {
    for (int c = threadIdx.x; c < Dg; c += blockDim.x) {
      A R = 0;
      for (int t = n - 1; t >= 0; --t) {
        R = dgate(kCum, t)[c] + (t + 1 < n ? gate(kAlpha, t + 1)[c] * R : A(0));
        const int64_t g = token(t0 + t) * Dg + c;
        args.dlr[g] = dgate(kLr, t)[c];
        if (sp.has_alpha) args.dalpha[g] = dgate(kAlpha, t)[c] + (t > 0 ? gate(kCum, t - 1)[c] : A(1)) * R;
        if (sp.momentum) args.dmom[g] = dgate(kMom, t)[c];
      }
    }
    __syncthreads();
  }
  // ------------------------------------------------------------------------------------------------------
  // Factored runs (Eq. 5.12): with W = Z and no momentum, every read of a run and its end state are masked
  // matrix products of the factors, so they run as chunk-level products (tensor cores for 16-bit inputs)
  // instead of a token loop. Runs whose smallest A_t is below common/factored_floor.h take the token loop.

  __device__ bool factored_run(int n) const {
    if (has_link(sp.retention) || sp.momentum) return false;
    A low = 1;
    for (int p = threadIdx.x; p < n * Dg; p += blockDim.x) {
      const A x = gate(kCum, p / Dg)[p % Dg];
      low = x < low ? x : low;
    }
    const A floor = A(factored_floor<A>());  // the CPU op's floor (common/factored_floor.h)
    return block_sum(A(low > floor ? 0 : 1)) == A(0);
  }

  // Per-layer buffers of a factored run: d~ [n, out], v = u / A [n, out], a~ [n, in], hs [n, in], S [n, n].
  __device__ A* f_d(int n, int l) const { return ws + lay.dual + int64_t(n) * outoff[l]; }
  __device__ A* f_v(int n, int l) const { return ws + lay.dual + int64_t(n) * (outs + outoff[l]); }
  __device__ A* f_a(int n, int l) const { return ws + lay.dual + int64_t(n) * (2 * outs + insoff[l]); }
  __device__ A* f_h(int n, int l) const { return ws + lay.dual + int64_t(n) * (2 * outs + ins + insoff[l]); }
  __device__ A* f_s(int n, int l) const {
    return ws + lay.dual + int64_t(n) * (2 * outs + 2 * ins) + int64_t(l) * n * n;
  }
  __device__ A* scratch() const { return ws + lay.scratch; }
  __device__ A et(int t, int c) const { return gate(kLr, t)[c] / gate(kCum, t)[c]; }  // e~ = eta / A

  // A chunk product; `exact` keeps it in the state's precision even for 16-bit inputs.
  __device__ void gemm(const A* a, int lda, bool at, const A* b, int ldb, bool bt, A* c, int ldc, int M, int N, int K,
                       bool accumulate, bool negate, bool exact = false) const {
    block_gemm<T, A>(a, lda, at, b, ldb, bt, c, ldc, M, N, K, accumulate, negate, scratch(), exact);
  }

  // Zero the entries of S [n, n] above the diagonal (only tokens i <= t reach token t).
  __device__ void mask_upper(int n, A* S) const {
    for (int p = threadIdx.x; p < n * n; p += blockDim.x) {
      if (p % n > p / n) S[p] = 0;
    }
    __syncthreads();
  }

  // The factored read of every token (Eqs. 5.10, 5.12), layer by layer; z0 the run's start state. Keeps
  // d~, a~, the A-scaled inputs, S and u / A per layer for the backward; writes o when `write`.
  __device__ void factored_read(int64_t t0, int n, const A* const z0[], bool write) const {
    for (int p = threadIdx.x; p < n * Dk; p += blockDim.x) {
      rin(p / Dk, 0)[p % Dk] = A(sp.scale) * to_acc(args.q[token(t0 + p / Dk) * Dk + p % Dk]);
    }
    __syncthreads();
    for (int l = 0; l < L; ++l) {
      const int in = in_of(l), out = out_of(l), side = sp.side(l);
      A* fd = f_d(n, l);
      A* fa = f_a(n, l);
      A* fh = f_h(n, l);
      A* S = f_s(n, l);
      A* v = f_v(n, l);
      for (int p = threadIdx.x; p < n * out; p += blockDim.x) {
        const int t = p / out, i = p % out;
        fd[p] = deltas(t, l)[i] * (side == 0 ? et(t, sp.per_channel ? i : 0) : A(1));
      }
      for (int p = threadIdx.x; p < n * in; p += blockDim.x) {
        const int t = p / in, j = p % in;
        fa[p] = acts(t, l)[j] * (side == 1 ? et(t, j) : A(1));
        fh[p] = rin(t, l)[j] * (side == 1 ? gate(kCum, t)[j] : A(1));
      }
      __syncthreads();
      gemm(fh, in, false, fa, in, true, S, n, n, n, in, false, false);  // S = hs a~^T
      mask_upper(n, S);
      gemm(fh, in, false, z0[l], in, true, v, out, n, out, in, false, false);  // hs Z0^T
      gemm(S, n, false, fd, out, false, v, out, n, out, n, true, true);        // - S d~
      for (int p = threadIdx.x; p < n * out; p += blockDim.x) {
        const int t = p / out, i = p % out;
        const A u = v[p] * (side == 0 ? gate(kCum, t)[sp.per_channel ? i : 0] : A(1));
        rpre(t, l)[i] = u;
        if (l + 1 < L) rin(t, l + 1)[i] = act(sp.gelu != 0, u);
      }
      __syncthreads();
    }
    if (!write) return;
    for (int t = threadIdx.x / kWarp; t < n; t += kMemoryWarps) write_output(t0, t);
    __syncthreads();
  }

  // End state of a factored run in place: Z <- A_n (Z - d~^T a~). The state carries every chunk's rounding
  // into the next, so this product keeps float precision (split operands for 16-bit inputs): with plain
  // bfloat16 operands Yaad's gradients (its bias Hessian reaches delta / sqrt(eps)) were 150% off at D = 32.
  __device__ void factored_end(int n, A* const z[]) const {
    for (int l = 0; l < L; ++l) {
      gemm(f_d(n, l), out_of(l), true, f_a(n, l), in_of(l), false, z[l], in_of(l), out_of(l), in_of(l), n, true, true,
           true);
    }
    scale_by_cum(n - 1, z);
  }

  // ------------------------------------------------------------------------------------------------------
  // The exact delta rule on factored runs (sp.exact; docs/math.md Eqs. 5.14-5.19): the residuals r of the run
  // solve (I + L) r = A' (.) (K Z_0^T) - V with L[t, i] = A'_t (k_t . k_i) e~_i (i < t), by forward
  // substitution, one thread per column of r (per channel c = that column, or the head's one gate); the
  // factored read and end state then take deltas = r.

  // A'_t of gate channel c: A_t for grad_at_retained (Eq. 3.2), A_{t-1} otherwise (Eq. 3.1).
  __device__ A point_decay(int t, int c) const {
    return sp.retained ? gate(kCum, t)[c] : (t > 0 ? gate(kCum, t - 1)[c] : A(1));
  }

  // kk = K K^T of the run into f_s(n, 0); exact products (the residuals carry into the state).
  __device__ A* key_products(int n) const {
    A* kk = f_s(n, 0);
    gemm(acts(0, 0), ins, false, acts(0, 0), ins, true, kk, n, n, n, Dk, false, false, true);
    return kk;
  }

  __device__ void exact_residuals(int64_t t0, int n, const A* const z0[]) const {
    const A* kk = key_products(n);
    gemm(acts(0, 0), ins, false, z0[0], Dk, true, deltas(0, 0), outs, n, Dv, Dk, false, false, true);  // K Z0^T
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) {
      const int c = sp.per_channel ? j : 0;
      for (int t = 0; t < n; ++t) {
        A s = deltas(t, 0)[j];
        for (int i = 0; i < t; ++i) s -= kk[t * n + i] * et(i, c) * deltas(i, 0)[j];
        deltas(t, 0)[j] = point_decay(t, c) * s - to_acc(args.v[token(t0 + t) * Dv + j]);
      }
    }
    __syncthreads();
  }

  // exact_residuals reversed (Eqs. 5.18-5.19), after factored_backward: dd(t, 0) holds dL/dr. Adds to gz
  // (dL/dZ_0) and to the gate gradients (d eta and dA_t, after factored_backward's conversion of e~), and
  // writes dk and dv.
  __device__ void exact_residuals_backward(int64_t t0, int n, const A* const z0[], A* const gz[]) const {
    const A* kk = key_products(n);
    A* kz = yv(0);          // K Z0^T [n, Dv], then e~ (.) r
    A* dy = tmp(0, 0);      // dL/dY [n, Dv] (row stride outs)
    A* gdy = dpre(0, 0);    // A' (.) dY
    A* det = gv(0);         // dL/de~ [n, Dv], then dL/dA'
    gemm(acts(0, 0), ins, false, z0[0], Dk, true, kz, Dv, n, Dv, Dk, false, false, true);
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) {
      const int c = sp.per_channel ? j : 0;
      for (int t = n - 1; t >= 0; --t) {  // dY = (I + L)^{-T} dR; sum_{i > t} L[i, t] dY_i = e~_t s
        A s = 0;
        for (int i = t + 1; i < n; ++i) s += gdy[i * outs + j] * kk[i * n + t];
        const A d = dd(t, 0)[j] - et(t, c) * s;
        dy[t * outs + j] = d;
        gdy[t * outs + j] = point_decay(t, c) * d;
        det[t * Dv + j] = -deltas(t, 0)[j] * s;  // dL/de~_t = -r_t sum_{i > t} A'_i dY_i (k_i . k_t)
        args.dv[token(t0 + t) * Dv + j] = from_acc<T>(-d);
      }
    }
    __syncthreads();
    // d eta_t += de~_t / A_t, dA_t -= de~_t e~_t / A_t (e~ = eta / A, Eq. 5.12).
    channel_add(n, Dv, kLr, [&](int t, int j) { return det[t * Dv + j] / gate(kCum, t)[sp.per_channel ? j : 0]; });
    channel_add(n, Dv, kCum, [&](int t, int j) {
      const int c = sp.per_channel ? j : 0;
      return -det[t * Dv + j] * et(t, c) / gate(kCum, t)[c];
    });
    // dA'_t = dY_t (.) (K Z0^T - sum_{i < t} (k_t . k_i) e~_i r_i)_t.
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) {
      const int c = sp.per_channel ? j : 0;
      for (int t = 0; t < n; ++t) {
        A s = kz[t * Dv + j];
        for (int i = 0; i < t; ++i) s -= kk[t * n + i] * et(i, c) * deltas(i, 0)[j];
        det[t * Dv + j] = dy[t * outs + j] * s;
      }
    }
    __syncthreads();
    // A'_t is A_t (retained) or A_{t-1}: its gradient joins dA one token earlier for Eq. 3.1.
    if (sp.retained) {
      channel_add(n, Dv, kCum, [&](int t, int j) { return det[t * Dv + j]; });
    } else {
      channel_add(n, Dv, kCum, [&](int t, int j) { return t + 1 < n ? det[(t + 1) * Dv + j] : A(0); });
    }
    gemm(gdy, outs, true, acts(0, 0), ins, false, gz[0], Dk, Dv, Dk, n, true, false, true);  // dZ0 += (A' dY)^T K
    gemm(gdy, outs, false, z0[0], Dk, false, da(0, 0), ins, n, Dk, Dv, true, false, true);   // dk += (A' dY) Z0
    // dKK = -strictly_lower((A' dY)(e~ r)^T); dk += (dKK + dKK^T) K.
    for (int p = threadIdx.x; p < n * Dv; p += blockDim.x) {
      kz[p] = et(p / Dv, sp.per_channel ? p % Dv : 0) * deltas(p / Dv, 0)[p % Dv];
    }
    __syncthreads();
    A* dkk = ws + lay.dual_bwd + 6 * int64_t(n) * sp.widest();
    gemm(gdy, outs, false, kz, Dv, true, dkk, n, n, n, Dv, false, true, true);
    A* sym = f_s(n, 0);  // kk is no longer needed
    for (int p = threadIdx.x; p < n * n; p += blockDim.x) {
      const int t = p / n, i = p % n;
      sym[p] = t > i ? dkk[p] : (t < i ? dkk[i * n + t] : A(0));
    }
    __syncthreads();
    gemm(sym, n, false, acts(0, 0), ins, false, da(0, 0), ins, n, Dk, n, true, false, true);
    for (int p = threadIdx.x; p < n * Dk; p += blockDim.x) {
      args.dk[token(t0 + p / Dk) * Dk + p % Dk] = from_acc<T>(da(p / Dk, 0)[p % Dk]);
    }
    __syncthreads();
  }

  // Per-token channel sums: dst(t)[c] += f(t, x) over x < width, with c = x per channel (width = Dg), else 0.
  template <typename F>
  __device__ void channel_add(int n, int width, int kind, F f) const {
    if (sp.per_channel) {
      for (int p = threadIdx.x; p < n * width; p += blockDim.x) {
        dgate(kind, p / width)[p % width] += f(p / width, p % width);
      }
    } else {
      const int lane = threadIdx.x % kWarp;
      for (int t = threadIdx.x / kWarp; t < n; t += kMemoryWarps) {
        A s = 0;
        for (int x = lane; x < width; x += kWarp) s += f(t, x);
        s = warp_sum(s);
        if (lane == 0) dgate(kind, t)[0] += s;
      }
    }
    __syncthreads();
  }

  // Gradients of the factors d~ = e~ d, a~ = a (rows) or d~ = d, a~ = e~ a (columns) of layer l, [n, out]
  // and [n, in], passed on to e~ (accumulated in dgate(kLr) until factored_gates), dd and da.
  __device__ void add_factored_grads(int n, int l, const A* gd, const A* ga) const {
    const int in = in_of(l), out = out_of(l), side = sp.side(l);
    if (side == 0) {
      channel_add(n, out, kLr, [&](int t, int i) { return gd[t * out + i] * deltas(t, l)[i]; });
    } else {
      channel_add(n, in, kLr, [&](int t, int j) { return ga[t * in + j] * acts(t, l)[j]; });
    }
    for (int p = threadIdx.x; p < n * out; p += blockDim.x) {
      const int t = p / out, i = p % out;
      dd(t, l)[i] += gd[p] * (side == 0 ? et(t, sp.per_channel ? i : 0) : A(1));
    }
    for (int p = threadIdx.x; p < n * in; p += blockDim.x) {
      const int t = p / in, j = p % in;
      da(t, l)[j] += ga[p] * (side == 1 ? et(t, j) : A(1));
    }
    __syncthreads();
  }

  // Backward of a factored run's end state and reads (Eqs. 9.1-9.2 factored); gz holds dL/dZ_n on entry and
  // dL/dZ_0 on exit; dd / da / dgate are accumulated.
  __device__ void factored_backward(int64_t t0, int n, const A* const z0[], A* const gz[]) const {
    const int wide = sp.widest();
    A* gu = ws + lay.dual_bwd;                 // upstream of the layer's pre-activations [n, wide]
    A* gh = gu + int64_t(n) * wide;            // gradient of the layer's inputs [n, wide]
    A* gx = gh + int64_t(n) * wide;            // gradient of scale q [n, Dk]
    A* gdt = gx + int64_t(n) * wide;           // gradient of d~ [n, out]
    A* gat = gdt + int64_t(n) * wide;          // gradient of a~ [n, in]
    A* gv = gat + int64_t(n) * wide;           // A-scaled upstream [n, out]
    A* gS = gv + int64_t(n) * wide;            // gradient of S [n, n]
    for (int p = threadIdx.x; p < n * outs; p += blockDim.x) ws[lay.dd + p] = 0;
    for (int p = threadIdx.x; p < n * ins; p += blockDim.x) ws[lay.da + p] = 0;
    __syncthreads();
    // End state (9.1): Z_n = A_n (Z_0 - d~^T a~).
    for (int l = 0; l < L; ++l) {
      const int in = in_of(l), out = out_of(l);
      A* u = ws + lay.states;
      for (int64_t e = threadIdx.x; e < sp.size(l); e += blockDim.x) u[e] = z0[l][e];
      __syncthreads();
      gemm(f_d(n, l), out, true, f_a(n, l), in, false, u, in, out, in, n, true, true);
      gate_reduce_add(l, [&](int i, int j) { return gz[l][int64_t(i) * in + j] * u[int64_t(i) * in + j]; },
                      dgate(kCum, n - 1));
    }
    scale_by_cum(n - 1, gz);
    for (int l = 0; l < L; ++l) {
      const int in = in_of(l), out = out_of(l);
      gemm(f_a(n, l), in, false, gz[l], in, true, gdt, out, n, out, in, false, true);  // -a~ dZ^T
      gemm(f_d(n, l), out, false, gz[l], in, false, gat, in, n, in, out, false, true);  // -d~ dZ
      add_factored_grads(n, l, gdt, gat);
    }
    // Reads, last layer first (9.2).
    for (int t = threadIdx.x / kWarp; t < n; t += kMemoryWarps) {
      output_backward(t0, t, gh + int64_t(t) * wide, gu + int64_t(t) * wide, gx + int64_t(t) * wide);
    }
    __syncthreads();
    for (int l = L - 1; l >= 0; --l) {
      const int in = in_of(l), out = out_of(l), side = sp.side(l);
      const A* fd = f_d(n, l);
      const A* fa = f_a(n, l);
      const A* fh = f_h(n, l);
      const A* S = f_s(n, l);
      const A* v = f_v(n, l);
      if (side == 0) {
        channel_add(n, out, kCum, [&](int t, int i) { return gu[int64_t(t) * wide + i] * v[t * out + i]; });
        for (int p = threadIdx.x; p < n * out; p += blockDim.x) {
          const int t = p / out, i = p % out;
          gv[p] = gu[int64_t(t) * wide + i] * gate(kCum, t)[sp.per_channel ? i : 0];
        }
        __syncthreads();
      } else {
        for (int p = threadIdx.x; p < n * out; p += blockDim.x) gv[p] = gu[int64_t(p / out) * wide + p % out];
        __syncthreads();
      }
      gemm(gv, out, true, fh, in, false, gz[l], in, out, in, n, true, false);  // dZ_0 += gv^T hs
      gemm(gv, out, false, fd, out, true, gS, n, n, n, out, false, true);      // dS = -(gv d~^T), masked
      mask_upper(n, gS);
      gemm(S, n, true, gv, out, false, gdt, out, n, out, n, false, true);      // dd~ = -S^T gv
      gemm(gS, n, true, fh, in, false, gat, in, n, in, n, false, false);       // da~ = dS^T hs
      add_factored_grads(n, l, gdt, gat);
      gemm(gv, out, false, z0[l], in, false, gh, wide, n, in, out, false, false);  // dhs = gv Z_0 + dS a~
      gemm(gS, n, false, fa, in, false, gh, wide, n, in, n, true, false);
      if (side == 1) {
        channel_add(n, in, kCum, [&](int t, int j) { return gh[int64_t(t) * wide + j] * rin(t, l)[j]; });
      }
      for (int p = threadIdx.x; p < n * in; p += blockDim.x) {
        const int t = p / in, j = p % in;
        const A g = gh[int64_t(t) * wide + j] * (side == 1 ? gate(kCum, t)[j] : A(1));
        if (l > 0) {
          gu[int64_t(t) * wide + j] = g * act_grad(sp.gelu != 0, rpre(t, l - 1)[j]);
        } else {
          gx[int64_t(t) * wide + j] += g;
        }
      }
      __syncthreads();
    }
    for (int p = threadIdx.x; p < n * Dk; p += blockDim.x) {
      args.dq[token(t0 + p / Dk) * Dk + p % Dk] = from_acc<T>(A(sp.scale) * gx[int64_t(p / Dk) * wide + p % Dk]);
    }
    // e~ = eta / A_t: d eta = de~ / A_t, dA_t -= de~ e~ / A_t (Eq. 5.12).
    for (int p = threadIdx.x; p < n * Dg; p += blockDim.x) {
      const int t = p / Dg, c = p % Dg;
      const A det = dgate(kLr, t)[c], cum = gate(kCum, t)[c];
      dgate(kLr, t)[c] = det / cum;
      dgate(kCum, t)[c] -= det * et(t, c) / cum;
    }
    __syncthreads();
  }
  // Z_t (and S_t) of token t of the run: the checkpoint for t < 0, else the recomputed states.
  __device__ void states_at(int t, A* const start[], bool momentum, A* out[]) const {
    for (int l = 0; l < L; ++l) out[l] = t < 0 ? start[l] : (momentum ? mom_t(t) : state_t(t)) + woff[l];
  }

  // The token loop, reversed (Eq. 9.6): recomputes Z_t (and S_t) for every token of the run from its start
  // state, then walks the tokens backwards; gz / gs hold dL/dZ_n, dL/dS_n on entry, dL/dZ_0, dL/dS_0 on exit.
  __device__ void token_backward(int64_t t0, int n, A* const z0[], A* const s0[], A* const gz[],
                                 A* const gs[]) const {
    for (int t = 0; t < n; ++t) {
      A* zs[kMaxLayers];
      A* zd[kMaxLayers];
      A* ss[kMaxLayers] = {};
      A* sd[kMaxLayers] = {};
      states_at(t - 1, z0, false, zs);
      states_at(t, z0, false, zd);
      if (sp.momentum) {
        states_at(t - 1, s0, true, ss);
        states_at(t, s0, true, sd);
      }
      token_step(t0, t, zs, zd, ss, sd, false);
    }
    for (int t = n - 1; t >= 0; --t) {
      A* zt[kMaxLayers];
      A* zp[kMaxLayers];
      A* sp_[kMaxLayers] = {};
      states_at(t, z0, false, zt);
      states_at(t - 1, z0, false, zp);
      if (sp.momentum) states_at(t - 1, s0, true, sp_);
      read_backward(t0, t, zt, gz);
      update_backward(t, zp, sp_, gz, gs);
      if (sp.exact) exact_residual_backward(t0, t, zp[0], gz[0]);
    }
    if (!sp.exact) return;
    for (int p = threadIdx.x; p < n * Dk; p += blockDim.x) {
      args.dk[token(t0 + p / Dk) * Dk + p % Dk] = from_acc<T>(da(p / Dk, 0)[p % Dk]);
    }
    __syncthreads();
  }
};

// ---------------------------------------------------------------------------------------------------------

template <typename T, typename A>
__device__ void forward_item(const MemoryArgs<T, A>& args, int64_t item) {
  const MemoryBlock<T, A> blk(args, false, item);
  const KernelSpec& sp = args.spec;
  const int L = sp.layers;
  A* mem[kMaxLayers];
  A* mom[kMaxLayers];
  A* anc[kMaxLayers];
  blk.rows_of(args.memory, -1, mem);
  blk.rows_of(args.momentum, -1, mom);
  blk.rows_of(args.anchor, -1, anc);
  for (int64_t r = args.seq_begin[blk.seq]; r < args.seq_begin[blk.seq + 1]; ++r) {
    const RunDesc run = args.runs[r];
    const int n = run.len;
    for (int l = 0; l < L; ++l) {
      for (int64_t e = threadIdx.x; e < sp.size(l); e += blockDim.x) {
        if (run.fresh) anc[l][e] = mem[l][e];  // Eq. 5.6
        if (args.ck_memory[0] != nullptr) {
          const int64_t row = blk.ck_row(l, run.ck_row);
          args.ck_memory[l][row + e] = mem[l][e];
          args.ck_anchor[l][row + e] = run.fresh ? mem[l][e] : anc[l][e];
          if (sp.momentum) args.ck_momentum[l][row + e] = mom[l][e];
        }
      }
    }
    __syncthreads();
    blk.load_gates(run.token0, n);
    if (sp.exact) {  // the exact delta rule: no anchor pass (Eqs. 5.13-5.16)
      blk.load_keys(run.token0, n);
    } else {
      const A* wb[kMaxLayers];
      blk.anchor_weights(anc, wb);
      blk.anchor_pass(run.token0, n, wb);
    }
    if (blk.factored_run(n)) {
      if (sp.exact) blk.exact_residuals(run.token0, n, mem);
      blk.factored_read(run.token0, n, mem, true);
      blk.factored_end(n, mem);
    } else {
      for (int t = 0; t < n; ++t) blk.token_step(run.token0, t, mem, mem, mom, mom, true);
    }
    if (sp.retained) blk.scale_by_cum(n - 1, anc);
    __syncthreads();
  }
}

template <typename T, typename A>
__device__ void backward_item(const MemoryArgs<T, A>& args, int64_t item) {
  const MemoryBlock<T, A> blk(args, true, item);
  const KernelSpec& sp = args.spec;
  const int L = sp.layers;
  A* gmem[kMaxLayers];
  A* gmom[kMaxLayers];
  A* ganc[kMaxLayers];
  blk.rows_of(args.memory, -1, gmem);
  blk.rows_of(args.momentum, -1, gmom);
  blk.rows_of(args.anchor, -1, ganc);
  for (int64_t r = args.seq_begin[blk.seq + 1] - 1; r >= args.seq_begin[blk.seq]; --r) {
    const RunDesc run = args.runs[r];
    const int n = run.len;
    // The run's start state (its checkpoint), then Z_t (and S_t) after every token.
    A* z0[kMaxLayers];
    A* s0[kMaxLayers];
    A* anc[kMaxLayers];
    blk.rows_of(args.ck_memory, run.ck_row, z0);
    blk.rows_of(args.ck_momentum, run.ck_row, s0);
    blk.rows_of(args.ck_anchor, run.ck_row, anc);
    blk.load_gates(run.token0, n);
    for (int p = threadIdx.x; p < 4 * blk.max_run() * blk.Dg; p += blockDim.x) blk.ws[blk.lay.dgates + p] = 0;
    const A* wb[kMaxLayers];
    A* dwb = blk.ws + blk.lay.dwb;
    if (sp.exact) {  // no anchor pass; dk and dv come from the exact residuals' backward (Eqs. 5.13-5.19)
      blk.load_keys(run.token0, n);
      if (blk.factored_run(n)) {
        blk.exact_residuals(run.token0, n, z0);
        blk.factored_read(run.token0, n, z0, false);
        blk.factored_backward(run.token0, n, z0, gmem);
        blk.exact_residuals_backward(run.token0, n, z0, gmem);
      } else {
        blk.token_backward(run.token0, n, z0, s0, gmem, gmom);
      }
    } else {
      blk.anchor_weights(anc, wb);
      blk.anchor_pass(run.token0, n, wb);
      if (blk.factored_run(n)) {
        blk.factored_read(run.token0, n, z0, false);
        blk.factored_backward(run.token0, n, z0, gmem);
      } else {
        blk.token_backward(run.token0, n, z0, s0, gmem, gmom);
      }
      blk.anchor_backward(run.token0, n, wb, dwb);
    }
    if (sp.retained) {  // the run ended with anchor A_n (Eq. 5.2)
      for (int l = 0; l < L; ++l) {
        const A* g = ganc[l];
        const A* x = anc[l];
        const int in = sp.dims[l];
        blk.gate_reduce_add(l, [&](int i, int j) { return g[int64_t(i) * in + j] * x[int64_t(i) * in + j]; },
                            blk.dgate(kCum, n - 1));
      }
      blk.scale_by_cum(n - 1, ganc);
    }
    for (int l = 0; l < L && !sp.exact; ++l) {
      const int in = sp.dims[l], out = sp.dims[l + 1];
      const A* g = dwb + blk.woff[l];
      const LinkStats<A> st = link_stats(sp, anc[l], out, in, blk.rows(l));
      link_backward_add(sp, st, anc[l], out, in, [g, in](int i, int j) { return g[int64_t(i) * in + j]; }, ganc[l]);
    }
    blk.write_gate_grads(run.token0, n);
    if (run.fresh) {  // the run began with anchor = memory (Eq. 5.6)
      for (int l = 0; l < L; ++l) {
        for (int64_t e = threadIdx.x; e < sp.size(l); e += blockDim.x) {
          gmem[l][e] += ganc[l][e];
          ganc[l][e] = 0;
        }
      }
      __syncthreads();
    }
  }
}

// Each block takes (sequence, head) pairs blockIdx.x, blockIdx.x + gridDim.x, ... with its own workspace,
// so the host bounds the workspace by the grid rather than by N * H.
template <typename T, typename A>
__global__ void __launch_bounds__(kMemoryThreads, 1) memory_forward_kernel(MemoryArgs<T, A> args) {
  for (int64_t item = blockIdx.x; item < args.items; item += gridDim.x) forward_item(args, item);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kMemoryThreads, 1) memory_backward_kernel(MemoryArgs<T, A> args) {
  for (int64_t item = blockIdx.x; item < args.items; item += gridDim.x) backward_item(args, item);
}

}  // namespace miras::cuda
