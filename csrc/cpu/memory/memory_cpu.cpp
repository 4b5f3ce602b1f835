// CPU implementations of miras_ext::memory_chunk_fwd / memory_chunk_bwd (docs/math.md, Section 5): the host
// side. Checks, dtype conversion, the chunk schedule (Eq. 5.6, as segments() in reference/chunked.py),
// checkpoints, and the spread of work over ATen's thread pool; each run of tokens sharing an anchor is
// computed by chunk_forward / chunk_backward (cpu/memory/chunk.h) for a group of (sequence, head) pairs.
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

#include "common/memory_params.h"
#include "cpu/memory/chunk.h"

namespace miras {
namespace {

using TensorVec = std::vector<at::Tensor>;

// ------------------------------------------------------------------------------------------------
// Chunk schedule.

struct Run {
  int64_t start, end;  // tokens [start, end) of the work item's sequence slice
  bool fresh;          // starts a chunk: the anchor is refreshed to the memory before the run
};

// reference/chunked.py segments(): runs sharing one anchor; `phase` is the first token's offset in its chunk.
std::vector<Run> segments(int64_t phase, int64_t length, int64_t chunk, bool lag) {
  auto boundary = [&](int64_t j) {
    const int64_t ph = (phase + j) % chunk;
    return ph == 0 || (lag && ph == 1);
  };
  std::vector<Run> runs;
  if (length <= 0) return runs;
  int64_t s = 0;
  for (int64_t j = 1; j < length; ++j) {
    if (boundary(j)) {
      runs.push_back({s, j, boundary(s)});
      s = j;
    }
  }
  runs.push_back({s, length, boundary(s)});
  return runs;
}

// Rows S_max of every checkpoint tensor (csrc/ops.cpp): from shapes and options only, so the fake agrees.
int64_t checkpoint_rows(int64_t n, int64_t t, int64_t chunk, bool lag, bool varlen) {
  const int64_t chunks = (t + chunk - 1) / chunk;
  const int64_t factor = (lag && chunk > 1) ? 2 : 1;
  return (varlen ? chunks + 2 * n : n * (chunks + 1)) * factor;
}

// ------------------------------------------------------------------------------------------------
// The problem a call describes, checked.

struct Problem {
  MemoryParams mp;
  int64_t B = 0, T = 0, H = 0, Dk = 0, Dv = 0, N = 0, chunk = 1;
  at::ScalarType in_dtype = at::kFloat, ct = at::kFloat;
  std::vector<std::vector<int64_t>> shapes;  // per-head shape of each weight tensor
  bool varlen = false;
  std::vector<int64_t> cu;   // [N + 1] offsets (varlen), else empty
  std::vector<int64_t> pos;  // [N] positions
  int L() const { return static_cast<int>(shapes.size()); }
  int M() const { return mp.momentum() ? L() : 0; }
  std::vector<int64_t> state_shape(int l, int64_t lead0, int64_t lead1 = -1) const {
    std::vector<int64_t> s{lead0};
    if (lead1 >= 0) s.push_back(lead1);
    s.insert(s.end(), shapes[l].begin(), shapes[l].end());
    return s;
  }
};

std::vector<std::vector<int64_t>> weight_shapes(const MemoryParams& mp, int64_t dk, int64_t dv) {
  if (mp.memory == Memory::Vector) return {{dk}};
  if (mp.memory == Memory::Matrix) return {{dv, dk}};
  const int64_t hidden = int64_t(mp.expansion) * dk;
  std::vector<int64_t> dims{dk};
  for (int i = 0; i + 1 < mp.layers; ++i) dims.push_back(hidden);
  dims.push_back(dv);
  std::vector<std::vector<int64_t>> out;
  for (int i = 0; i < mp.layers; ++i) out.push_back({dims[i + 1], dims[i]});
  return out;
}

void check_gate(const char* name, const std::optional<at::Tensor>& g, bool needed, const Problem& P,
                const at::Tensor& q, std::optional<bool>& per_channel, bool is_delta) {
  if (!needed) {
    TORCH_CHECK_VALUE(!g.has_value(), name, ": the spec has no such gate; pass None");
    return;
  }
  TORCH_CHECK_VALUE(g.has_value(), name, ": required by the spec, expected [B, T, H] or [B, T, H, Dv]");
  const at::Tensor& x = *g;
  const bool ok = (x.dim() == 3 || x.dim() == 4) && x.size(0) == P.B && x.size(1) == P.T && x.size(2) == P.H &&
                  (x.dim() == 3 || x.size(3) == P.Dv);
  TORCH_CHECK_VALUE(ok, name, ": expected shape [B, T, H] = [", P.B, ", ", P.T, ", ", P.H, "] or [B, T, H, Dv], got ",
                    x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), name, ": expected a floating dtype, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == q.device(), name, ": expected device ", q.device(), ", got ", x.device());
  if (is_delta) {
    TORCH_CHECK_VALUE(x.dim() == 3 || P.mp.bias == Bias::huber,
                      "delta: a per-channel delta [B, T, H, Dv] needs bias 'huber' (Eq. 2.5)");
    return;
  }
  if (!per_channel.has_value()) per_channel = x.dim() == 4;
  TORCH_CHECK_VALUE(*per_channel == (x.dim() == 4), name,
                    ": gates lr, alpha and momentum must all be per head or all per channel");
}

void check_states(const char* name, at::TensorList xs, int count, const Problem& P) {
  TORCH_CHECK_VALUE(static_cast<int>(xs.size()) == count, name, ": expected ", count, " tensors, got ", xs.size());
  for (int l = 0; l < count; ++l) {
    const auto want = P.state_shape(l, P.N, P.H);
    TORCH_CHECK_VALUE(xs[l].sizes() == at::IntArrayRef(want), name, "[", l, "]: expected shape ", want, ", got ",
                      xs[l].sizes());
    TORCH_CHECK_VALUE(xs[l].scalar_type() == P.ct, name, "[", l, "]: expected the compute dtype ", P.ct, ", got ",
                      xs[l].scalar_type());
    TORCH_CHECK_VALUE(xs[l].device().is_cpu(), name, "[", l, "]: expected a CPU tensor");
  }
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lr,
                     const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& momentum,
                     const std::optional<at::Tensor>& delta, const at::Tensor& position,
                     const std::optional<at::Tensor>& cu_seqlens, c10::string_view spec, double scale,
                     int64_t chunk_size) {
  Problem P;
  P.mp = parse_memory_spec(std::string(spec));
  TORCH_CHECK_VALUE(q.dim() == 4, "q: expected rank 4 [B, T, H, Dk], got ", q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "k: expected the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4 && v.sizes().slice(0, 3) == q.sizes().slice(0, 3),
                    "v: expected [B, T, H, Dv] with [B, T, H] of q, got ", v.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(q.scalar_type()), "q: expected a floating dtype, got ", q.scalar_type());
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                    "k, v: expected the dtype of q ", q.scalar_type());
  TORCH_CHECK_VALUE(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "q, k, v: expected CPU tensors");
  TORCH_CHECK_VALUE(chunk_size >= 1, "chunk_size: expected an integer >= 1, got ", chunk_size);
  TORCH_CHECK_VALUE(scale > 0, "scale: expected > 0, got ", scale);
  P.B = q.size(0);
  P.T = q.size(1);
  P.H = q.size(2);
  P.Dk = q.size(3);
  P.Dv = v.size(3);
  P.chunk = chunk_size;
  P.in_dtype = q.scalar_type();
  P.ct = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  P.mp.scale = scale;

