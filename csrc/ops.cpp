// The one TORCH_LIBRARY block of the extension: operator schemas. Backends register in their own files.
#include <torch/library.h>

TORCH_LIBRARY(miras_ext, m) {
  m.def("bias_grad(Tensor y, Tensor v, Tensor? delta, str bias, float p, float eps) -> Tensor");
  m.def(
      "bias_grad_backward(Tensor grad, Tensor y, Tensor v, Tensor? delta, str bias, float p, float eps)"
      " -> (Tensor, Tensor, Tensor)");
}
