# Finds the torch that the build's Python imports and describes it as the imported target miras::torch.
#
# TorchConfig.cmake is not used: with a CUDA torch it demands a complete CUDA toolkit even for CPU-only
# builds, guesses the toolkit root from the nvcc wrapper on PATH, links nvrtc (absent here) and ignores
# CMAKE_CUDA_ARCHITECTURES. The libraries an extension needs are few and stable, so they are named here.
#
# Sets MIRAS_TORCH_VERSION, MIRAS_TORCH_CUDA (CUDA version of the torch build, empty for CPU builds)
# and MIRAS_TORCH_DIR.

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import os, torch; print(torch.__version__); print(torch.version.cuda or ''); print(os.path.dirname(torch.__file__)); print(int(torch.compiled_with_cxx11_abi()))"
  OUTPUT_VARIABLE _miras_torch_out
  ERROR_VARIABLE _miras_torch_err
  RESULT_VARIABLE _miras_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _miras_torch_rc EQUAL 0)
  message(FATAL_ERROR
    "miras_ext: cannot import torch with ${Python_EXECUTABLE}:\n${_miras_torch_err}\n"
    "Install torch into that environment first and build with `pip install --no-build-isolation .`.")
endif()
string(REPLACE "\n" ";" _miras_torch_out "${_miras_torch_out}")
list(GET _miras_torch_out 0 MIRAS_TORCH_VERSION)
list(GET _miras_torch_out 1 MIRAS_TORCH_CUDA)
list(GET _miras_torch_out 2 MIRAS_TORCH_DIR)
list(GET _miras_torch_out 3 _miras_torch_cxx11_abi)
message(STATUS "miras_ext: torch ${MIRAS_TORCH_VERSION} at ${MIRAS_TORCH_DIR} (CUDA: '${MIRAS_TORCH_CUDA}')")

add_library(miras_torch INTERFACE IMPORTED)
add_library(miras::torch ALIAS miras_torch)
target_include_directories(miras_torch SYSTEM INTERFACE
  "${MIRAS_TORCH_DIR}/include"
  "${MIRAS_TORCH_DIR}/include/torch/csrc/api/include")
target_compile_definitions(miras_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_miras_torch_cxx11_abi})
foreach(_lib c10 torch_cpu torch)
  target_link_libraries(miras_torch INTERFACE "${MIRAS_TORCH_DIR}/lib/lib${_lib}.so")
endforeach()

# The CUDA half of libtorch, for the CUDA backend only.
function(miras_torch_cuda_libraries out)
  set(${out} "${MIRAS_TORCH_DIR}/lib/libc10_cuda.so" "${MIRAS_TORCH_DIR}/lib/libtorch_cuda.so" PARENT_SCOPE)
endfunction()
