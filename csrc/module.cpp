// The Python module miras_ext._C: build information only. Ops are reached through torch.ops.miras_ext,
// so no tensor crosses pybind11 and the module needs neither libtorch_python nor torch's pybind11.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "miras_build_config.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  std::vector<std::string> backends{"cpu"};
#if MIRAS_WITH_CUDA
  backends.emplace_back("cuda");
#endif
  py::dict info;
  info["torch_built"] = MIRAS_TORCH_VERSION;
  info["backends"] = backends;
  info["cuda_archs"] = std::vector<std::string>(MIRAS_CUDA_ARCHS);
  info["cuda_compiler"] = MIRAS_CUDA_COMPILER;
  info["num_threads"] = at::get_num_threads();
#if defined(_OPENMP)
  info["openmp"] = static_cast<int>(_OPENMP);
#else
  info["openmp"] = py::none();
#endif
  info["compiler"] = MIRAS_CXX_COMPILER;
  info["cxx_standard"] = static_cast<long>(__cplusplus);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "miras_ext compiled library: build information (ops live in torch.ops.miras_ext)";
  m.def("build_info", &build_info, "Facts fixed when the extension was compiled, plus ATen's thread count.");
}