  std::optional<bool> per_channel;
  check_gate("lr", lr, true, P, q, per_channel, false);
  check_gate("alpha", alpha, P.mp.retention != Retention::None, P, q, per_channel, false);
  check_gate("momentum", momentum, P.mp.momentum(), P, q, per_channel, false);
  const bool threshold = P.mp.bias == Bias::huber || P.mp.bias == Bias::huber_norm || P.mp.bias == Bias::yaad ||
                         P.mp.bias == Bias::value_shift;
  check_gate("delta", delta, threshold, P, q, per_channel, true);
  P.mp.per_channel = per_channel.value_or(false);

  const bool mlp = P.mp.memory == Memory::Mlp;
  TORCH_CHECK_VALUE(P.mp.memory != Memory::Vector || P.Dk == P.Dv, "v: vector memory needs Dv == Dk");
  TORCH_CHECK_VALUE(!mlp || !P.mp.residual_norm || P.Dk == P.Dv, "v: the residual MLP memory needs Dv == Dk");
  TORCH_CHECK_VALUE(!mlp || !P.mp.per_channel || (P.Dk == P.Dv && P.mp.layers <= 2),
                    "lr: per-channel gates on MLP memory need Dk == Dv and layers <= 2 (Eq. 3.4)");
  P.shapes = weight_shapes(P.mp, P.Dk, P.Dv);

