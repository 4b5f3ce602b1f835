// The block scheduler of the CUDA emulator: every thread of a block is a fiber; they run in rounds, each
// runnable thread going until it reaches a barrier, a warp operation, __nanosleep or its end. The order of a
// round is ordered (thread 0 first), reverse, or shuffled (a new seeded permutation every round).
// Barriers and warp operations complete when their last participant arrives; when nothing can move, the
// block is reported as deadlocked, with who waits where. Blocks run in parallel on a few OS threads; a
// block's fibers never leave its OS thread, so `__shared__` (thread_local) is per block.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <random>
#include <source_location>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "fiber.h"

// The CUDA built-in variables: per OS thread, rewritten by the scheduler before it switches into a fiber.
// (Not macros: cuda_runtime.h uses these names as parameter names.)
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
inline constexpr int warpSize = 32;

namespace emu {

enum class Order { ordered, reverse, shuffled };

struct Schedule {
  Order order = Order::ordered;
  std::uint64_t seed = 0;  // shuffled only
};

inline const char* order_name(Order o) {
  return o == Order::ordered ? "ordered" : o == Order::reverse ? "reverse" : "shuffled";
}

// "ordered", "reverse", "shuffled" or "shuffled:SEED".
inline Schedule parse_schedule(const std::string& s) {
  if (s == "ordered") return {Order::ordered, 0};
  if (s == "reverse") return {Order::reverse, 0};
  if (s.rfind("shuffled", 0) == 0) {
    std::uint64_t seed = 0;
    if (s.size() > 9 && s[8] == ':') seed = std::stoull(s.substr(9));
    return {Order::shuffled, seed};
  }
  throw std::invalid_argument("unknown schedule '" + s + "' (ordered, reverse, shuffled[:SEED])");
}

// Raised by launch() for deadlocks, divergent barriers, misuse of warp operations and kernel exceptions.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  std::size_t shared_bytes = 0;
  Schedule schedule;
  int workers = 0;  // OS threads running blocks; 0: one for small launches, else $EMU_WORKERS or all cores
};

namespace detail {

enum class Wait { none, barrier, warp, exited };

enum class Op { syncwarp, shfl_idx, shfl_up, shfl_down, shfl_bfly, ballot, any, all, reduce_add, reduce_min,
                reduce_max, reduce_and, reduce_or, reduce_xor, match_any, match_all };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::syncwarp: return "__syncwarp";
    case Op::shfl_idx: return "__shfl_sync";
    case Op::shfl_up: return "__shfl_up_sync";
    case Op::shfl_down: return "__shfl_down_sync";
    case Op::shfl_bfly: return "__shfl_xor_sync";
    case Op::ballot: return "__ballot_sync";
    case Op::any: return "__any_sync";
    case Op::all: return "__all_sync";
    case Op::reduce_add: return "__reduce_add_sync";
    case Op::reduce_min: return "__reduce_min_sync";
    case Op::reduce_max: return "__reduce_max_sync";
    case Op::reduce_and: return "__reduce_and_sync";
    case Op::reduce_or: return "__reduce_or_sync";
    case Op::reduce_xor: return "__reduce_xor_sync";
    case Op::match_any: return "__match_any_sync";
    case Op::match_all: return "__match_all_sync";
  }
  return "?";
}

struct Block;

struct Thread {
  Context ctx;
  Block* block = nullptr;
  uint3 tid{};
  int linear = 0;
  Wait wait = Wait::none;
  bool runnable = false;
  std::source_location loc;
  // Barrier: this thread's predicate and the block's answer (__syncthreads_count/and/or).
  int pred = 0;
  int bar_result = 0;
  int bar_participants = 0;
  // Warp operation: what this lane brought and what it gets back.
  Op op = Op::syncwarp;
  unsigned mask = 0;
  std::uint64_t value = 0;
  std::uint64_t poison = 0;
  bool is_signed = false;
  int b = 0;      // source lane, delta or lane mask
  int width = 32;
  std::uint64_t result = 0;
  int result_pred = 0;
};

// Dynamic shared memory arrays (EMU_DYNAMIC_SHARED), poisoned with 0xFF bytes (NaN in every float type)
// at the start of every block.
struct DynShared {
  void* (*address)();
  std::size_t bytes;
};
inline std::vector<DynShared>& dyn_shared_registry() {
  static std::vector<DynShared> r;
  return r;
}
template <typename T>
[[gnu::noinline]] T dyn_init() {
  return T{};
}
struct DynSharedRegistrar {
  DynSharedRegistrar(void* (*address)(), std::size_t bytes) { dyn_shared_registry().push_back({address, bytes}); }
};

