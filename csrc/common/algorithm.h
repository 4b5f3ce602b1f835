// The memory learning algorithm (docs/math.md, Section 4), written once for the CPU op and the CUDA kernels:
// one entry of one token's step, given the retention alpha, the previous entry and `step` = eta times the
// entry's inner gradient. The chunk form of the same steps (Eqs. 5.8-5.9) is a backend's coefficients.
#pragma once

#include "common/host_device.h"

namespace miras {

enum class Algorithm { Gd, Momentum };

// Eq. 4.1: Z_t = alpha_t Z_{t-1} - eta_t grad.
template <typename A>
MIRAS_HD A gd_step(A alpha, A z, A step) {
  return alpha * z - step;
}

// Eq. 4.2: S_t = m_t S_{t-1} - eta_t grad, then Z_t = alpha_t Z_{t-1} + S_t.
template <typename A>
MIRAS_HD A momentum_step(A m, A s, A step) {
  return m * s - step;
}
template <typename A>
MIRAS_HD A momentum_apply(A alpha, A z, A s) {
  return alpha * z + s;
}

}  // namespace miras
