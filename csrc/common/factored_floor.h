// When a run may use the factored form (docs/math.md Eq. 5.12), for the CPU op and the CUDA kernels alike.
#pragma once

#include "common/host_device.h"

namespace miras {

// The smallest running product A_t of alpha over a run for which the factored form is used. Its gate
// gradients cancel terms of size 1 / A_t down to results of size 1, so they lose about u / A_min relative
// (u the unit roundoff; measured: float64 with A_min = 1e-12 gives 2e-4). These floors keep that near 6e-5
// in float32 and 1e-10 in float64; runs below them take the unfactored path.
template <typename T>
MIRAS_HD constexpr double factored_floor() {
  return sizeof(T) == 8 ? 1e-6 : 1e-3;
}

}  // namespace miras