struct Block {
  Context sched;
  std::vector<Thread> threads;
  void (*invoke)(const void* payload) = nullptr;
  const void* payload = nullptr;
  int live = 0;
  int at_barrier = 0;
  bool failed = false;
  std::string error;
  std::string name;
};

inline thread_local Block* cur_block = nullptr;
inline thread_local Thread* cur_thread = nullptr;

inline std::string loc_str(const std::source_location& l) {
  const char* f = l.file_name();
  const char* slash = std::strrchr(f, '/');
  return std::string(slash ? slash + 1 : f) + ":" + std::to_string(l.line());
}

inline bool same_loc(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

inline std::string thread_name(const Thread& t) {
  std::ostringstream s;
  s << "thread (" << t.tid.x << "," << t.tid.y << "," << t.tid.z << ") [warp " << t.linear / 32 << " lane "
    << t.linear % 32 << "]";
  return s.str();
}

// "0-31,33,35" from sorted linear thread indices.
inline std::string ranges(const std::vector<int>& ids) {
  std::ostringstream s;
  for (std::size_t i = 0; i < ids.size();) {
    std::size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (i) s << ",";
    s << ids[i];
    if (j > i) s << "-" << ids[j];
    i = j + 1;
  }
  return s.str();
}

inline void yield_to_scheduler() {
  Thread* t = cur_thread;
  t->ctx.switch_to(t->block->sched);
}

// Stops the block with an error; called on a fiber, never returns.
[[noreturn]] inline void fail(const std::string& msg) {
  Block* b = cur_block;
  if (!b->failed) {
    b->failed = true;
    b->error = b->name + ": " + msg;
  }
  for (;;) yield_to_scheduler();
}

inline std::string describe_wait(const Thread& t) {
  if (t.wait == Wait::barrier) return "__syncthreads at " + loc_str(t.loc);
  char m[16];
  std::snprintf(m, sizeof m, "0x%08x", t.mask);
  return std::string(op_name(t.op)) + "(mask " + m + ") at " + loc_str(t.loc);
}

inline std::string wait_report(const Block& b) {
  std::map<std::string, std::vector<int>> groups;
  for (const Thread& t : b.threads)
    if (t.wait == Wait::barrier || t.wait == Wait::warp) groups[describe_wait(t)].push_back(t.linear);
  std::ostringstream s;
  for (auto& [where, ids] : groups) s << "\n  " << ids.size() << " thread(s) wait in " << where << ": threads " << ranges(ids);
  int exited = 0;
  for (const Thread& t : b.threads) exited += t.wait == Wait::exited;
  if (exited) s << "\n  " << exited << " thread(s) have exited";
  return s.str();
}

inline void try_release_barrier(Block& b) {
  if (b.live == 0 || b.at_barrier != b.live) return;
  const Thread* first = nullptr;
  int count = 0, participants = 0;
  for (const Thread& t : b.threads) {
    if (t.wait != Wait::barrier) continue;
    ++participants;
    if (!first) first = &t;
    if (!same_loc(first->loc, t.loc))
      fail("divergent __syncthreads: the block's threads wait at different barriers" + wait_report(b));
    count += t.pred != 0;
  }
  for (Thread& t : b.threads) {
    if (t.wait != Wait::barrier) continue;
    t.wait = Wait::none;
    t.runnable = true;
    t.bar_result = count;
    t.bar_participants = participants;
  }
  b.at_barrier = 0;
}

inline Thread* lane_thread(Block& b, int warp, int lane) {
  const int i = warp * 32 + lane;
  return i < int(b.threads.size()) ? &b.threads[i] : nullptr;
}

// Computes every lane's result of a warp operation by the PTX rules (shfl.sync, vote.sync, redux.sync,
// match.sync), once all lanes named in the mask have arrived.
inline void complete_warp_op(Block& b, int warp, unsigned mask) {
  Thread* lanes[32] = {};
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) lanes[l] = lane_thread(b, warp, l);
  const Thread& first = *lanes[std::countr_zero(mask)];
  for (int l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    if (lanes[l]->op != first.op || lanes[l]->mask != first.mask)
      fail(std::string("warp ") + std::to_string(warp) + ": lanes named in one mask run different warp operations" +
           wait_report(b));
  }
  const Op op = first.op;
  switch (op) {
    case Op::syncwarp:
      break;
    case Op::shfl_idx:
    case Op::shfl_up:
    case Op::shfl_down:
    case Op::shfl_bfly:
      for (int lane = 0; lane < 32; ++lane) {
        Thread* t = lanes[lane];
        if (!t) continue;
        // PTX shfl.sync: c = ((32 - width) << 8) | clamp, clamp = 0 for .up and 31 otherwise.
        const int seg_mask = (32 - t->width) & 31;
        const int clamp = op == Op::shfl_up ? 0 : 31;
        const int min_lane = lane & seg_mask;
        const int max_lane = min_lane | (clamp & ~seg_mask);
        int j = 0;
        bool in_range = false;
        switch (op) {
          case Op::shfl_up: j = lane - t->b; in_range = j >= max_lane; break;
          case Op::shfl_down: j = lane + t->b; in_range = j <= max_lane; break;
          case Op::shfl_bfly: j = lane ^ t->b; in_range = j <= max_lane; break;
          default: j = min_lane | (t->b & 31 & ~seg_mask); in_range = j <= max_lane; break;  // low 5 bits of b
        }
        if (!in_range) j = lane;
        t->result = (j >= 0 && j < 32 && lanes[j]) ? lanes[j]->value : t->poison;
      }
      break;
    case Op::ballot:
    case Op::any:
    case Op::all: {
      unsigned bits = 0;
      for (int l = 0; l < 32; ++l)
        if (lanes[l] && lanes[l]->value) bits |= 1u << l;
      for (int l = 0; l < 32; ++l) {
        if (!lanes[l]) continue;
        lanes[l]->result = op == Op::ballot ? bits : op == Op::any ? (bits != 0) : (bits == mask);
      }
      break;
    }
    case Op::reduce_add:
    case Op::reduce_min:
    case Op::reduce_max:
    case Op::reduce_and:
    case Op::reduce_or:
    case Op::reduce_xor: {
      std::uint32_t acc = 0;
      bool any = false;
      for (int l = 0; l < 32; ++l) {
        if (!lanes[l]) continue;
        const auto v = std::uint32_t(lanes[l]->value);
        if (!any) {
          acc = v;
          any = true;
          continue;
        }
        const bool sgn = lanes[l]->is_signed;
        switch (op) {
          case Op::reduce_add: acc += v; break;
          case Op::reduce_min: acc = sgn ? std::uint32_t(std::min(std::int32_t(acc), std::int32_t(v))) : std::min(acc, v); break;
          case Op::reduce_max: acc = sgn ? std::uint32_t(std::max(std::int32_t(acc), std::int32_t(v))) : std::max(acc, v); break;
          case Op::reduce_and: acc &= v; break;
          case Op::reduce_or: acc |= v; break;
          default: acc ^= v; break;
        }
      }
      for (int l = 0; l < 32; ++l)
        if (lanes[l]) lanes[l]->result = acc;
      break;
    }
    case Op::match_any:
    case Op::match_all: {
      bool all_equal = true;
      for (int l = 0; l < 32; ++l) {
        if (!lanes[l]) continue;
        unsigned same = 0;
        for (int k = 0; k < 32; ++k)
          if (lanes[k] && lanes[k]->value == lanes[l]->value) same |= 1u << k;
        lanes[l]->result = same;
        all_equal = all_equal && same == mask;
      }
      if (op == Op::match_all)
        for (int l = 0; l < 32; ++l)
          if (lanes[l]) {
            lanes[l]->result = all_equal ? mask : 0;
            lanes[l]->result_pred = all_equal;
          }
      break;
    }
  }
  for (int l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    lanes[l]->wait = Wait::none;
    lanes[l]->runnable = true;
  }
}

