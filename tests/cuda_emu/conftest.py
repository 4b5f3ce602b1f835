import pytest

from . import emu_build

# Every driver the tests run, compiled once per session (in parallel) and cached by source hash.
DRIVERS = {
    "bias_grad": ("bias_grad_driver", ()),
    "checks": ("emu_checks", ()),
    "checks_ucontext": ("emu_checks", ("-DEMU_USE_UCONTEXT",)),
    "warp": ("warp_semantics", ()),
    "memory": ("memory_driver", ()),
    "tile_mma": ("tile_mma_driver", ()),
}


@pytest.fixture(scope="session")
def emu_bins():
    if emu_build.cuda_include_dir() is None:
        pytest.skip("CUDA headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) not found: set CUDA_HOME or put nvcc "
                    "on PATH to run the emulated-kernel tests")
    if emu_build.compiler() is None:
        pytest.skip("no host C++ compiler (g++) to build the emulated-kernel tests")
    return emu_build.build_all(DRIVERS)
