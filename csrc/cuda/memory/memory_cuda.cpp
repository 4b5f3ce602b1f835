// CUDA backend of miras_ext::memory_chunk_fwd / memory_chunk_bwd (csrc/ops.cpp): the host side. The checks,
// states, checkpoints and positions are those of the CPU op (common/memory_problem.h); the chunk schedule
// (common/schedule.h) goes to the device in one small copy, and each block runs (sequence, head) pairs in
// turn, all the runs of a pair's sequence (cuda/memory/memory_kernels.cuh, launched from
// memory_{f32,f64,f16,bf16}.cu).
//
// Layouts (cuda/memory/memory_args.h): q, k, v, o and their gradients stay [B, T, H, D] in q's dtype, made
// contiguous; gates and delta are converted to contiguous tensors in the accumulation dtype (float64 for
// float64 q, else float32), as are the states [N*H, *shape] that the kernels update in place.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/memory_problem.h"
#include "common/schedule.h"
#include "cuda/memory/memory_launch.h"

namespace miras {
namespace {

using cuda::KernelSpec;
using cuda::MemoryArgs;

// ------------------------------------------------------------------------------------------------
// The spec as the kernels read it.

int32_t width(int64_t d) {
  TORCH_CHECK_VALUE(d <= std::numeric_limits<int32_t>::max(), "q, v: the CUDA op takes widths below 2^31, got ", d);
  return static_cast<int32_t>(d);
}

// MemoryParams resolved against the sizes; rejects what the kernels do not implement.
KernelSpec kernel_spec(const Problem& P, const std::optional<at::Tensor>& delta) {
  const MemoryParams& mp = P.mp;
  TORCH_CHECK_VALUE(mp.memory != Memory::Vector,
                    "memory: the compiled op implements matrix and mlp memory; vector memory runs in "
                    "miras_ext.reference");
  TORCH_CHECK_VALUE(P.L() <= cuda::kMaxLayers, "spec: layers: the CUDA op implements MLP memory of at most ",
                    cuda::kMaxLayers, " layers, got ", P.L());
  TORCH_CHECK_VALUE(P.in_dtype == at::kFloat || P.in_dtype == at::kDouble || P.in_dtype == at::kHalf ||
                        P.in_dtype == at::kBFloat16,
                    "q: the CUDA op takes float32, float64, float16 or bfloat16, got ", P.in_dtype);
  KernelSpec s;
  s.layers = P.L();
  s.dims[0] = width(P.Dk);
  for (int l = 0; l < P.L(); ++l) s.dims[l + 1] = width(P.shapes[l][0]);
  s.gelu = mp.activation == Activation::Gelu;
  s.residual = mp.memory == Memory::Mlp && mp.residual_norm;
  s.bias = mp.bias;
  s.delta_layout = !delta.has_value()   ? DeltaLayout::none
                   : delta->dim() == 4 ? DeltaLayout::per_channel
                                       : DeltaLayout::per_row;
  s.p = mp.p;
  s.eps = mp.eps;
  s.retention = mp.retention;
  s.norm_order = mp.norm_order;
  s.norm_floor = mp.norm_floor;
  s.norm_mean = mp.norm_mean;
  s.ln_eps = mp.ln_eps;
  s.shrinkage = mp.shrinkage;
  s.simplex_scale = mp.simplex_scale;  // < 0: the kernels use sqrt(fan_in)
  s.has_alpha = mp.retention != Retention::None;
  s.momentum = mp.momentum();
  s.per_channel = mp.per_channel;
  s.retained = mp.grad_at_retained;
  s.exact = mp.exact_chunks();
  s.scale = mp.scale;
  return s;
}

// ------------------------------------------------------------------------------------------------
// One call: the kernels' inputs, schedule, workspace and states.

struct Call {
  KernelSpec spec;
  Schedule schedule;
  at::Tensor q, k, v;                         // contiguous, q's dtype
  at::Tensor lr, alpha, momentum, delta;      // contiguous, compute dtype (undefined when absent)
  at::Tensor device_schedule;                 // runs, seq_begin and batch packed as int64 on the device
  at::Tensor work;                            // [grid, workspace total] in the compute dtype
  int64_t grid = 0;                           // blocks launched; each runs pairs b, b + grid, ... of N*H
  TensorVec memory, momentum_state, anchor;   // [N*H, *shape], updated in place by the kernels
  Checkpoints ck;                             // flattened [S_max*H, *shape]; empty: none
  bool launch = false;                        // some block has a run
};

// Device memory the workspace allocation can get: what the driver reports free plus what torch's caching
// allocator holds unused (reserved minus allocated), which it releases and retries with when a cudaMalloc
// fails. cudaMemGetInfo alone misses the latter, so in a warm process (a benchmark, a training loop) the
// grid shrank to a few blocks. An allocator backend without these statistics counts as holding nothing.
int64_t available_device_bytes() {
  size_t free_bytes = 0, total_bytes = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  int64_t cached = 0;
  try {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device());
    constexpr auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    cached = std::max<int64_t>(0, stats.reserved_bytes[all].current - stats.allocated_bytes[all].current);
  } catch (const c10::Error&) {
  }
  return int64_t(free_bytes) + cached;
}

// runs (3 int64 each), seq_begin, batch: one pinned host buffer, one asynchronous copy.
at::Tensor upload_schedule(const Schedule& s, at::Device device) {
  static_assert(sizeof(RunDesc) == 3 * sizeof(int64_t) && alignof(RunDesc) == alignof(int64_t));
  const int64_t R = static_cast<int64_t>(s.runs.size());
  const int64_t S = static_cast<int64_t>(s.seq_begin.size()), N = static_cast<int64_t>(s.batch.size());
  at::Tensor host = at::empty({3 * R + S + N}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  char* dst = static_cast<char*>(host.mutable_data_ptr());
  auto put = [&](const void* src, size_t bytes) {
    if (bytes > 0) std::memcpy(dst, src, bytes);
    dst += bytes;
  };
  put(s.runs.data(), R * sizeof(RunDesc));
  put(s.seq_begin.data(), S * sizeof(int64_t));
  put(s.batch.data(), N * sizeof(int64_t));
  return host.to(device, at::kLong, /*non_blocking=*/true);
}

Call prepare(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lr,
             const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& momentum,
             const std::optional<at::Tensor>& delta, bool backward) {
  Call c;
  c.spec = kernel_spec(P, delta);
  c.schedule = make_schedule(P.pos, P.cu, P.T, P.chunk, P.mp.lag_token);
  auto gate = [&](const std::optional<at::Tensor>& g) {
    return g.has_value() ? g->to(P.ct).contiguous() : at::Tensor();
  };
  c.q = q.contiguous();
  c.k = k.contiguous();
  c.v = v.contiguous();
  c.lr = lr.to(P.ct).contiguous();
  c.alpha = gate(alpha);
  c.momentum = gate(momentum);
  c.delta = gate(delta);
  c.launch = P.N * P.H > 0 && !c.schedule.runs.empty();
  if (c.launch) {
    c.device_schedule = upload_schedule(c.schedule, P.device);
    const int64_t total = cuda::workspace_layout(c.spec, c.schedule.max_len, backward).total;
    // Two waves of one block per multiprocessor (the kernels' register use allows one): enough to balance
    // uneven sequences, while the workspace stays bounded whatever N * H is; and no more workspaces than
    // half the available device memory holds (a backward keeps n |W| floats per block, 67 MB for an MLP of
    // head dim 128 with momentum at chunk 64). ATen/cuda/CUDAContext.h would need the CUDA math libraries'
    // headers, which the build does not have: the runtime answers directly.
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
    const int64_t block_bytes = std::max<int64_t>(1, total * int64_t(c10::elementSize(P.ct)));
    const int64_t fit = std::max<int64_t>(1, available_device_bytes() / 2 / block_bytes);
    c.grid = std::min({P.N * P.H, 2 * int64_t(sms), fit});
    c.work = at::empty({c.grid, total}, P.options());
  }
  return c;
}

// field = t's data (null for an undefined tensor), read-only where the field is.
template <typename X>
void set(X*& field, const at::Tensor& t) {
  if (!t.defined()) {
    field = nullptr;
  } else if constexpr (std::is_const_v<X>) {
    field = static_cast<X*>(t.const_data_ptr());
  } else {
    field = static_cast<X*>(t.mutable_data_ptr());
  }
}

template <typename T, typename A>
MemoryArgs<T, A> kernel_args(const Problem& P, const Call& c) {
  MemoryArgs<T, A> a;
  a.spec = c.spec;
  a.T_len = P.T;
  a.H = P.H;
  const int64_t* sched = c.device_schedule.const_data_ptr<int64_t>();
  const int64_t runs = static_cast<int64_t>(c.schedule.runs.size());
  a.runs = reinterpret_cast<const RunDesc*>(sched);
  a.seq_begin = sched + 3 * runs;
  a.batch = a.seq_begin + (P.N + 1);
  set(a.q, c.q);
  set(a.k, c.k);
  set(a.v, c.v);
  set(a.lr, c.lr);
  set(a.alpha, c.alpha);
  set(a.mom, c.momentum);
  set(a.delta, c.delta);
  auto set_list = [](A* (&fields)[cuda::kMaxLayers], const TensorVec& xs) {
    for (size_t l = 0; l < xs.size(); ++l) set(fields[l], xs[l]);
  };
  set_list(a.memory, c.memory);
  set_list(a.momentum, c.momentum_state);
  set_list(a.anchor, c.anchor);
  set_list(a.ck_memory, c.ck.memory);
  set_list(a.ck_momentum, c.ck.momentum);
  set_list(a.ck_anchor, c.ck.anchor);
  set(a.work, c.work);
  a.items = P.N * P.H;
  a.work_stride = c.work.size(1);
  a.max_run = c.schedule.max_len;
  return a;
}

// The kernels' input type T and accumulation type A.
template <typename T_, typename A_>
struct Types {
  using T = T_;
  using A = A_;
};

// Calls f(Types<T, A>{}) for q's dtype (checked by kernel_spec).
template <typename F>
void dispatch_types(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(Types<float, float>{});
    case at::kDouble: return f(Types<double, double>{});
    case at::kHalf: return f(Types<__half, float>{});
    case at::kBFloat16: return f(Types<__nv_bfloat16, float>{});
    default: TORCH_INTERNAL_ASSERT(false, "memory CUDA op: unexpected dtype ", dtype);
  }
}

// Launches the forward or backward kernels on the current stream (nothing when no block has a run), with the
// call's arguments completed by fill(args).
template <typename Fill>
void run_kernels(const Problem& P, const Call& c, bool backward, Fill&& fill) {
  if (!c.launch) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(P.in_dtype, [&](auto types) {
    using T = typename decltype(types)::T;
    using A = typename decltype(types)::A;
    MemoryArgs<T, A> args = kernel_args<T, A>(P, c);
    fill(args);
    if (backward) {
      cuda::launch_memory_backward<T, A>(args, c.grid, stream);
    } else {
      cuda::launch_memory_forward<T, A>(args, c.grid, stream);
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Forward.

FwdResult memory_chunk_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lr,
                                const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& momentum,
                                const std::optional<at::Tensor>& delta, at::TensorList memory,
                                at::TensorList momentum_state, at::TensorList anchor, const at::Tensor& position,
                                const std::optional<at::Tensor>& cu_seqlens, c10::string_view spec, double scale,
                                int64_t chunk_size, bool save_checkpoints) {
  const Problem P =
      make_problem(c10::DeviceType::CUDA, q, k, v, lr, alpha, momentum, delta, position, cu_seqlens, spec, scale,
                   chunk_size);
  const c10::cuda::CUDAGuard guard(P.device);
  const int L = P.L(), M = P.M();
  check_states("memory", memory, L, P);
  check_states("momentum_state", momentum_state, M, P);
  check_states("anchor", anchor, L, P);

  Call c = prepare(P, q, k, v, lr, alpha, momentum, delta, /*backward=*/false);
  for (int l = 0; l < L; ++l) c.memory.push_back(flat_state_copy(memory[l], P, l));
  for (int l = 0; l < M; ++l) c.momentum_state.push_back(flat_state_copy(momentum_state[l], P, l));
  for (int l = 0; l < L; ++l) c.anchor.push_back(flat_state_copy(anchor[l], P, l));
  TensorVec ck_out;
  if (save_checkpoints) c.ck = allocate_checkpoints(P, c.schedule.used_rows, ck_out);
  at::Tensor o = at::empty({P.B, P.T, P.H, P.Dv}, c.q.options());  // every token belongs to a run

  run_kernels(P, c, /*backward=*/false, [&](auto& args) { set(args.o, o); });

  unflat_states(c.memory, P);
  unflat_states(c.momentum_state, P);
  unflat_states(c.anchor, P);
  return {o, c.memory, c.momentum_state, c.anchor, advanced_position(P, position), ck_out};
}

// ------------------------------------------------------------------------------------------------
// Backward.

BwdResult memory_chunk_bwd_cuda(const at::Tensor& grad_o, at::TensorList grad_memory, at::TensorList grad_momentum,
                                at::TensorList grad_anchor, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& lr, const std::optional<at::Tensor>& alpha,
                                const std::optional<at::Tensor>& momentum, const std::optional<at::Tensor>& delta,
                                at::TensorList checkpoints, const at::Tensor& position,
                                const std::optional<at::Tensor>& cu_seqlens, c10::string_view spec, double scale,
                                int64_t chunk_size) {
  const Problem P =
      make_problem(c10::DeviceType::CUDA, q, k, v, lr, alpha, momentum, delta, position, cu_seqlens, spec, scale,
                   chunk_size);
  const c10::cuda::CUDAGuard guard(P.device);
  const int L = P.L(), M = P.M();
  check_grad_o(grad_o, P);
  Call c = prepare(P, q, k, v, lr, alpha, momentum, delta, /*backward=*/true);
  c.ck = split_checkpoints(P, checkpoints, c.schedule.used_rows);
  // Initialised with the final-state gradients (zeros where none flows back); the kernels turn them into the
  // initial-state gradients, and pass them through for sequences without tokens.
  auto start_grads = [&](TensorVec& out, const TensorVec& end) {
    for (size_t l = 0; l < end.size(); ++l) {
      out.push_back(end[l].defined() ? end[l].clone(at::MemoryFormat::Contiguous)
                                     : at::zeros(P.state_shape(static_cast<int>(l), P.N * P.H), P.options()));
    }
  };
  start_grads(c.memory, final_state_grads("grad_memory", grad_memory, L, P));
  start_grads(c.momentum_state, final_state_grads("grad_momentum", grad_momentum, M, P));
  start_grads(c.anchor, final_state_grads("grad_anchor", grad_anchor, L, P));

  const at::Tensor go = grad_o.to(P.in_dtype).contiguous();
  auto like = [](const at::Tensor& x) { return x.defined() ? at::empty(x.sizes(), x.options()) : at::Tensor(); };
  at::Tensor dq = like(c.q), dk = like(c.k), dv = like(c.v);  // every token belongs to a run
  at::Tensor dlr = like(c.lr), dalpha = like(c.alpha), dmom = like(c.momentum), ddelta = like(c.delta);

  run_kernels(P, c, /*backward=*/true, [&](auto& args) {
    set(args.grad_o, go);
    set(args.dq, dq);
    set(args.dk, dk);
    set(args.dv, dv);
    set(args.dlr, dlr);
    set(args.dalpha, dalpha);
    set(args.dmom, dmom);
    set(args.ddelta, ddelta);
  });

  // Gate gradients in the gates' dtypes; absent gates give an empty tensor, as in the CPU op.
  auto gate_grad = [&](const std::optional<at::Tensor>& gate, const at::Tensor& grad) {
    return gate.has_value() ? grad.to(gate->scalar_type()) : at::empty({0}, P.options());
  };
  unflat_states(c.memory, P);
  unflat_states(c.momentum_state, P);
  unflat_states(c.anchor, P);
  return {dq,
          dk,
          dv,
          gate_grad(lr, dlr),
          gate_grad(alpha, dalpha),
          gate_grad(momentum, dmom),
          gate_grad(delta, ddelta),
          c.memory,
          c.momentum_state,
          c.anchor};
}

}  // namespace

TORCH_LIBRARY_IMPL(miras_ext, CUDA, m) {
  m.impl("memory_chunk_fwd", &memory_chunk_fwd_cuda);
  m.impl("memory_chunk_bwd", &memory_chunk_bwd_cuda);
}

}  // namespace miras