// Completes the warp operation that `mask` names if every lane in it has arrived.
inline void try_complete_warp(Block& b, int warp, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    Thread* t = lane_thread(b, warp, l);
    if (!t || t->wait == Wait::exited) {
      fail(std::string("warp ") + std::to_string(warp) + ": lane " + std::to_string(l) +
           (t ? " has exited" : " does not exist") + " but is named in the mask of a warp operation" +
           wait_report(b));
    }
    if (t->wait != Wait::warp) return;
  }
  complete_warp_op(b, warp, mask);
}

// Arrival of the current thread at a warp operation; returns when the operation has completed.
inline Thread& warp_arrive(Op op, unsigned mask, std::uint64_t value, std::uint64_t poison, int b_arg, int width,
                           bool is_signed, const std::source_location& loc) {
  Thread& t = *cur_thread;
  Block& b = *t.block;
  const int lane = t.linear % 32;
  t.loc = loc;
  if (!(mask >> lane & 1)) {
    char m[16];
    std::snprintf(m, sizeof m, "0x%08x", mask);
    fail(thread_name(t) + " calls " + op_name(op) + " at " + loc_str(loc) + " with mask " + m +
         ", which does not name the calling lane");
  }
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail(thread_name(t) + " calls " + op_name(op) + " at " + loc_str(loc) + " with width " + std::to_string(width) +
         " (must be a power of 2 in [1, 32])");
  t.op = op;
  t.mask = mask;
  t.value = value;
  t.poison = poison;
  t.b = b_arg;
  t.width = width;
  t.is_signed = is_signed;
  t.wait = Wait::warp;
  t.runnable = false;
  try_complete_warp(b, t.linear / 32, mask);
  yield_to_scheduler();
  return t;
}

