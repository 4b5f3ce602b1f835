// Runs the memory kernels of csrc/cuda/memory/memory_kernels.cuh (the forward without, then with checkpoints,
// then the backward) through the CPU emulator on one case written by tests/cuda_emu/test_memory_emulated.py,
// and writes every output as float64 for the test to compare with the CPU op (memory_chunk_fwd / _bwd).
//
// Usage: memory_driver CASE_FILE OUT_FILE [ordered|reverse|shuffled:SEED]
//
// Case file: text lines "key value..." (the KernelSpec fields, enums by name, and the call's sizes), then
// "array NAME COUNT" lines each followed by COUNT little-endian float64 values, then "end". Arrays:
//   q, k [B, T, H, Dk], v [B, T, H, Dv]        rounded here to the kernel's input type
//   lr [, alpha, momentum] [B, T, H, Dg]; delta [B, T, H] or [B, T, H, Dv] (when present)
//   memory{l}, anchor{l} [, momentum{l}] [N*H, *shape]: the initial state
//   grad_o [B, T, H, Dv]; gmemory{l}, ganchor{l} [, gmomentum{l}]: gradients of the final state
// Output file: the same "array NAME COUNT" + float64 records, then "end":
//   o, memory{l}/momentum{l}/anchor{l} (final state), ck_memory{l}/ck_momentum{l}/ck_anchor{l} (checkpoint rows
//   [0, used_rows) as [used_rows * H, *shape]), dq, dk, dv, dlr [, dalpha, dmom, ddelta], gmemory{l},
//   gmomentum{l}, ganchor{l} (gradients of the initial state).
// Outputs, checkpoints and the workspace start as NaN, so that values the kernels do not write (or read before
// writing) show; each buffer the kernels write has NaN guard entries after its end, and checkpoint rows that
// no run uses must stay NaN too; the forward without checkpoints must give the same o and final state, bit
// for bit ("check failed: ..." lines on stdout otherwise).
// Exit status: 0 done, 1 a launch failed (the emulator's report on stdout), 2 bad input, 3 a check failed.
#include "emu/cuda_emu.h"

#include "cuda/memory/memory_kernels.cuh"

#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using miras::Bias;
using miras::DeltaLayout;
using miras::Retention;
using miras::cuda::KernelSpec;

struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename T>
double to_d(T x) {
  return double(miras::cuda::to_acc(x));
}
template <typename T>
T from_d(double x) {
  return miras::cuda::from_acc<T>(miras::cuda::acc_of<T>(x));
}

template <typename E, std::size_t K>
E by_name(const std::string& key, const std::string& value, const std::pair<const char*, E> (&names)[K]) {
  for (const auto& [n, e] : names)
    if (value == n) return e;
  throw BadInput(key + ": unknown value '" + value + "'");
}

constexpr std::pair<const char*, Bias> kBiases[] = {{"dot", Bias::dot},       {"l2", Bias::l2},
                                                    {"lp", Bias::lp},         {"huber", Bias::huber},
                                                    {"huber_norm", Bias::huber_norm}, {"yaad", Bias::yaad},
                                                    {"value_shift", Bias::value_shift}};
constexpr std::pair<const char*, DeltaLayout> kLayouts[] = {
    {"none", DeltaLayout::none}, {"per_row", DeltaLayout::per_row}, {"per_channel", DeltaLayout::per_channel}};
constexpr std::pair<const char*, Retention> kRetentions[] = {
    {"none", Retention::None},         {"l2", Retention::L2}, {"lq", Retention::Lq}, {"kl", Retention::Kl},
    {"elastic_net", Retention::ElasticNet}, {"sigmoid", Retention::Sigmoid}};

struct Case {
  std::string dtype;
  KernelSpec spec;
  int64_t B = 0, T = 0, H = 0, N = 0, chunk = 1;
  bool lag = false;
  std::vector<int64_t> pos, cu;
  std::map<std::string, std::vector<double>> arrays;

  const std::vector<double>& array(const std::string& name, std::size_t count) const {
    const auto it = arrays.find(name);
    if (it == arrays.end()) throw BadInput("missing array " + name);
    if (it->second.size() != count)
      throw BadInput("array " + name + ": expected " + std::to_string(count) + " values, got " +
                     std::to_string(it->second.size()));
    return it->second;
  }
  bool has(const std::string& name) const { return arrays.count(name) != 0; }
};

