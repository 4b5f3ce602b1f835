// nvcuda::wmma for the CUDA emulator: the subset the kernels use, fragment<matrix_a / matrix_b, M, N, 16,
// __half or __nv_bfloat16, row_major / col_major> and fragment<accumulator, M, N, 16, float> for the shapes
// m16n16k16, m32n8k16 and m8n32k16, fill_fragment, load_matrix_sync, store_matrix_sync (mem_row_major /
// mem_col_major) and mma_sync. nvcc compiles the kernels against <mma.h> instead; this file is never used there.
//
// Every lane holds the whole tile (fragment::num_elements is the tile's element count, not a lane's share on
// the GPU, where the mapping of elements to lanes is unspecified): code may apply the same element-wise
// operation to every x[i] of a fragment, but must not depend on which elements a lane holds.
//
// load_matrix_sync, store_matrix_sync and mma_sync are warp-collective, as on the GPU: all 32 lanes of the warp
// must call the same one (same call site, pointer, ldm and layout). A lane that arrives parks in a __syncwarp
// (full mask) at the caller's source location, so a missing lane shows as a deadlock ("wait in
// __syncwarp(mask 0xffffffff) at <call site>") and an exited one as "exited while lanes of its warp wait",
// like any warp operation. The lane that arrives last, with the others parked, does the warp's work:
//   - load: each lane reads its share of the tile from memory when it arrives, and the last lane gives every
//     lane the whole tile. A load racing with writes of other threads (e.g. without the __syncthreads after
//     staging) thus reads what the GPU could: a mix of old and new values.
//   - store: the last lane checks that all 32 lanes hold identical fragments; each lane then writes its share
//     after the warp is released, so that reading elements of other lanes needs a __syncwarp, as on the GPU.
//   A lane's share is the 8 elements (r, c) with (r % 8) * 4 + (c % 8) / 2 == lane: the layout of mma.sync's
//   accumulators (PTX m16n8k16: row group lane / 4, column pair lane % 4), repeated over the tile.
//   - mma: the last lane checks that a, b and c are identical in all 32 lanes, and computes
//     d = a b + c in float, each entry as c + a[i][0] b[0][j] + ... + a[i][15] b[15][j] added in k order
//     (the products of the 16-bit inputs are exact in float). Tensor cores add in another order (and may
//     truncate): compare with tolerances.
// Misuse is reported as emu::Error from emu::launch: lanes at different wmma calls or with different
// arguments, lane-divergent fragments, a pointer not 256-bit aligned, ldm not a multiple of 16 bytes.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <source_location>
#include <string>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "runtime.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

constexpr bool supported_shape(int m, int n, int k) {
  return k == 16 && ((m == 16 && n == 16) || (m == 32 && n == 8) || (m == 8 && n == 32));
}

template <typename Use, int M, int N, int K>
struct TileShape;  // rows x cols of the tile a fragment holds
template <int M, int N, int K>
struct TileShape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct TileShape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct TileShape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <typename T>
inline constexpr bool is_16bit_float_v = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <typename Use, typename T, typename Layout>
constexpr bool supported_fragment() {
  if constexpr (std::is_same_v<Use, accumulator>) {
    return std::is_same_v<T, float> && std::is_void_v<Layout>;
  } else {
    return (std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b>) && is_16bit_float_v<T> &&
           (std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>);
  }
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(detail::supported_shape(M, N, K), "emulated wmma shapes: m16n16k16, m32n8k16, m8n32k16");
  static_assert(detail::supported_fragment<Use, T, Layout>(),
                "emulated wmma fragments: matrix_a/matrix_b of __half or __nv_bfloat16 with row_major or col_major, "
                "accumulator of float without a layout");

 public:
  using element_type = T;
  using storage_element_type = T;
  static constexpr int rows = detail::TileShape<Use, M, N, K>::rows;
  static constexpr int cols = detail::TileShape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;  // the whole tile, in every lane
  T x[num_elements];
};

}  // namespace nvcuda::wmma

