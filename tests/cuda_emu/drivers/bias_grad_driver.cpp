// Runs csrc/cuda/bias_grad_kernels.cuh (forward and backward) through the CPU emulator for every attentional
// bias and delta layout, every dtype and a few odd row lengths, under the given schedules, and compares with
// the host formulas of csrc/common/bias.h evaluated serially in double on the same (rounded) inputs.
// Output: one line per case, then "summary: N cases, F failures". Exit status 1 on any failure.
// Usage: bias_grad_driver [ordered|reverse|shuffled:SEED ...]   (default: all three orders)
#include "emu/cuda_emu.h"

#include "cuda/bias_grad_kernels.cuh"

#include <cinttypes>
#include <random>
#include <string>
#include <vector>

namespace {

using miras::Bias;
using miras::DeltaLayout;
using miras::RowProblem;

template <typename T>
double to_d(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else return double(x);
}
template <typename T>
T from_d(double x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half(float(x));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16(float(x));
  else return T(x);
}
template <typename T>
const char* dtype_name() {
  if constexpr (std::is_same_v<T, __half>) return "float16";
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return "bfloat16";
  else if constexpr (std::is_same_v<T, float>) return "float32";
  else return "float64";
}
template <typename T>
double tolerance() {
  if constexpr (std::is_same_v<T, __half>) return 4e-3;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return 3e-2;
  else if constexpr (std::is_same_v<T, float>) return 2e-5;
  else return 1e-11;
}

struct Case {
  const char* name;
  Bias bias;
  DeltaLayout layout;
  double p;
};

const Case kCases[] = {
    {"dot", Bias::dot, DeltaLayout::none, 2.0},
    {"l2", Bias::l2, DeltaLayout::none, 2.0},
    {"lp", Bias::lp, DeltaLayout::none, 3.0},
    {"l1", Bias::lp, DeltaLayout::none, 1.0},
    {"huber", Bias::huber, DeltaLayout::per_row, 2.0},
    {"huber", Bias::huber, DeltaLayout::per_channel, 2.0},
    {"huber_norm", Bias::huber_norm, DeltaLayout::per_row, 2.0},
    {"yaad", Bias::yaad, DeltaLayout::per_row, 2.0},
    {"value_shift", Bias::value_shift, DeltaLayout::per_row, 2.0},
};

const char* layout_name(DeltaLayout l) {
  return l == DeltaLayout::none ? "none" : l == DeltaLayout::per_row ? "per_row" : "per_channel";
}

// max |a - b| / max |b| over the entries (b the reference); NaN anywhere in a gives infinity.
double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 1e-300;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i])) return INFINITY;
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return num / den;
}

template <typename T>
std::vector<double> as_double(const std::vector<T>& x) {
  std::vector<double> r(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) r[i] = to_d(x[i]);
  return r;
}

