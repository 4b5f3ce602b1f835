// The static choices of a memory (python/miras_ext/spec.py, MemorySpec), parsed from MemorySpec.encode().
#pragma once

#include <string>

#include "common/algorithm.h"
#include "common/bias.h"
#include "common/memory.h"
#include "common/retention.h"

namespace miras {

struct MemoryParams {
  Memory memory = Memory::Matrix;
  int layers = 2;
  int expansion = 4;
  Activation activation = Activation::Gelu;
  bool residual_norm = true;
  double ln_eps = 1e-5;  // LayerNorm epsilon of Eq. 1.4
  Bias bias = Bias::l2;  // common/bias.h; "l1" parses to Bias::lp with p = 1
  double p = 2.0;
  double eps = 1e-6;
  Retention retention = Retention::L2;
  double norm_order = 4.0;
  double norm_floor = 1e-12;  // added to sum |A|^q in the l_q normaliser (Eq. 3.5)
  bool norm_mean = false;     // that normaliser averages |A|^q over the tensor instead of summing
  double simplex_scale = -1.0;  // < 0: sqrt(fan_in) per weight tensor (docs/math.md Eq. 3.6)
  double shrinkage = 1e-3;
  bool grad_at_retained = false;
  Algorithm algorithm = Algorithm::Gd;
  bool lag_token = false;
  bool minibatch = false;  // the delta rule at the anchor (Eq. 5.1) instead of exactly (Eqs. 5.13-5.19)

  // Derived, filled by the caller from the tensors.
  bool per_channel = false;  // lr/alpha/momentum are [.., Dv] rather than one per head
  double scale = 1.0;        // multiplies q before the read (Eq. 4.3)

  int num_layers() const { return memory == Memory::Mlp ? layers : 1; }
  bool linked() const { return has_link(retention); }
  bool momentum() const { return algorithm == Algorithm::Momentum; }
  // The delta rule (matrix memory, l2 bias, GD, retention none or l2) computed exactly at every chunk size
  // (docs/math.md Eqs. 5.13-5.19; MemorySpec.exact_chunks).
  bool exact_chunks() const {
    return memory == Memory::Matrix && bias == Bias::l2 && algorithm == Algorithm::Gd &&
           (retention == Retention::None || retention == Retention::L2) && !minibatch;
  }
};

// Parses MemorySpec.encode(); throws a ValueError-mapped c10 error naming the field on bad input.
MemoryParams parse_memory_spec(const std::string& spec);

}  // namespace miras