inline int barrier_arrive(int pred, const std::source_location& loc) {
  Thread& t = *cur_thread;
  Block& b = *t.block;
  t.loc = loc;
  t.pred = pred;
  t.wait = Wait::barrier;
  t.runnable = false;
  ++b.at_barrier;
  try_release_barrier(b);
  yield_to_scheduler();
  return t.bar_result;
}

inline void on_exit(Thread& t) {
  Block& b = *t.block;
  t.wait = Wait::exited;
  t.runnable = false;
  --b.live;
  // Warp operations waiting for this lane can never complete.
  const int warp = t.linear / 32;
  const int lane = t.linear % 32;
  for (int l = 0; l < 32; ++l) {
    Thread* o = lane_thread(b, warp, l);
    if (o && o->wait == Wait::warp && (o->mask >> lane & 1))
      fail(thread_name(t) + " exited while lanes of its warp wait for it in " + describe_wait(*o) + wait_report(b));
  }
  // Exited threads do not take part in later barriers (as on the hardware).
  try_release_barrier(b);
}

inline void fiber_main(void* arg) {
  auto* t = static_cast<Thread*>(arg);
  try {
    t->block->invoke(t->block->payload);
  } catch (const std::exception& e) {
    fail(thread_name(*t) + " threw: " + e.what());
  } catch (...) {
    fail(thread_name(*t) + " threw an exception");
  }
  on_exit(*t);
  for (;;) yield_to_scheduler();
}

inline std::uint64_t mix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Runs one block to its end on the calling OS thread; throws Error on failure.
inline void run_block(const LaunchConfig& cfg, uint3 block_idx, void (*invoke)(const void*), const void* payload) {
  const dim3 bd = cfg.block;
  const int n = int(bd.x * bd.y * bd.z);
  auto& stacks = thread_stacks(std::size_t(n));
  Block b;
  b.invoke = invoke;
  b.payload = payload;
  b.threads.resize(std::size_t(n));
  b.live = n;
  b.name = "block (" + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
           std::to_string(block_idx.z) + ")";
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[std::size_t(i)];
    t.block = &b;
    t.linear = i;
    t.tid = make_uint3(unsigned(i) % bd.x, (unsigned(i) / bd.x) % bd.y, unsigned(i) / (bd.x * bd.y));
    t.runnable = true;
    t.ctx.start(*stacks[std::size_t(i)], &fiber_main, &t);
  }
  blockIdx = block_idx;
  blockDim = cfg.block;
  gridDim = cfg.grid;
  for (const DynShared& d : dyn_shared_registry()) std::memset(d.address(), 0xFF, d.bytes);
  const std::uint64_t block_linear = block_idx.x + std::uint64_t(cfg.grid.x) * (block_idx.y + std::uint64_t(cfg.grid.y) * block_idx.z);
  std::mt19937_64 rng(mix(cfg.schedule.seed ^ mix(block_linear)));
  std::vector<int> order;
  order.reserve(std::size_t(n));
  cur_block = &b;
  for (;;) {
    order.clear();
    for (int i = 0; i < n; ++i)
      if (b.threads[std::size_t(i)].runnable) order.push_back(i);
    if (order.empty()) break;
    if (cfg.schedule.order == Order::reverse) std::reverse(order.begin(), order.end());
    if (cfg.schedule.order == Order::shuffled) std::shuffle(order.begin(), order.end(), rng);
    for (int i : order) {
      Thread& t = b.threads[std::size_t(i)];
      if (!t.runnable) continue;
      cur_thread = &t;
      threadIdx = t.tid;
      b.sched.switch_to(t.ctx);
      if (b.failed) {
        cur_thread = nullptr;
        cur_block = nullptr;
        throw Error(b.error);
      }
    }
  }
  cur_thread = nullptr;
  cur_block = nullptr;
  if (b.live > 0) throw Error(b.name + ": deadlock, no thread can move" + wait_report(b));
}

