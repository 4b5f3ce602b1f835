// CPU implementations of miras_ext::memory_chunk_fwd / memory_chunk_bwd (docs/math.md, Section 5): the host
// side: dtype conversion and the spread of work over ATen's thread pool; each run of tokens sharing an anchor
// (the chunk schedule of Eq. 5.6, common/schedule.h) is computed by chunk_forward / chunk_backward
// (cpu/memory/chunk.h) for a group of (sequence, head) pairs. The checks, states and checkpoints it shares
// with the CUDA op are in common/memory_problem.h.
//
// Layouts. Inputs [B, T, H, D] are permuted once to [B*H, T, D] (gates [B*H, T] or [B*H, T, Dv]); states
// [N, H, *shape] are flattened to [N*H, *shape]. Checkpoints are [S_max, H, *shape] per state tensor (see
// csrc/ops.cpp); flattened to [S_max*H, *shape], run r of a work item starts at row ck_base + r * ck_stride.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/memory_problem.h"
#include "common/schedule.h"
#include "cpu/memory/chunk.h"

namespace miras {
namespace {

// ------------------------------------------------------------------------------------------------
// Flattened inputs and the work items.

// [B, T, H, ...] -> [B*H, T, ...] in dtype `ct`, contiguous.
at::Tensor flat_tokens(const at::Tensor& x, at::ScalarType ct) {
  if (!x.defined()) return x;
  std::vector<int64_t> sizes{x.size(0) * x.size(2), x.size(1)};
  for (int64_t d = 3; d < x.dim(); ++d) sizes.push_back(x.size(d));
  return x.to(ct).transpose(1, 2).contiguous().view(sizes);
}

// [B*H, T, ...] -> [B, T, H, ...] in dtype `dtype`, contiguous.
at::Tensor unflat_tokens(const at::Tensor& x, int64_t B, int64_t H, at::ScalarType dtype) {
  std::vector<int64_t> sizes{B, H};
  for (int64_t d = 1; d < x.dim(); ++d) sizes.push_back(x.size(d));
  return x.view(sizes).transpose(1, 2).to(dtype).contiguous();
}

struct Flat {
  at::Tensor q, k, v, lr, alpha, momentum, delta;  // [B*H, T, D] / [B*H, T] / [B*H, T, Dv]
};

Flat flatten_inputs(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& lr, const std::optional<at::Tensor>& alpha,
                    const std::optional<at::Tensor>& momentum, const std::optional<at::Tensor>& delta) {
  auto opt = [&](const std::optional<at::Tensor>& g) { return g.has_value() ? flat_tokens(*g, P.ct) : at::Tensor(); };
  return Flat{flat_tokens(q, P.ct), flat_tokens(k, P.ct), flat_tokens(v, P.ct), flat_tokens(lr, P.ct),
              opt(alpha), opt(momentum), opt(delta)};
}

// A group of G (sequence, head) pairs that share one token range and one schedule.
struct Item {
  int64_t in_row0 = 0;     // first row of the [B*H, T, ...] inputs
  int64_t state_row0 = 0;  // first row of the [N*H, ...] states
  int64_t G = 0;
  int64_t t0 = 0;  // first token of the slice
  std::vector<Run> runs;
  int64_t ck_base = 0, ck_stride = 0;  // checkpoint row (of [S_max*H, ...]) of run r: ck_base + r * ck_stride
};

// The schedule shared by a padded batch, and the work item of pairs [begin, end) of it.
Item padded_item(const Problem& P, const std::vector<Run>& runs, int64_t begin, int64_t end) {
  Item it;
  it.in_row0 = it.state_row0 = it.ck_base = begin;
  it.G = end - begin;
  it.runs = runs;
  it.ck_stride = P.N * P.H;
  return it;
}

// With cu_seqlens: (sequence, head range) items, enough of them to occupy the thread pool.
std::vector<Item> varlen_items(const Problem& P) {
  std::vector<Item> items;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t splits = std::clamp<int64_t>((threads + std::max<int64_t>(P.N, 1) - 1) / std::max<int64_t>(P.N, 1),
                                             1, std::max<int64_t>(P.H, 1));
  const int64_t per = (P.H + splits - 1) / splits;
  int64_t base = 0;  // checkpoint run rows used by the sequences before
  for (int64_t i = 0; i < P.N; ++i) {
    const int64_t len = P.cu[i + 1] - P.cu[i];
    auto runs = segments(P.pos[i] % P.chunk, len, P.chunk, P.mp.lag_token);
    for (int64_t h0 = 0; h0 < P.H && len > 0; h0 += per) {
      Item it;
      it.in_row0 = h0;
      it.state_row0 = i * P.H + h0;
      it.G = std::min(per, P.H - h0);
      it.t0 = P.cu[i];
      it.runs = runs;
      it.ck_base = base * P.H + h0;
      it.ck_stride = P.H;
      items.push_back(std::move(it));
    }
    base += static_cast<int64_t>(runs.size());
  }
  return items;
}

// Work items per task such that a task has enough work to pay for waking a thread: a decoding step
// (T = 1) then runs on the calling thread, where two threads cost tens of milliseconds per call on a
// loaded machine for microseconds of work.
int64_t item_grain(const Problem& P, int64_t tokens_per_item) {
  constexpr int64_t kMinWork = int64_t(1) << 22;  // state elements times tokens
  int64_t state = 0;
  for (const auto& s : P.shapes) {
    int64_t n = 1;
    for (int64_t d : s) n *= d;
    state += n;
  }
  const int64_t work = std::max<int64_t>(1, tokens_per_item * state);
  return std::max<int64_t>(1, (kMinWork + work - 1) / work);
}

// Calls f(item) for every work item, spread over ATen's thread pool.
template <typename F>
void for_each_item(const Problem& P, F&& f) {
  if (!P.varlen) {
    if (P.T == 0 || P.N * P.H == 0) return;
    const auto runs = segments(P.pos[0] % P.chunk, P.T, P.chunk, P.mp.lag_token);
    at::parallel_for(0, P.N * P.H, item_grain(P, P.T),
                     [&](int64_t begin, int64_t end) { f(padded_item(P, runs, begin, end)); });
  } else {
    const auto items = varlen_items(P);
    const int64_t n = static_cast<int64_t>(items.size());
    at::parallel_for(0, n, item_grain(P, n ? P.T / n : 1), [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) f(items[j]);
    });
  }
}

// Rows of a token-major tensor [rows, T, ...] for one item and run (a view).
at::Tensor run_slice(const at::Tensor& x, const Item& it, const Run& r) {
  if (!x.defined()) return x;
  return x.narrow(0, it.in_row0, it.G).narrow(1, it.t0 + r.start, r.end - r.start);
}

ChunkInputs run_inputs(const Flat& in, const Item& it, const Run& r) {
  return ChunkInputs{run_slice(in.q, it, r),     run_slice(in.k, it, r),     run_slice(in.v, it, r),
                     run_slice(in.lr, it, r),    run_slice(in.alpha, it, r), run_slice(in.momentum, it, r),
                     run_slice(in.delta, it, r)};
}

// The runs of all items cover every (row, token) of `out` exactly once, so outputs are allocated
// uninitialised and each run writes its rows: its value, or zeros where the run has none (an undefined
// gradient).
void write_run(const at::Tensor& out, const Item& it, const Run& r, const at::Tensor& value) {
  at::Tensor dst = out.narrow(0, it.in_row0, it.G).narrow(1, it.t0 + r.start, r.end - r.start);
  if (value.defined()) {
    dst.copy_(value);
  } else {
    dst.zero_();
  }
}

at::Tensor add_defined(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

// ------------------------------------------------------------------------------------------------
// Forward.

FwdResult memory_chunk_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lr,
                               const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& momentum,
                               const std::optional<at::Tensor>& delta, at::TensorList memory,
                               at::TensorList momentum_state, at::TensorList anchor, const at::Tensor& position,
                               const std::optional<at::Tensor>& cu_seqlens, c10::string_view spec, double scale,
                               int64_t chunk_size, bool save_checkpoints) {
  const Problem P =
      make_problem(c10::DeviceType::CPU, q, k, v, lr, alpha, momentum, delta, position, cu_seqlens, spec, scale,
                   chunk_size);
  const int L = P.L(), M = P.M();
  check_states("memory", memory, L, P);
  check_states("momentum_state", momentum_state, M, P);
  check_states("anchor", anchor, L, P);

  const Flat in = flatten_inputs(P, q, k, v, lr, alpha, momentum, delta);
  const auto fopts = q.options().dtype(P.ct);
  at::Tensor o = at::empty({P.B * P.H, P.T, P.Dv}, fopts);
  TensorVec mem, mom, anc;
  for (int l = 0; l < L; ++l) mem.push_back(flat_state_copy(memory[l], P, l));
  for (int l = 0; l < M; ++l) mom.push_back(flat_state_copy(momentum_state[l], P, l));
  for (int l = 0; l < L; ++l) anc.push_back(flat_state_copy(anchor[l], P, l));

  Checkpoints ck;
  TensorVec ck_out;
  if (save_checkpoints) ck = allocate_checkpoints(P, used_checkpoint_rows(P), ck_out);

  for_each_item(P, [&](const Item& it) {
    ChunkState st;
    for (int l = 0; l < L; ++l) st.memory.push_back(mem[l].narrow(0, it.state_row0, it.G).clone());
    for (int l = 0; l < M; ++l) st.momentum.push_back(mom[l].narrow(0, it.state_row0, it.G).clone());
    for (int l = 0; l < L; ++l) st.anchor.push_back(anc[l].narrow(0, it.state_row0, it.G).clone());
    for (size_t r = 0; r < it.runs.size(); ++r) {
      const Run& run = it.runs[r];
      if (run.fresh) {
        for (int l = 0; l < L; ++l) st.anchor[l] = st.memory[l].clone();
      }
      if (save_checkpoints) {
        const int64_t row = it.ck_base + static_cast<int64_t>(r) * it.ck_stride;
        for (int l = 0; l < L; ++l) ck.memory[l].narrow(0, row, it.G).copy_(st.memory[l]);
        for (int l = 0; l < M; ++l) ck.momentum[l].narrow(0, row, it.G).copy_(st.momentum[l]);
        for (int l = 0; l < L; ++l) ck.anchor[l].narrow(0, row, it.G).copy_(st.anchor[l]);
      }
      write_run(o, it, run, chunk_forward(P.mp, run_inputs(in, it, run), st));
    }
    for (int l = 0; l < L; ++l) mem[l].narrow(0, it.state_row0, it.G).copy_(st.memory[l]);
    for (int l = 0; l < M; ++l) mom[l].narrow(0, it.state_row0, it.G).copy_(st.momentum[l]);
    for (int l = 0; l < L; ++l) anc[l].narrow(0, it.state_row0, it.G).copy_(st.anchor[l]);
  });

  unflat_states(mem, P);
  unflat_states(mom, P);
  unflat_states(anc, P);
  return {unflat_tokens(o, P.B, P.H, P.in_dtype), mem, mom, anc, advanced_position(P, position), ck_out};
}

// ------------------------------------------------------------------------------------------------
// Backward.

BwdResult memory_chunk_bwd_cpu(const at::Tensor& grad_o, at::TensorList grad_memory, at::TensorList grad_momentum,
                               at::TensorList grad_anchor, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& lr, const std::optional<at::Tensor>& alpha,
                               const std::optional<at::Tensor>& momentum, const std::optional<at::Tensor>& delta,
                               at::TensorList checkpoints, const at::Tensor& position,
                               const std::optional<at::Tensor>& cu_seqlens, c10::string_view spec, double scale,
                               int64_t chunk_size) {
  const Problem P =
      make_problem(c10::DeviceType::CPU, q, k, v, lr, alpha, momentum, delta, position, cu_seqlens, spec, scale,
                   chunk_size);
  const int L = P.L(), M = P.M();
  check_grad_o(grad_o, P);
  const Checkpoints ck = split_checkpoints(P, checkpoints, used_checkpoint_rows(P));
  const TensorVec gmem_end = final_state_grads("grad_memory", grad_memory, L, P);
  const TensorVec gmom_end = final_state_grads("grad_momentum", grad_momentum, M, P);
  const TensorVec ganc_end = final_state_grads("grad_anchor", grad_anchor, L, P);

  const Flat in = flatten_inputs(P, q, k, v, lr, alpha, momentum, delta);
  const at::Tensor go = flat_tokens(grad_o, P.ct);
  auto empty_like_opt = [](const at::Tensor& x) { return x.defined() ? at::empty_like(x) : at::Tensor(); };
  const Flat g{at::empty_like(in.q),         at::empty_like(in.k),           at::empty_like(in.v),
               at::empty_like(in.lr),        empty_like_opt(in.alpha),       empty_like_opt(in.momentum),
               empty_like_opt(in.delta)};
  const auto fopts = q.options().dtype(P.ct);
  TensorVec gmem, gmom, ganc;
  auto start_grads = [&](TensorVec& out, const TensorVec& end, int count) {
    for (int l = 0; l < count; ++l) {
      out.push_back(end[l].defined() ? end[l].clone() : at::zeros(P.state_shape(l, P.N * P.H), fopts));
    }
  };
  // Initialised with the final-state gradients: pairs without tokens pass them through unchanged.
  start_grads(gmem, gmem_end, L);
  start_grads(gmom, gmom_end, M);
  start_grads(ganc, ganc_end, L);

  for_each_item(P, [&](const Item& it) {
    auto rows = [&](const TensorVec& xs) {
      TensorVec out;
      for (const auto& x : xs) out.push_back(x.defined() ? x.narrow(0, it.state_row0, it.G) : at::Tensor());
      return out;
    };
    ChunkState grad_end{rows(gmem_end), rows(gmom_end), rows(ganc_end)};
    for (size_t r = it.runs.size(); r-- > 0;) {
      const Run& run = it.runs[r];
      const int64_t row = it.ck_base + static_cast<int64_t>(r) * it.ck_stride;
      ChunkState start;
      for (int l = 0; l < L; ++l) start.memory.push_back(ck.memory[l].narrow(0, row, it.G));
      for (int l = 0; l < M; ++l) start.momentum.push_back(ck.momentum[l].narrow(0, row, it.G));
      for (int l = 0; l < L; ++l) start.anchor.push_back(ck.anchor[l].narrow(0, row, it.G));
      const ChunkGrads cg =
          chunk_backward(P.mp, run_inputs(in, it, run), start, run_slice(go, it, run), grad_end);
      write_run(g.q, it, run, cg.q);
      write_run(g.k, it, run, cg.k);
      write_run(g.v, it, run, cg.v);
      write_run(g.lr, it, run, cg.lr);
      if (g.alpha.defined()) write_run(g.alpha, it, run, cg.alpha);
      if (g.momentum.defined()) write_run(g.momentum, it, run, cg.momentum);
      if (g.delta.defined()) write_run(g.delta, it, run, cg.delta);
      // The start state's gradient is the previous run's end gradient. A run that starts a chunk began
      // with anchor = memory (Eq. 5.6): its anchor gradient flows to the memory, none to the older anchor.
      auto at_l = [](const TensorVec& xs, int l) { return l < static_cast<int>(xs.size()) ? xs[l] : at::Tensor(); };
      ChunkState prev;
      for (int l = 0; l < L; ++l) {
        const at::Tensor ga = at_l(cg.state.anchor, l);
        prev.memory.push_back(run.fresh ? add_defined(at_l(cg.state.memory, l), ga) : at_l(cg.state.memory, l));
        prev.anchor.push_back(run.fresh ? at::Tensor() : ga);
      }
      for (int l = 0; l < M; ++l) prev.momentum.push_back(at_l(cg.state.momentum, l));
      grad_end = std::move(prev);
    }
    auto store = [&](TensorVec& out, const TensorVec& xs) {
      for (size_t l = 0; l < out.size(); ++l) {
        at::Tensor dst = out[l].narrow(0, it.state_row0, it.G);
        if (xs[l].defined()) {
          dst.copy_(xs[l]);
        } else {
          dst.zero_();
        }
      }
    };
    store(gmem, grad_end.memory);
    store(gmom, grad_end.momentum);
    store(ganc, grad_end.anchor);
  });

  auto gate_grad = [&](const std::optional<at::Tensor>& gate, const at::Tensor& grad) {
    if (!gate.has_value()) return at::empty({0}, fopts);
    return unflat_tokens(grad, P.B, P.H, gate->scalar_type());
  };
  unflat_states(gmem, P);
  unflat_states(gmom, P);
  unflat_states(ganc, P);
  return {unflat_tokens(g.q, P.B, P.H, q.scalar_type()),
          unflat_tokens(g.k, P.B, P.H, k.scalar_type()),
          unflat_tokens(g.v, P.B, P.H, v.scalar_type()),
          unflat_tokens(g.lr, P.B, P.H, lr.scalar_type()),
          gate_grad(alpha, g.alpha),
          gate_grad(momentum, g.momentum),
          gate_grad(delta, g.delta),
          gmem,
          gmom,
          ganc};
}

}  // namespace

TORCH_LIBRARY_IMPL(miras_ext, CPU, m) {
  m.impl("memory_chunk_fwd", &memory_chunk_fwd_cpu);
  m.impl("memory_chunk_bwd", &memory_chunk_bwd_cpu);
}

}  // namespace miras
