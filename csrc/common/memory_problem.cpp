// Checks and layouts shared by the CPU and CUDA memory ops (common/memory_problem.h).
#include "common/memory_problem.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "common/schedule.h"

namespace miras {
namespace {

// What a tensor on the wrong device was expected to be: the CPU op keeps its historical wording.
std::string expected_tensor(const Problem& P) {
  return P.device.is_cpu() ? std::string("a CPU tensor") : "a tensor on " + P.device.str() + " (that of q)";
}

// Devices position and cu_seqlens may be on.
std::string index_devices(const Problem& P) {
  return P.device.is_cpu() ? std::string("CPU") : "CPU or " + P.device.str();
}

// The device of a wrong tensor, named only in the CUDA op's messages.
std::string on_device(const Problem& P, const at::Tensor& x) {
  return P.device.is_cpu() ? std::string() : " on " + x.device().str();
}

bool index_device_ok(const Problem& P, const at::Tensor& x) {
  return x.device().is_cpu() || x.device() == P.device;
}

// A [N] or [N + 1] index tensor as a host vector (a synchronisation for a CUDA tensor).
std::vector<int64_t> host_values(const at::Tensor& x) {
  const at::Tensor h = x.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(h.const_data_ptr<int64_t>(), h.const_data_ptr<int64_t>() + h.numel());
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

// Index of weight tensor j of a checkpoint list memory[0..L), momentum[0..M), anchor[0..L).
int checkpoint_layer(const Problem& P, int j) {
  const int L = P.L(), M = P.M();
  return j < L ? j : (j < L + M ? j - L : j - L - M);
}

void add_checkpoint(Checkpoints& c, const Problem& P, int j, at::Tensor flat) {
  const int L = P.L(), M = P.M();
  (j < L ? c.memory : j < L + M ? c.momentum : c.anchor).push_back(std::move(flat));
}

}  // namespace

std::vector<int64_t> Problem::state_shape(int l, int64_t lead0, int64_t lead1) const {
  std::vector<int64_t> s{lead0};
  if (lead1 >= 0) s.push_back(lead1);
  s.insert(s.end(), shapes[l].begin(), shapes[l].end());
  return s;
}

at::TensorOptions Problem::options() const { return at::TensorOptions().device(device).dtype(ct); }

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

void check_states(const char* name, at::TensorList xs, int count, const Problem& P) {
  TORCH_CHECK_VALUE(static_cast<int>(xs.size()) == count, name, ": expected ", count, " tensors, got ", xs.size());
  for (int l = 0; l < count; ++l) {
    const auto want = P.state_shape(l, P.N, P.H);
    TORCH_CHECK_VALUE(xs[l].sizes() == at::IntArrayRef(want), name, "[", l, "]: expected shape ", want, ", got ",
                      xs[l].sizes());
    TORCH_CHECK_VALUE(xs[l].scalar_type() == P.ct, name, "[", l, "]: expected the compute dtype ", P.ct, ", got ",
                      xs[l].scalar_type());
    TORCH_CHECK_VALUE(xs[l].device() == P.device, name, "[", l, "]: expected ", expected_tensor(P),
                      P.device.is_cpu() ? std::string() : ", got " + xs[l].device().str());
  }
}

Problem make_problem(c10::DeviceType backend, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& lr, const std::optional<at::Tensor>& alpha,
                     const std::optional<at::Tensor>& momentum, const std::optional<at::Tensor>& delta,
                     const at::Tensor& position, const std::optional<at::Tensor>& cu_seqlens, c10::string_view spec,
                     double scale, int64_t chunk_size) {
  Problem P;
  P.mp = parse_memory_spec(std::string(spec));
  TORCH_CHECK_VALUE(q.dim() == 4, "q: expected rank 4 [B, T, H, Dk], got ", q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "k: expected the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4 && v.sizes().slice(0, 3) == q.sizes().slice(0, 3),
                    "v: expected [B, T, H, Dv] with [B, T, H] of q, got ", v.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(q.scalar_type()), "q: expected a floating dtype, got ", q.scalar_type());
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                    "k, v: expected the dtype of q ", q.scalar_type());
  TORCH_CHECK_VALUE(q.device().type() == backend && k.device() == q.device() && v.device() == q.device(),
                    "q, k, v: expected ", c10::DeviceTypeName(backend), " tensors",
                    backend == c10::DeviceType::CPU ? "" : " on one device");
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
  P.device = q.device();
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

  TORCH_CHECK_VALUE(position.dim() == 1 && position.scalar_type() == at::kLong && index_device_ok(P, position),
                    "position: expected a ", index_devices(P), " int64 tensor [N], got ", position.sizes(), " ",
                    position.scalar_type(), on_device(P, position));
  P.N = position.size(0);
  P.pos = host_values(position);

