// The chunk schedule (docs/math.md Eq. 5.6, reference/chunked.py segments()) and the checkpoint rows of
// memory_chunk_fwd (csrc/ops.cpp), written once for the CPU op, the CUDA op and the emulator drivers.
// Host code only, without torch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace miras {

struct Run {
  int64_t start, end;  // tokens [start, end) of a sequence
  bool fresh;          // starts a chunk: the anchor is refreshed to the memory before the run
};

// Runs sharing one anchor; `phase` is the first token's offset in its chunk.
inline std::vector<Run> segments(int64_t phase, int64_t length, int64_t chunk, bool lag) {
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

// Rows S_max of every checkpoint tensor: from shapes and options only, so that register_fake agrees.
inline int64_t checkpoint_rows(int64_t n, int64_t t, int64_t chunk, bool lag, bool varlen) {
  const int64_t chunks = (t + chunk - 1) / chunk;
  const int64_t factor = (lag && chunk > 1) ? 2 : 1;
  return (varlen ? chunks + 2 * n : n * (chunks + 1)) * factor;
}

// One run of one sequence, as the CUDA kernels read it.
struct RunDesc {
  int64_t token0;  // first token, as an index along T of the [B, T, H, D] inputs
  int64_t ck_row;  // its checkpoint row in [0, S_max)
  int32_t len;     // tokens in the run, >= 1
  int32_t fresh;   // 1 when it starts a chunk
};

// Every run of every sequence: the runs of sequence s are runs[seq_begin[s] .. seq_begin[s + 1]); `batch[s]`
// is its row along B (s itself without cu_seqlens, 0 with them). Checkpoint rows follow csrc/ops.cpp.
struct Schedule {
  std::vector<RunDesc> runs;
  std::vector<int64_t> seq_begin, batch;
  int64_t max_len = 0;  // longest run
  int64_t used_rows = 0;
};

// pos: [N] positions; cu: [N + 1] offsets with cu_seqlens, else empty (then N = B sequences of T tokens).
inline Schedule make_schedule(const std::vector<int64_t>& pos, const std::vector<int64_t>& cu, int64_t T,
                              int64_t chunk, bool lag) {
  const int64_t N = static_cast<int64_t>(pos.size());
  const bool varlen = !cu.empty();
  Schedule s;
  s.seq_begin.push_back(0);
  int64_t base = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t0 = varlen ? cu[n] : 0;
    const int64_t len = varlen ? cu[n + 1] - cu[n] : T;
    const auto runs = segments(pos[n] % chunk, len, chunk, lag);
    for (size_t r = 0; r < runs.size(); ++r) {
      const int64_t row = varlen ? base + int64_t(r) : int64_t(r) * N + n;
      s.runs.push_back({t0 + runs[r].start, row, int32_t(runs[r].end - runs[r].start), runs[r].fresh ? 1 : 0});
      s.max_len = std::max<int64_t>(s.max_len, runs[r].end - runs[r].start);
      s.used_rows = std::max<int64_t>(s.used_rows, row + 1);
    }
    base += static_cast<int64_t>(runs.size());
    s.seq_begin.push_back(static_cast<int64_t>(s.runs.size()));
    s.batch.push_back(varlen ? 0 : n);
  }
  return s;
}

}  // namespace miras
