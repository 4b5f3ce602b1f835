// Warp shuffles and votes of the emulator against an independent reference written from the CUDA C++
// Programming Guide's text (not from PTX): subsections of `width` lanes, srcLane taken modulo width, up/down
// leaving the lanes without a source unchanged, xor reading earlier groups but not later ones. Lanes whose
// source is outside the mask read the emulator's poison value (the Guide: undefined).
// Usage: warp_semantics [SCHEDULE ...]. Prints mismatches and "summary: N checks, F failures".
#include "emu/cuda_emu.h"

#include <string>
#include <vector>

enum Mode { kIdx, kUp, kDown, kXor };

struct Params {
  int mode;
  int b;
  int width;
  unsigned mask;
};

__global__ void shuffle_kernel(Params p, int* out_i, double* out_d, unsigned* out_vote) {
  const int lane = threadIdx.x % 32;
  const int w = threadIdx.x / 32;
  if (!(p.mask >> lane & 1)) return;  // lanes outside the mask take no part
  const int vi = 1000 * w + 10 * lane + 3;
  const double vd = vi + 0.25;
  int ri = 0;
  double rd = 0;
  switch (p.mode) {
    case kIdx: ri = __shfl_sync(p.mask, vi, p.b, p.width); rd = __shfl_sync(p.mask, vd, p.b, p.width); break;
    case kUp: ri = __shfl_up_sync(p.mask, vi, unsigned(p.b), p.width); rd = __shfl_up_sync(p.mask, vd, unsigned(p.b), p.width); break;
    case kDown: ri = __shfl_down_sync(p.mask, vi, unsigned(p.b), p.width); rd = __shfl_down_sync(p.mask, vd, unsigned(p.b), p.width); break;
    default: ri = __shfl_xor_sync(p.mask, vi, p.b, p.width); rd = __shfl_xor_sync(p.mask, vd, p.b, p.width); break;
  }
  out_i[threadIdx.x] = ri;
  out_d[threadIdx.x] = rd;
  const int pred = (lane * 7 + p.b) % 3 == 0;
  out_vote[3 * threadIdx.x] = __ballot_sync(p.mask, pred);
  out_vote[3 * threadIdx.x + 1] = unsigned(__any_sync(p.mask, pred)) | unsigned(__all_sync(p.mask, pred)) << 1;
  out_vote[3 * threadIdx.x + 2] = __reduce_add_sync(p.mask, unsigned(lane + p.b));
}

namespace {

// The lane whose var the caller reads, per the Programming Guide (the caller's own lane where it keeps its value).
int guide_source(int mode, int lane, int b, int width) {
  const int group = lane / width, logical = lane % width;
  switch (mode) {
    case kIdx: return group * width + ((b % width) + width) % width;
    case kUp: return logical >= b ? lane - b : lane;
    case kDown: return logical + b < width ? lane + b : lane;
    default: {
      const int src = lane ^ b;
      return src / width > group ? lane : src;  // later groups (and lanes past the warp): own value
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<emu::Schedule> scheds;
  for (int i = 1; i < argc; ++i) scheds.push_back(emu::parse_schedule(argv[i]));
  if (scheds.empty()) scheds = {emu::parse_schedule("ordered")};
  const int poison_i = emu::detail::from_bits<int>(emu::detail::poison_bits<int>());
  const int nthreads = 64;  // two warps: lanes are thread index mod 32
  const unsigned masks[] = {0xffffffffu, 0x0000ffffu, 0xaaaaaaaau, 0x0f0f0f0fu, 0x80000001u, 0x00000001u};
  const int idx_b[] = {0, 3, 17, 31, 32, 35, -1, -7, 63};
  const int shift_b[] = {0, 1, 2, 3, 5, 8, 16, 31, 32};
  const int xor_b[] = {0, 1, 2, 5, 8, 16, 31, 32, 33};
  long checks = 0, failures = 0;
  for (const auto& sched : scheds)
    for (int mode : {kIdx, kUp, kDown, kXor})
      for (int width : {1, 2, 4, 8, 16, 32})
        for (unsigned mask : masks)
          for (int k = 0; k < 9; ++k) {
            const int b = mode == kIdx ? idx_b[k] : mode == kXor ? xor_b[k] : shift_b[k];
            std::vector<int> oi(nthreads, -1);
            std::vector<double> od(nthreads, -1);
            std::vector<unsigned> ov(3 * nthreads, 0);
            emu::launch(emu::LaunchConfig{dim3(1), dim3(nthreads), 0, sched}, &shuffle_kernel, Params{mode, b, width, mask},
                        oi.data(), od.data(), ov.data());
            for (int t = 0; t < nthreads; ++t) {
              const int lane = t % 32, w = t / 32;
              if (!(mask >> lane & 1)) continue;
              const int src = guide_source(mode, lane, b, width);
              const bool defined = src >= 0 && src < 32 && (mask >> src & 1);
              const int want_i = defined ? 1000 * w + 10 * src + 3 : poison_i;
              const bool ok_d = defined ? od[t] == want_i + 0.25 : std::isnan(od[t]);
              unsigned ballot = 0, sum = 0;
              for (int l = 0; l < 32; ++l)
                if (mask >> l & 1) {
                  if ((l * 7 + b) % 3 == 0) ballot |= 1u << l;
                  sum += unsigned(l + b);
                }
              const unsigned want_vote = unsigned(ballot != 0) | unsigned(ballot == mask) << 1;
              ++checks;
              if (oi[t] != want_i || !ok_d || ov[3 * t] != ballot || ov[3 * t + 1] != want_vote || ov[3 * t + 2] != sum) {
                if (++failures <= 20)
                  std::printf("FAIL %s mode=%d width=%d mask=0x%08x b=%d thread=%d: got %d (%g) want %d; ballot %08x want %08x\n",
                              emu::order_name(sched.order), mode, width, mask, b, t, oi[t], od[t], want_i, ov[3 * t], ballot);
              }
            }
          }
  std::printf("summary: %ld checks, %ld failures\n", checks, failures);
  return failures ? 1 : 0;
}