std::string read_file(const char* path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw BadInput(std::string("cannot open ") + path);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

Case parse_case(const std::string& text) {
  Case c;
  KernelSpec& s = c.spec;
  std::size_t at = 0;
  bool ended = false;
  while (at < text.size() && !ended) {
    const std::size_t nl = text.find('\n', at);
    if (nl == std::string::npos) throw BadInput("unterminated line");
    std::istringstream line(text.substr(at, nl - at));
    at = nl + 1;
    std::string key;
    line >> key;
    auto num = [&] {
      std::string w;
      if (!(line >> w)) throw BadInput(key + ": missing value");
      return std::strtod(w.c_str(), nullptr);
    };
    auto integer = [&] {
      int64_t v;
      if (!(line >> v)) throw BadInput(key + ": missing integer");
      return v;
    };
    auto word = [&] {
      std::string w;
      if (!(line >> w)) throw BadInput(key + ": missing value");
      return w;
    };
    auto ints = [&] {
      std::vector<int64_t> xs;
      int64_t v;
      while (line >> v) xs.push_back(v);
      return xs;
    };
    if (key.empty() || key == "miras_memory_case") continue;
    if (key == "end") ended = true;
    else if (key == "dtype") c.dtype = word();
    else if (key == "layers") s.layers = int32_t(integer());
    else if (key == "dims") {
      const auto d = ints();
      if (int(d.size()) != s.layers + 1 || s.layers < 1 || s.layers > miras::cuda::kMaxLayers)
        throw BadInput("dims: expected layers + 1 values (set layers first)");
      for (int l = 0; l <= s.layers; ++l) s.dims[l] = int32_t(d[std::size_t(l)]);
    } else if (key == "gelu") s.gelu = int32_t(integer());
    else if (key == "residual") s.residual = int32_t(integer());
    else if (key == "bias") s.bias = by_name(key, word(), kBiases);
    else if (key == "delta_layout") s.delta_layout = by_name(key, word(), kLayouts);
    else if (key == "p") s.p = num();
    else if (key == "eps") s.eps = num();
    else if (key == "retention") s.retention = by_name(key, word(), kRetentions);
    else if (key == "norm_order") s.norm_order = num();
    else if (key == "norm_floor") s.norm_floor = num();
    else if (key == "norm_mean") s.norm_mean = int32_t(integer());
    else if (key == "ln_eps") s.ln_eps = num();
    else if (key == "shrinkage") s.shrinkage = num();
    else if (key == "simplex_scale") s.simplex_scale = num();
    else if (key == "has_alpha") s.has_alpha = int32_t(integer());
    else if (key == "momentum") s.momentum = int32_t(integer());
    else if (key == "per_channel") s.per_channel = int32_t(integer());
    else if (key == "retained") s.retained = int32_t(integer());
    else if (key == "exact") s.exact = int32_t(integer());
    else if (key == "scale") s.scale = num();
    else if (key == "B") c.B = integer();
    else if (key == "T") c.T = integer();
    else if (key == "H") c.H = integer();
    else if (key == "N") c.N = integer();
    else if (key == "chunk") c.chunk = integer();
    else if (key == "lag") c.lag = integer() != 0;
    else if (key == "position") c.pos = ints();
    else if (key == "cu_seqlens") c.cu = ints();
    else if (key == "array") {
      const std::string name = word();
      const int64_t count = integer();
      const std::size_t bytes = std::size_t(count) * sizeof(double);
      if (count < 0 || at + bytes > text.size()) throw BadInput("array " + name + ": truncated");
      std::vector<double> xs(static_cast<std::size_t>(count));
      std::memcpy(xs.data(), text.data() + at, bytes);
      at += bytes;
      c.arrays[name] = std::move(xs);
    } else {
      throw BadInput("unknown key '" + key + "'");
    }
  }
  if (!ended) throw BadInput("missing 'end'");
  if (int64_t(c.pos.size()) != c.N) throw BadInput("position: expected N values");
  if (!c.cu.empty() && int64_t(c.cu.size()) != c.N + 1) throw BadInput("cu_seqlens: expected N + 1 values");
  if (c.cu.empty() && c.N != c.B) throw BadInput("N: expected B without cu_seqlens");
  if (c.chunk < 1) throw BadInput("chunk: expected >= 1");
  return c;
}

// A buffer the kernels write, with kGuard NaN entries after its n values: a write past the end (or into
// `[from, n)` where nothing may be written) leaves a different bit pattern there.
constexpr std::size_t kGuard = 64;

template <typename X>
struct Buf {
  std::vector<X> v;
  std::size_t n = 0;
  Buf() = default;
  explicit Buf(std::size_t count) : v(count + kGuard, from_d<X>(NAN)), n(count) {}
  explicit Buf(const std::vector<double>& xs) : Buf(xs.size()) {
    for (std::size_t i = 0; i < n; ++i) v[i] = from_d<X>(xs[i]);
  }
  X* data() { return n ? v.data() : nullptr; }
  void fill_nan() { std::fill(v.begin(), v.end(), from_d<X>(NAN)); }
  // Entries in [from, n + kGuard) that are not the NaN they started as.
  std::size_t touched(std::size_t from) const {
    const X nan = from_d<X>(NAN);
    std::size_t bad = 0;
    for (std::size_t i = from; i < v.size(); ++i) bad += std::memcmp(&v[i], &nan, sizeof(X)) != 0;
    return bad;
  }
};

struct Output {
  std::ofstream f;
  std::vector<std::string> violations;  // failed checks: writes out of bounds, ...
  explicit Output(const char* path) : f(path, std::ios::binary) {
    if (!f) throw BadInput(std::string("cannot write ") + path);
  }
  // The first `count` values of b as float64; checks that nothing at or after `clean_from` was written.
  template <typename X>
  void put(const std::string& name, const Buf<X>& b, std::size_t count, std::size_t clean_from) {
    if (const std::size_t bad = b.touched(clean_from))
      violations.push_back(name + ": " + std::to_string(bad) + " entries written at or after index " +
                           std::to_string(clean_from) + " of " + std::to_string(b.n));
    f << "array " << name << " " << count << "\n";
    for (std::size_t i = 0; i < count; ++i) {
      const double d = to_d(b.v[i]);
      f.write(reinterpret_cast<const char*>(&d), sizeof d);
    }
  }
  template <typename X>
  void put(const std::string& name, const Buf<X>& b) {
    put(name, b, b.n, b.n);
  }
};

// Forward without and with checkpoints, then backward; returns 0, or 1 after printing a launch failure.
template <typename T, typename A>
int run(const Case& c, const emu::Schedule& sched, Output& out) {
  const KernelSpec& s = c.spec;
  const int L = s.layers, M = s.momentum ? L : 0;
  const int64_t Dk = s.dims[0], Dv = s.dims[L], Dg = s.dg(), NH = c.N * c.H;
  const std::size_t tokens = std::size_t(c.B * c.T * c.H);
  const std::size_t tok_k = tokens * Dk, tok_v = tokens * Dv, gate_n = tokens * Dg;
  const std::size_t delta_n = s.delta_layout == DeltaLayout::none          ? 0
                              : s.delta_layout == DeltaLayout::per_channel ? tok_v
                                                                           : tokens;
  auto input = [&](const char* name, std::size_t n, bool present) -> std::vector<double> {
    return present ? c.array(name, n) : std::vector<double>();
  };

  Buf<T> q(c.array("q", tok_k)), k(c.array("k", tok_k)), v(c.array("v", tok_v)), grad_o(c.array("grad_o", tok_v));
  Buf<A> lr(c.array("lr", gate_n)), alpha(input("alpha", gate_n, s.has_alpha)),
      mom(input("momentum", gate_n, s.momentum)), delta(input("delta", delta_n, delta_n > 0));

  const miras::Schedule sc = miras::make_schedule(c.pos, c.cu, c.T, c.chunk, c.lag);
  const int64_t S = miras::checkpoint_rows(c.N, c.T, c.chunk, c.lag, !c.cu.empty());
  if (sc.used_rows > S) throw BadInput("schedule uses more checkpoint rows than S_max");

  std::vector<Buf<A>> mem(L), momst(M), anc(L), ck_mem(L), ck_mom(M), ck_anc(L);
  miras::cuda::MemoryArgs<T, A> a;
  a.spec = s;
  a.T_len = c.T;
  a.H = c.H;
  a.runs = sc.runs.data();
  a.seq_begin = sc.seq_begin.data();
  a.batch = sc.batch.data();
  a.q = q.data();
  a.k = k.data();
  a.v = v.data();
  a.lr = lr.data();
  a.alpha = alpha.data();
  a.mom = mom.data();
  a.delta = delta.data();
  // The state buffers from the arrays PREFIX{memory,momentum,anchor}{l}, and the kernels' pointers to them.
  auto load_states = [&](const std::string& prefix) {
    for (int l = 0; l < L; ++l) {
      const std::size_t n = std::size_t(NH * s.size(l));
      const std::string sl = std::to_string(l);
      mem[l] = Buf<A>(c.array(prefix + "memory" + sl, n));
      anc[l] = Buf<A>(c.array(prefix + "anchor" + sl, n));
      a.memory[l] = mem[l].data();
      a.anchor[l] = anc[l].data();
      if (l < M) {
        momst[l] = Buf<A>(c.array(prefix + "momentum" + sl, n));
        a.momentum[l] = momst[l].data();
      }
    }
  };
  auto put_states = [&](const std::string& prefix) {
    for (int l = 0; l < L; ++l) out.put(prefix + "memory" + std::to_string(l), mem[l]);
    for (int l = 0; l < M; ++l) out.put(prefix + "momentum" + std::to_string(l), momst[l]);
    for (int l = 0; l < L; ++l) out.put(prefix + "anchor" + std::to_string(l), anc[l]);
  };
  load_states("");
  for (int l = 0; l < L; ++l) {
    const std::size_t ckn = std::size_t(S * c.H * s.size(l));
    ck_mem[l] = Buf<A>(ckn);
    ck_anc[l] = Buf<A>(ckn);
    a.ck_memory[l] = ck_mem[l].data();
    a.ck_anchor[l] = ck_anc[l].data();
    if (l < M) {
      ck_mom[l] = Buf<A>(ckn);
      a.ck_momentum[l] = ck_mom[l].data();
    }
  }
  const int64_t wf = miras::cuda::workspace_layout(s, sc.max_len, false).total;
  const int64_t wb = miras::cuda::workspace_layout(s, sc.max_len, true).total;
  // Fewer blocks than pairs (as on a GPU with many pairs), so that blocks run several pairs in turn.
  const int64_t blocks = std::max<int64_t>(1, (NH + 1) / 2);
  Buf<A> work(std::size_t(blocks * std::max(wf, wb)));
  a.work = work.data();
  a.work_stride = wf;
  a.max_run = sc.max_len;
  Buf<T> o(tok_v);
  a.o = o.data();

  // As the CUDA host (csrc/cuda/memory/memory_cuda.cpp): no launch when no sequence has a token.
  const bool launch = NH > 0 && !sc.runs.empty();
  a.items = NH;
  const dim3 grid{unsigned(blocks)}, block{unsigned(miras::cuda::kMemoryThreads)};
  const emu::LaunchConfig cfg{grid, block, 0, sched};
  auto launch_failed = [](const char* which, const emu::Error& e) {
    std::printf("%s launch failed: %s\n", which, e.what());
    return 1;
  };
  auto check_work = [&](const char* which, int64_t total) {  // each block's workspace is `total` long
    if (const std::size_t bad = work.touched(std::size_t(NH * total)))
      out.violations.push_back(std::string(which) + " workspace: " + std::to_string(bad) +
                               " entries written past N*H*total");
  };
  // First the forward without checkpoints (null ck pointers, as when nothing needs a gradient), on copies of
  // the initial state; its o and final state must be those of the forward with checkpoints, bit for bit.
  auto bits_differ = [](const auto& x, const auto& y) {
    return x.v.size() != y.v.size() || std::memcmp(x.v.data(), y.v.data(), x.v.size() * sizeof(x.v[0])) != 0;
  };
  std::vector<Buf<A>> plain_mem = mem, plain_mom = momst, plain_anc = anc;
  Buf<T> plain_o(tok_v);
  if (launch) {
    miras::cuda::MemoryArgs<T, A> p = a;
    for (int l = 0; l < L; ++l) {
      p.memory[l] = plain_mem[l].data();
      p.anchor[l] = plain_anc[l].data();
      p.ck_memory[l] = p.ck_anchor[l] = p.ck_momentum[l] = nullptr;
      if (l < M) p.momentum[l] = plain_mom[l].data();
    }
    p.o = plain_o.data();
    try {
      emu::launch(cfg, &miras::cuda::memory_forward_kernel<T, A>, p);
    } catch (const emu::Error& e) {
      return launch_failed("forward (no checkpoints)", e);
    }
    check_work("forward (no checkpoints)", wf);
    work.fill_nan();
    try {
      emu::launch(cfg, &miras::cuda::memory_forward_kernel<T, A>, a);
    } catch (const emu::Error& e) {
      return launch_failed("forward", e);
    }
  }
  bool same = !bits_differ(plain_o, o);
  for (int l = 0; l < L; ++l) same = same && !bits_differ(plain_mem[l], mem[l]) && !bits_differ(plain_anc[l], anc[l]);
  for (int l = 0; l < M; ++l) same = same && !bits_differ(plain_mom[l], momst[l]);
  if (!same) out.violations.push_back("the forward without checkpoints gives another o or final state");
  check_work("forward", wf);
  out.put("o", o);
  put_states("");
  // Checkpoint rows [0, used_rows); no run writes the others.
  for (int l = 0; l < L; ++l) {
    const std::size_t used = std::size_t(sc.used_rows * c.H * s.size(l));
    out.put("ck_memory" + std::to_string(l), ck_mem[l], used, used);
    if (l < M) out.put("ck_momentum" + std::to_string(l), ck_mom[l], used, used);
    out.put("ck_anchor" + std::to_string(l), ck_anc[l], used, used);
  }

  // Backward: the state buffers now hold the gradients of the final state, the checkpoints are the forward's.
  load_states("g");
  work.fill_nan();
  a.work_stride = wb;
  a.o = nullptr;
  a.grad_o = grad_o.data();
  Buf<T> dq(tok_k), dk(tok_k), dv(tok_v);
  Buf<A> dlr(gate_n), dalpha(alpha.n), dmom(mom.n), ddelta(delta.n);
  a.dq = dq.data();
  a.dk = dk.data();
  a.dv = dv.data();
  a.dlr = dlr.data();
  a.dalpha = dalpha.data();
  a.dmom = dmom.data();
  a.ddelta = ddelta.data();
  if (launch) {
    try {
      emu::launch(cfg, &miras::cuda::memory_backward_kernel<T, A>, a);
    } catch (const emu::Error& e) {
      return launch_failed("backward", e);
    }
  }
  check_work("backward", wb);
  out.put("dq", dq);
  out.put("dk", dk);
  out.put("dv", dv);
  out.put("dlr", dlr);
  if (dalpha.n) out.put("dalpha", dalpha);
  if (dmom.n) out.put("dmom", dmom);
  if (ddelta.n) out.put("ddelta", ddelta);
  put_states("g");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::fprintf(stderr, "usage: %s CASE_FILE OUT_FILE [ordered|reverse|shuffled:SEED]\n", argv[0]);
    return 2;
  }
  try {
    const Case c = parse_case(read_file(argv[1]));
    const emu::Schedule sched = emu::parse_schedule(argc > 3 ? argv[3] : "ordered");
    Output out(argv[2]);
    int rc;
    if (c.dtype == "float64") rc = run<double, double>(c, sched, out);
    else if (c.dtype == "float32") rc = run<float, float>(c, sched, out);
    else if (c.dtype == "float16") rc = run<__half, float>(c, sched, out);
    else if (c.dtype == "bfloat16") rc = run<__nv_bfloat16, float>(c, sched, out);
    else throw BadInput("dtype: expected float64, float32, float16 or bfloat16, got '" + c.dtype + "'");
    out.f << "end\n";
    out.f.close();
    if (!out.f) throw BadInput(std::string("writing ") + argv[2] + " failed");
    for (const auto& v : out.violations) std::printf("check failed: %s\n", v.c_str());
    return rc ? rc : out.violations.empty() ? 0 : 3;
  } catch (const BadInput& e) {
    std::printf("bad input: %s\n", e.what());
    return 2;
  }
}