template <typename T>
int run_case(const Case& c, int64_t rows, int64_t dv, const emu::Schedule& sched, std::uint64_t seed) {
  const RowProblem pr{c.bias, c.layout, c.p, 1e-6, rows, dv};
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  const std::size_t n = std::size_t(rows * dv);
  std::vector<T> y(n), v(n), u(n);
  for (auto& x : y) x = from_d<T>(normal(rng));
  for (auto& x : v) x = from_d<T>(normal(rng));
  for (auto& x : u) x = from_d<T>(normal(rng));
  const auto yd = as_double(y), vd = as_double(v), ud = as_double(u);
  // Thresholds a factor 2 away from the row norm (half the rows inside, half outside), midway between two
  // middle |r| for per-row huber (so that no coordinate sits on the threshold), and 0.5 or 2 times |r| per coordinate.
  std::vector<T> delta;
  if (c.layout == DeltaLayout::per_row) {
    delta.resize(std::size_t(rows));
    for (int64_t i = 0; i < rows; ++i) {
      std::vector<double> ar;
      double sq = 0;
      for (int64_t j = 0; j < dv; ++j) {
        const double r = yd[i * dv + j] - vd[i * dv + j];
        sq += r * r;
        ar.push_back(std::abs(r));
      }
      std::sort(ar.begin(), ar.end());
      const double d = c.bias == Bias::huber ? 0.5 * (ar[ar.size() / 2 - 1] + ar[ar.size() / 2]) : std::sqrt(sq) * (i % 2 ? 2.0 : 0.5);
      delta[std::size_t(i)] = from_d<T>(d);
    }
  } else if (c.layout == DeltaLayout::per_channel) {
    delta.resize(n);
    for (std::size_t k = 0; k < n; ++k) delta[k] = from_d<T>(std::abs(yd[k] - vd[k]) * (rng() % 2 ? 2.0 : 0.5));
  }
  const auto dd = as_double(delta);
  const T* dptr = delta.empty() ? nullptr : delta.data();

  // Reference: the same formulas in double, serially.
  const auto bp = miras::params_of<double>(pr);
  std::vector<double> g_ref(n), gy_ref(n), gv_ref(n), gd_ref(delta.size(), 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    double sq = 0, ru = 0;
    for (int64_t j = 0; j < dv; ++j) {
      const double r = yd[i * dv + j] - vd[i * dv + j];
      sq += r * r;
      ru += r * ud[i * dv + j];
    }
    for (int64_t j = 0; j < dv; ++j) {
      const std::size_t k = std::size_t(i * dv + j);
      const double r = yd[k] - vd[k];
      const double d = delta.empty() ? 0.0 : dd[std::size_t(miras::delta_offset(c.layout, i, j, dv))];
      g_ref[k] = miras::output_grad(bp, r, vd[k], d, sq);
      const double hu = miras::hessian_times(bp, r, ud[k], d, sq, ru);
      gy_ref[k] = c.bias == Bias::dot ? 0.0 : hu;
      gv_ref[k] = -hu;
      const double dg = miras::delta_grad_term(bp, r, ud[k], d, sq);
      if (c.layout == DeltaLayout::per_channel) gd_ref[k] = dg;
      if (c.layout == DeltaLayout::per_row) gd_ref[std::size_t(i)] += dg;
    }
  }

  // Outputs start as NaN, so that an entry the kernel does not write fails.
  const T nan = from_d<T>(NAN);
  std::vector<T> g(n, nan), gy(n, nan), gv(n, nan), gd(delta.size(), nan);
  const dim3 grid(unsigned((rows + miras::cuda::kWarpsPerBlock - 1) / miras::cuda::kWarpsPerBlock));
  const dim3 block(miras::cuda::kWarp * miras::cuda::kWarpsPerBlock);
  std::string error;
  try {
    emu::launch(emu::LaunchConfig{grid, block, 0, sched}, &miras::cuda::bias_grad_kernel<T>, pr, y.data(), v.data(),
                dptr, g.data());
    emu::launch(emu::LaunchConfig{grid, block, 0, sched}, &miras::cuda::bias_grad_backward_kernel<T>, pr, u.data(),
                y.data(), v.data(), dptr, gy.data(), gv.data(), gd.empty() ? nullptr : gd.data());
  } catch (const emu::Error& e) {
    error = e.what();
  }
  const double tol = tolerance<T>();
  const double e_g = rel_err(as_double(g), g_ref), e_gy = rel_err(as_double(gy), gy_ref),
               e_gv = rel_err(as_double(gv), gv_ref), e_gd = gd.empty() ? 0.0 : rel_err(as_double(gd), gd_ref);
  const bool ok = error.empty() && e_g <= tol && e_gy <= tol && e_gv <= tol && e_gd <= tol;
  const std::string sname =
      std::string(emu::order_name(sched.order)) + (sched.order == emu::Order::shuffled ? ":" + std::to_string(sched.seed) : "");
  std::printf("%s %s %s %s dv=%" PRId64 " rows=%" PRId64 " %s g=%.2e gy=%.2e gv=%.2e gd=%.2e tol=%.0e%s%s\n",
              ok ? "ok" : "FAIL", dtype_name<T>(), c.name, layout_name(c.layout), dv, rows, sname.c_str(), e_g, e_gy,
              e_gv, e_gd, tol, error.empty() ? "" : " error: ", error.c_str());
  return ok ? 0 : 1;
}

template <typename T>
void run_dtype(const std::vector<emu::Schedule>& scheds, int& cases, int& failures) {
  std::uint64_t seed = 1;
  for (const Case& c : kCases)
    for (int64_t dv : {7, 33, 100})
      for (const auto& s : scheds) {
        failures += run_case<T>(c, 9, dv, s, seed++);
        ++cases;
      }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<emu::Schedule> scheds;
  for (int i = 1; i < argc; ++i) scheds.push_back(emu::parse_schedule(argv[i]));
  if (scheds.empty()) scheds = {emu::parse_schedule("ordered"), emu::parse_schedule("reverse"), emu::parse_schedule("shuffled:7")};
  int cases = 0, failures = 0;
  run_dtype<float>(scheds, cases, failures);
  run_dtype<double>(scheds, cases, failures);
  run_dtype<__half>(scheds, cases, failures);
  run_dtype<__nv_bfloat16>(scheds, cases, failures);
  std::printf("summary: %d cases, %d failures\n", cases, failures);
  return failures ? 1 : 0;
}