namespace emu::detail::wmma_impl {

enum class Kind { load, store, mma };

inline const char* kind_name(Kind k) {
  return k == Kind::load ? "wmma::load_matrix_sync" : k == Kind::store ? "wmma::store_matrix_sync" : "wmma::mma_sync";
}

constexpr std::uint64_t kSlotMagic = 0x776d6d61736c6f74ull;  // "wmmaslot"

// What a lane brings to a wmma operation; lives on the lane's stack while it is parked, and is found by the
// last lane through the `value` of the lane's __syncwarp arrival.
struct Slot {
  std::uint64_t magic = kSlotMagic;
  Kind kind = Kind::load;
  std::source_location loc;
  const void* ptr = nullptr;  // load/store: the memory
  unsigned ldm = 0;
  int layout = 0;             // 0 row-major, 1 column-major
  void* frag = nullptr;       // load: destination; store: source (const)
  const void* a = nullptr;    // mma
  const void* b = nullptr;
  const void* c = nullptr;
  void* d = nullptr;
  bool done = false;          // set by the last lane once the warp's work is done
};

inline std::string lane_loc(const Slot& s) { return std::string(kind_name(s.kind)) + " at " + loc_str(s.loc); }

inline std::string warp_str(int warp) { return "warp " + std::to_string(warp); }

// Arrival of the calling lane at a wmma operation. If the other 31 lanes of the warp are parked at wmma
// operations, this lane is the last: it checks that they all run this one with the same arguments, runs
// work(slots) for the whole warp, and releases them. Otherwise it parks until the last lane does.
template <typename Work>
void collective(Slot& me, Work&& work) {
  Thread& t = *cur_thread;
  Block& b = *t.block;
  const int warp = t.linear / 32, lane = t.linear % 32;
  Slot* slots[32] = {};
  bool last = true;
  for (int l = 0; l < 32 && last; ++l) {
    if (l == lane) {
      slots[l] = &me;
      continue;
    }
    const Thread* o = lane_thread(b, warp, l);
    if (!o || o->wait != Wait::warp || o->op != Op::syncwarp || o->value == 0) {
      last = false;
      continue;
    }
    slots[l] = reinterpret_cast<Slot*>(o->value);
    if (slots[l]->magic != kSlotMagic) last = false;
  }
  if (last) {
    for (int l = 0; l < 32; ++l) {
      const Slot& s = *slots[l];
      if (s.kind != me.kind || !same_loc(s.loc, me.loc)) {
        fail(warp_str(warp) + ": the lanes of a warp must run the same wmma operation, but lane " +
             std::to_string(l) + " is in " + lane_loc(s) + " and lane " + std::to_string(lane) + " in " +
             lane_loc(me) + wait_report(b));
      }
      if (s.ptr != me.ptr || s.ldm != me.ldm || s.layout != me.layout) {
        char msg[160];
        std::snprintf(msg, sizeof msg, ": lanes %d and %d pass different arguments (pointer %p / %p, ldm %u / %u)", l,
                      lane, s.ptr, me.ptr, s.ldm, me.ldm);
        fail(warp_str(warp) + " in " + lane_loc(me) + msg);
      }
    }
    work(slots);
    for (Slot* s : slots) s->done = true;
  }
  warp_arrive(Op::syncwarp, 0xffffffffu, reinterpret_cast<std::uint64_t>(&me), 0, 0, 32, false, me.loc);
  if (!me.done) {
    fail(thread_name(t) + " in " + lane_loc(me) +
         " was released by a __syncwarp of other lanes: all 32 lanes of the warp must call the same wmma operation");
  }
}

template <typename T>
double as_double(const T& v) {
  if constexpr (std::is_same_v<T, __half>) {
    return double(__half2float(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return double(__bfloat162float(v));
  } else {
    return double(v);
  }
}

// Fails unless fragment `what` is bitwise the same in every lane (compared with the calling lane's).
template <typename Frag>
void check_identical(const char* what, const Frag* const frags[32], int me, const Slot& slot) {
  for (int l = 0; l < 32; ++l) {
    if (std::memcmp(frags[l]->x, frags[me]->x, sizeof(frags[me]->x)) == 0) continue;
    int e = 0;
    while (std::memcmp(&frags[l]->x[e], &frags[me]->x[e], sizeof(frags[me]->x[e])) == 0) ++e;
    char msg[256];
    std::snprintf(msg, sizeof msg,
                  ": the 32 lanes must hold identical fragments, but fragment %s of lane %d differs from lane %d's at "
                  "element (%d, %d): %g vs %g",
                  what, l, me, e / Frag::cols, e % Frag::cols, as_double(frags[l]->x[e]), as_double(frags[me]->x[e]));
    fail(warp_str(cur_thread->linear / 32) + " in " + lane_loc(slot) + msg);
  }
}

// The memory offset of tile element e (row-major index into the fragment) for the layout.
template <typename Frag>
std::size_t offset(int e, unsigned ldm, int layout) {
  const std::size_t r = std::size_t(e / Frag::cols), c = std::size_t(e % Frag::cols);
  return layout == 0 ? r * ldm + c : c * ldm + r;
}

// The lane that reads (load) or writes (store) tile element e (see the top of the file).
template <typename Frag>
int owner(int e) {
  return (e / Frag::cols % 8) * 4 + (e % Frag::cols % 8) / 2;
}

template <typename T>
void check_pointer(const Slot& s, const T* p) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) {
    char msg[96];
    std::snprintf(msg, sizeof msg, ": pointer %p is not 256-bit aligned", static_cast<const void*>(p));
    fail(thread_name(*cur_thread) + " in " + lane_loc(s) + msg);
  }
  if (s.ldm * sizeof(T) % 16 != 0) {
    fail(thread_name(*cur_thread) + " in " + lane_loc(s) + ": ldm " + std::to_string(s.ldm) +
         " is not a multiple of 16 bytes (" + std::to_string(16 / sizeof(T)) + " elements)");
  }
}

// The slot of a load or store, once its pointer and ldm are checked.
template <typename T>
Slot memory_slot(Kind kind, const T* p, unsigned ldm, int layout, const void* frag, const std::source_location& loc) {
  Slot s;
  s.kind = kind;
  s.loc = loc;
  s.ptr = p;
  s.ldm = ldm;
  s.layout = layout;
  s.frag = const_cast<void*>(frag);
  check_pointer(s, p);
  return s;
}

template <typename Frag, typename T>
void load(Frag& f, const T* p, unsigned ldm, int layout, const std::source_location& loc) {
  Slot me = memory_slot(Kind::load, p, ldm, layout, &f, loc);
  const int lane = cur_thread->linear % 32;
  for (int e = 0; e < Frag::num_elements; ++e) {
    if (owner<Frag>(e) == lane) f.x[e] = p[offset<Frag>(e, ldm, layout)];
  }
  collective(me, [](Slot* const slots[32]) {
    // Element e was read by its owner, which keeps it; every other lane copies it from there.
    for (int l = 0; l < 32; ++l) {
      Frag& dst = *static_cast<Frag*>(slots[l]->frag);
      for (int e = 0; e < Frag::num_elements; ++e) {
        if (owner<Frag>(e) != l) dst.x[e] = static_cast<const Frag*>(slots[owner<Frag>(e)]->frag)->x[e];
      }
    }
  });
}

template <typename Frag>
void store(float* p, const Frag& f, unsigned ldm, int layout, const std::source_location& loc) {
  Slot me = memory_slot(Kind::store, p, ldm, layout, &f, loc);
  const int lane = cur_thread->linear % 32;
  collective(me, [lane, &me](Slot* const slots[32]) {
    const Frag* frags[32];
    for (int l = 0; l < 32; ++l) frags[l] = static_cast<const Frag*>(slots[l]->frag);
    check_identical("(stored)", frags, lane, me);
  });
  for (int e = 0; e < Frag::num_elements; ++e) {
    if (owner<Frag>(e) == lane) p[offset<Frag>(e, ldm, layout)] = f.x[e];
  }
}

template <typename FragD, typename FragA, typename FragB>
void mma(FragD& d, const FragA& a, const FragB& b, const FragD& c, const std::source_location& loc) {
  Slot me;
  me.kind = Kind::mma;
  me.loc = loc;
  me.a = &a;
  me.b = &b;
  me.c = &c;
  me.d = &d;
  const int lane = cur_thread->linear % 32;
  collective(me, [lane, &me](Slot* const slots[32]) {
    const FragA* fa[32];
    const FragB* fb[32];
    const FragD* fc[32];
    for (int l = 0; l < 32; ++l) {
      fa[l] = static_cast<const FragA*>(slots[l]->a);
      fb[l] = static_cast<const FragB*>(slots[l]->b);
      fc[l] = static_cast<const FragD*>(slots[l]->c);
    }
    check_identical("a", fa, lane, me);
    check_identical("b", fb, lane, me);
    check_identical("c", fc, lane, me);
    constexpr int M = FragD::rows, N = FragD::cols, K = FragA::cols;
    float out[M * N];
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) {
        float s = fc[lane]->x[i * N + j];
        for (int k = 0; k < K; ++k) s += float(as_double(fa[lane]->x[i * K + k])) * float(as_double(fb[lane]->x[k * N + j]));
        out[i * N + j] = s;
      }
    }
    for (int l = 0; l < 32; ++l) std::memcpy(static_cast<FragD*>(slots[l]->d)->x, out, sizeof out);
  });
}

template <typename Layout>
constexpr int layout_of() {
  return std::is_same_v<Layout, nvcuda::wmma::row_major> ? 0 : 1;
}

}  // namespace emu::detail::wmma_impl

namespace nvcuda::wmma {

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const std::type_identity_t<T>& v) {
  for (T& x : f.x) x = v;  // a lane's own registers: no warp synchronisation
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
  requires(!std::is_same_v<Use, accumulator>)
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm,
                      std::source_location loc = std::source_location::current()) {
  emu::detail::wmma_impl::load(f, p, ldm, emu::detail::wmma_impl::layout_of<Layout>(), loc);
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t layout,
                      std::source_location loc = std::source_location::current()) {
  emu::detail::wmma_impl::load(f, p, ldm, layout == mem_row_major ? 0 : 1, loc);
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout,
                       std::source_location loc = std::source_location::current()) {
  emu::detail::wmma_impl::store(p, f, ldm, layout == mem_row_major ? 0 : 1, loc);
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c,
              std::source_location loc = std::source_location::current()) {
  emu::detail::wmma_impl::mma(d, a, b, c, loc);
}

}  // namespace nvcuda::wmma