template <typename Payload>
void invoke_payload(const void* p) {
  const auto& pl = *static_cast<const Payload*>(p);
  // Each thread gets its own copy of the arguments, as from the kernel's parameter space.
  std::apply([&](auto... args) { pl.kernel(args...); }, pl.args);
}

inline int default_workers() {
  if (const char* w = std::getenv("EMU_WORKERS")) return std::max(1, std::atoi(w));
  return std::max(1u, std::thread::hardware_concurrency());
}

inline Schedule& default_schedule() {
  static Schedule s = [] {
    const char* e = std::getenv("EMU_SCHEDULE");
    return e ? parse_schedule(e) : Schedule{};
  }();
  return s;
}

}  // namespace detail

// The schedule that launch(kernel, grid, block, shared_bytes, args...) uses: $EMU_SCHEDULE, or ordered.
inline void set_default_schedule(Schedule s) { detail::default_schedule() = s; }

template <typename... P, typename... A>
void launch(const LaunchConfig& cfg, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "emu::launch: wrong number of kernel arguments");
  struct Payload {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;
  };
  const Payload payload{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  const dim3 g = cfg.grid, bd = cfg.block;
  const std::uint64_t threads = std::uint64_t(bd.x) * bd.y * bd.z;
  if (threads == 0 || threads > 1024 || bd.z > 64)
    throw Error("invalid block size " + std::to_string(bd.x) + "x" + std::to_string(bd.y) + "x" + std::to_string(bd.z));
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535) throw Error("invalid grid size");
  for (const auto& d : detail::dyn_shared_registry())
    if (cfg.shared_bytes > d.bytes)
      throw Error("dynamic shared memory of " + std::to_string(cfg.shared_bytes) + " bytes exceeds EMU_DYNAMIC_SHARED's " +
                  std::to_string(d.bytes));
  if (cfg.shared_bytes > 0 && detail::dyn_shared_registry().empty())
    throw Error("dynamic shared memory requested but no EMU_DYNAMIC_SHARED array is defined");
  const std::uint64_t blocks = std::uint64_t(g.x) * g.y * g.z;
  // Small launches run on the calling thread: starting OS threads (and their fiber stacks) costs more.
  const std::uint64_t want = cfg.workers > 0 ? std::uint64_t(cfg.workers)
                             : blocks * threads < 16384 ? 1
                                                        : std::uint64_t(detail::default_workers());
  const int workers = int(std::min<std::uint64_t>(blocks, want));
  std::atomic<std::uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex err_mu;
  std::string first_error;
  auto work = [&] {
    for (;;) {
      const std::uint64_t i = next.fetch_add(1);
      if (i >= blocks || stop.load()) return;
      const uint3 bi = make_uint3(unsigned(i % g.x), unsigned(i / g.x % g.y), unsigned(i / (std::uint64_t(g.x) * g.y)));
      try {
        detail::run_block(cfg, bi, &detail::invoke_payload<Payload>, &payload);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (first_error.empty()) first_error = e.what();
        stop = true;
        return;
      }
    }
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (!first_error.empty()) throw Error(first_error);
}

// The form of the brief: launch(kernel, grid, block, shared_bytes, args...) with the default schedule.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shared_bytes, A&&... args) {
  launch(LaunchConfig{grid, block, shared_bytes, detail::default_schedule(), 0}, kernel, std::forward<A>(args)...);
}

}  // namespace emu