  TORCH_CHECK_VALUE(position.dim() == 1 && position.scalar_type() == at::kLong && position.device().is_cpu(),
                    "position: expected a CPU int64 tensor [N], got ", position.sizes(), " ", position.scalar_type());
  P.N = position.size(0);
  const at::Tensor pos = position.contiguous();
  P.pos.assign(pos.const_data_ptr<int64_t>(), pos.const_data_ptr<int64_t>() + P.N);

  P.varlen = cu_seqlens.has_value();
  if (P.varlen) {
    const at::Tensor& c = *cu_seqlens;
    TORCH_CHECK_VALUE(c.dim() == 1 && (c.scalar_type() == at::kInt || c.scalar_type() == at::kLong) &&
                          c.device().is_cpu(),
                      "cu_seqlens: expected a CPU int32/int64 tensor [N + 1]");
    TORCH_CHECK_VALUE(c.size(0) == P.N + 1, "cu_seqlens: expected N + 1 = ", P.N + 1, " offsets (N of position), got ",
                      c.size(0));
    TORCH_CHECK_VALUE(P.B == 1, "q: with cu_seqlens the sequences are packed along T and B must be 1, got B=", P.B);
    const at::Tensor c64 = c.to(at::kLong).contiguous();
    P.cu.assign(c64.const_data_ptr<int64_t>(), c64.const_data_ptr<int64_t>() + P.N + 1);
    bool ok = P.cu.front() == 0 && P.cu.back() == P.T;
    for (int64_t i = 0; i < P.N; ++i) ok = ok && P.cu[i] <= P.cu[i + 1];
    TORCH_CHECK_VALUE(ok, "cu_seqlens: expected non-decreasing offsets from 0 to T=", P.T, ", got ", c);
  } else {
    TORCH_CHECK_VALUE(P.N == P.B, "position: expected [B] = [", P.B, "], got ", position.sizes());
    for (int64_t i = 1; i < P.N && P.T > 0; ++i) {
      TORCH_CHECK_VALUE(P.pos[i] % P.chunk == P.pos[0] % P.chunk,
                        "initial_state.position: every sequence of a batch must be at the same offset within its "
                        "chunk of ", P.chunk, ", got positions ", position);
    }
  }
  for (int64_t i = 0; i < P.N; ++i) {
    TORCH_CHECK_VALUE(P.pos[i] >= 0, "position: expected values >= 0, got ", position);
  }
  return P;
}

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

int64_t used_checkpoint_rows(const Problem& P) {
  if (!P.varlen) {
    return P.N * static_cast<int64_t>(segments(P.N ? P.pos[0] % P.chunk : 0, P.T, P.chunk, P.mp.lag_token).size());
  }
  int64_t rows = 0;
  for (int64_t i = 0; i < P.N; ++i) {
    rows += static_cast<int64_t>(segments(P.pos[i] % P.chunk, P.cu[i + 1] - P.cu[i], P.chunk, P.mp.lag_token).size());
  }
  return rows;
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

// Rows of a token-major tensor [rows, T, ...] for one item and run, contiguous (a copy).
at::Tensor run_slice(const at::Tensor& x, const Item& it, const Run& r) {
  if (!x.defined()) return x;
  return x.narrow(0, it.in_row0, it.G).narrow(1, it.t0 + r.start, r.end - r.start).contiguous();
}

ChunkInputs run_inputs(const Flat& in, const Item& it, const Run& r) {
  return ChunkInputs{run_slice(in.q, it, r),     run_slice(in.k, it, r),     run_slice(in.v, it, r),
                     run_slice(in.lr, it, r),    run_slice(in.alpha, it, r), run_slice(in.momentum, it, r),
                     run_slice(in.delta, it, r)};
}

void write_run(const at::Tensor& out, const Item& it, const Run& r, const at::Tensor& value) {
  if (!value.defined()) return;  // the output was zero-initialised
  out.narrow(0, it.in_row0, it.G).narrow(1, it.t0 + r.start, r.end - r.start).copy_(value);
}

// [N, H, *shape] -> a new [N*H, *shape] tensor in dtype ct (never aliasing the input).
at::Tensor flat_state_copy(const at::Tensor& x, const Problem& P, int l) {
  at::Tensor out = at::empty(P.state_shape(l, P.N * P.H), x.options().dtype(P.ct));
  out.copy_(x.reshape(P.state_shape(l, P.N * P.H)));
  return out;
}

at::Tensor add_defined(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

// Checkpoint list layout: memory[0..L), momentum[0..M), anchor[0..L).
struct Checkpoints {
  TensorVec memory, momentum, anchor;  // each [S_max*H, *shape]
};

Checkpoints split_checkpoints(const Problem& P, at::TensorList ck) {
  const int L = P.L(), M = P.M();
  TORCH_CHECK_VALUE(static_cast<int>(ck.size()) == 2 * L + M, "checkpoints: expected ", 2 * L + M,
                    " tensors (memory, momentum, anchor per weight tensor), got ", ck.size());
  const int64_t rows = used_checkpoint_rows(P);
  Checkpoints c;
  for (int j = 0; j < 2 * L + M; ++j) {
    const int l = j < L ? j : (j < L + M ? j - L : j - L - M);
    const at::Tensor& x = ck[j];
    TORCH_CHECK_VALUE(x.dim() == static_cast<int64_t>(P.shapes[l].size()) + 2 && x.size(0) >= rows &&
                          x.size(1) == P.H && x.sizes().slice(2) == at::IntArrayRef(P.shapes[l]) &&
                          x.scalar_type() == P.ct,
                      "checkpoints[", j, "]: expected [S, H, *shape] with S >= ", rows, " in ", P.ct, ", got ",
                      x.sizes(), " ", x.scalar_type());
    at::Tensor flat = x.contiguous().view(P.state_shape(l, x.size(0) * P.H));
    (j < L ? c.memory : j < L + M ? c.momentum : c.anchor).push_back(flat);
  }
  return c;
}

// ------------------------------------------------------------------------------------------------
// Forward.

using FwdResult = std::tuple<at::Tensor, TensorVec, TensorVec, TensorVec, at::Tensor, TensorVec>;

FwdResult memory_chunk_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lr,
                               const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& momentum,
                               const std::optional<at::Tensor>& delta, at::TensorList memory,
                               at::TensorList momentum_state, at::TensorList anchor, const at::Tensor& position,
                               const std::optional<at::Tensor>& cu_seqlens, c10::string_view spec, double scale,
                               int64_t chunk_size, bool save_checkpoints) {
  const Problem P = make_problem(q, k, v, lr, alpha, momentum, delta, position, cu_seqlens, spec, scale, chunk_size);
  const int L = P.L(), M = P.M();
  check_states("memory", memory, L, P);
  check_states("momentum_state", momentum_state, M, P);
  check_states("anchor", anchor, L, P);

  const Flat in = flatten_inputs(P, q, k, v, lr, alpha, momentum, delta);
  const auto fopts = q.options().dtype(P.ct);
  at::Tensor o = at::zeros({P.B * P.H, P.T, P.Dv}, fopts);
  TensorVec mem, mom, anc;
  for (int l = 0; l < L; ++l) mem.push_back(flat_state_copy(memory[l], P, l));
  for (int l = 0; l < M; ++l) mom.push_back(flat_state_copy(momentum_state[l], P, l));
  for (int l = 0; l < L; ++l) anc.push_back(flat_state_copy(anchor[l], P, l));

  Checkpoints ck;
  TensorVec ck_out;
  if (save_checkpoints) {
    const int64_t S = checkpoint_rows(P.N, P.T, P.chunk, P.mp.lag_token, P.varlen);
    const int64_t used = used_checkpoint_rows(P);
    TORCH_INTERNAL_ASSERT(used <= S, "checkpoint rows: used ", used, " > S_max ", S);
    for (int j = 0; j < 2 * L + M; ++j) {
      const int l = j < L ? j : (j < L + M ? j - L : j - L - M);
      at::Tensor x = at::empty(P.state_shape(l, S, P.H), fopts);
      x.narrow(0, used, S - used).zero_();  // rows no run uses: defined values, deterministic outputs
      ck_out.push_back(x);
      at::Tensor flat = x.view(P.state_shape(l, S * P.H));
      (j < L ? ck.memory : j < L + M ? ck.momentum : ck.anchor).push_back(flat);
    }
  }

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

  auto unflat_states = [&](TensorVec& xs) {
    for (size_t l = 0; l < xs.size(); ++l) xs[l] = xs[l].view(P.state_shape(static_cast<int>(l), P.N, P.H));
  };
  unflat_states(mem);
  unflat_states(mom);
  unflat_states(anc);

  at::Tensor new_position = position.clone();
  auto* np = new_position.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < P.N; ++i) np[i] = P.pos[i] + (P.varlen ? P.cu[i + 1] - P.cu[i] : P.T);

  return {unflat_tokens(o, P.B, P.H, P.in_dtype), mem, mom, anc, new_position, ck_out};
}

// ------------------------------------------------------------------------------------------------
// Backward.

using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             TensorVec, TensorVec, TensorVec>;

// The final-state gradient list, flattened to [N*H, *shape] in ct; an empty list or undefined entries are zero.
TensorVec final_state_grads(const char* name, at::TensorList xs, int count, const Problem& P) {
  TensorVec out(count);
  if (xs.empty()) return out;
  TORCH_CHECK_VALUE(static_cast<int>(xs.size()) == count, name, ": expected 0 or ", count, " tensors, got ",
                    xs.size());
  for (int l = 0; l < count; ++l) {
    if (!xs[l].defined()) continue;
    const auto want = P.state_shape(l, P.N, P.H);
    TORCH_CHECK_VALUE(xs[l].sizes() == at::IntArrayRef(want), name, "[", l, "]: expected shape ", want, ", got ",
                      xs[l].sizes());
    out[l] = xs[l].to(P.ct).reshape(P.state_shape(l, P.N * P.H));
  }
  return out;
}

BwdResult memory_chunk_bwd_cpu(const at::Tensor& grad_o, at::TensorList grad_memory, at::TensorList grad_momentum,
                               at::TensorList grad_anchor, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& lr, const std::optional<at::Tensor>& alpha,
                               const std::optional<at::Tensor>& momentum, const std::optional<at::Tensor>& delta,
                               at::TensorList checkpoints, const at::Tensor& position,
                               const std::optional<at::Tensor>& cu_seqlens, c10::string_view spec, double scale,
                               int64_t chunk_size) {
  const Problem P = make_problem(q, k, v, lr, alpha, momentum, delta, position, cu_seqlens, spec, scale, chunk_size);
  const int L = P.L(), M = P.M();
  TORCH_CHECK_VALUE(grad_o.sizes() == at::IntArrayRef({P.B, P.T, P.H, P.Dv}), "grad_o: expected the shape of o [",
                    P.B, ", ", P.T, ", ", P.H, ", ", P.Dv, "], got ", grad_o.sizes());
  const Checkpoints ck = split_checkpoints(P, checkpoints);
  const TensorVec gmem_end = final_state_grads("grad_memory", grad_memory, L, P);
  const TensorVec gmom_end = final_state_grads("grad_momentum", grad_momentum, M, P);
  const TensorVec ganc_end = final_state_grads("grad_anchor", grad_anchor, L, P);

  const Flat in = flatten_inputs(P, q, k, v, lr, alpha, momentum, delta);
  const at::Tensor go = flat_tokens(grad_o, P.ct);
  auto zeros_like_opt = [](const at::Tensor& x) { return x.defined() ? at::zeros_like(x) : at::Tensor(); };
  const Flat g{at::zeros_like(in.q),         at::zeros_like(in.k),           at::zeros_like(in.v),
               at::zeros_like(in.lr),        zeros_like_opt(in.alpha),       zeros_like_opt(in.momentum),
               zeros_like_opt(in.delta)};
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
  auto unflat_states = [&](TensorVec& xs) {
    for (size_t l = 0; l < xs.size(); ++l) xs[l] = xs[l].view(P.state_shape(static_cast<int>(l), P.N, P.H));
  };
  unflat_states(gmem);
  unflat_states(gmom);
  unflat_states(ganc);
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