  P.varlen = cu_seqlens.has_value();
  if (P.varlen) {
    const at::Tensor& c = *cu_seqlens;
    TORCH_CHECK_VALUE(c.dim() == 1 && (c.scalar_type() == at::kInt || c.scalar_type() == at::kLong) &&
                          index_device_ok(P, c),
                      "cu_seqlens: expected a ", index_devices(P), " int32/int64 tensor [N + 1]");
    TORCH_CHECK_VALUE(c.size(0) == P.N + 1, "cu_seqlens: expected N + 1 = ", P.N + 1, " offsets (N of position), got ",
                      c.size(0));
    TORCH_CHECK_VALUE(P.B == 1, "q: with cu_seqlens the sequences are packed along T and B must be 1, got B=", P.B);
    P.cu = host_values(c);
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

at::Tensor flat_state_copy(const at::Tensor& x, const Problem& P, int l) {
  at::Tensor out = at::empty(P.state_shape(l, P.N * P.H), x.options().dtype(P.ct));
  out.copy_(x.reshape(P.state_shape(l, P.N * P.H)));
  return out;
}

void unflat_states(TensorVec& xs, const Problem& P) {
  for (size_t l = 0; l < xs.size(); ++l) xs[l] = xs[l].view(P.state_shape(static_cast<int>(l), P.N, P.H));
}

int64_t used_checkpoint_rows(const Problem& P) {
  return make_schedule(P.pos, P.cu, P.T, P.chunk, P.mp.lag_token).used_rows;
}

Checkpoints allocate_checkpoints(const Problem& P, int64_t used, TensorVec& out) {
  const int64_t S = checkpoint_rows(P.N, P.T, P.chunk, P.mp.lag_token, P.varlen);
  TORCH_INTERNAL_ASSERT(used <= S, "checkpoint rows: used ", used, " > S_max ", S);
  Checkpoints c;
  for (int j = 0; j < 2 * P.L() + P.M(); ++j) {
    const int l = checkpoint_layer(P, j);
    at::Tensor x = at::empty(P.state_shape(l, S, P.H), P.options());
    x.narrow(0, used, S - used).zero_();  // rows no run uses: defined values, deterministic outputs
    out.push_back(x);
    add_checkpoint(c, P, j, x.view(P.state_shape(l, S * P.H)));
  }
  return c;
}

Checkpoints split_checkpoints(const Problem& P, at::TensorList ck, int64_t used) {
  const int L = P.L(), M = P.M();
  TORCH_CHECK_VALUE(static_cast<int>(ck.size()) == 2 * L + M, "checkpoints: expected ", 2 * L + M,
                    " tensors (memory, momentum, anchor per weight tensor), got ", ck.size());
  Checkpoints c;
  for (int j = 0; j < 2 * L + M; ++j) {
    const int l = checkpoint_layer(P, j);
    const at::Tensor& x = ck[j];
    TORCH_CHECK_VALUE(x.dim() == static_cast<int64_t>(P.shapes[l].size()) + 2 && x.size(0) >= used &&
                          x.size(1) == P.H && x.sizes().slice(2) == at::IntArrayRef(P.shapes[l]) &&
                          x.scalar_type() == P.ct,
                      "checkpoints[", j, "]: expected [S, H, *shape] with S >= ", used, " in ", P.ct, ", got ",
                      x.sizes(), " ", x.scalar_type());
    TORCH_CHECK_VALUE(x.device() == P.device, "checkpoints[", j, "]: expected ", expected_tensor(P), ", got ",
                      x.device());
    add_checkpoint(c, P, j, x.contiguous().view(P.state_shape(l, x.size(0) * P.H)));
  }
  return c;
}

void check_grad_o(const at::Tensor& grad_o, const Problem& P) {
  TORCH_CHECK_VALUE(grad_o.sizes() == at::IntArrayRef({P.B, P.T, P.H, P.Dv}), "grad_o: expected the shape of o [",
                    P.B, ", ", P.T, ", ", P.H, ", ", P.Dv, "], got ", grad_o.sizes());
  TORCH_CHECK_VALUE(grad_o.device() == P.device, "grad_o: expected ", expected_tensor(P), ", got ", grad_o.device());
}

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
    TORCH_CHECK_VALUE(xs[l].device() == P.device, name, "[", l, "]: expected ", expected_tensor(P), ", got ",
                      xs[l].device());
    out[l] = xs[l].to(P.ct).reshape(P.state_shape(l, P.N * P.H));
  }
  return out;
}

at::Tensor advanced_position(const Problem& P, const at::Tensor& position) {
  at::Tensor out = at::empty({P.N}, at::TensorOptions().dtype(at::kLong));
  auto* np = out.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < P.N; ++i) np[i] = P.pos[i] + (P.varlen ? P.cu[i + 1] - P.cu[i] : P.T);
  return position.device().is_cpu() ? out : out.to(position.device());
}

}  // namespace miras
