"""What miras_ext was compiled against, checked before the compiled module is loaded."""

from __future__ import annotations

import torch

from . import _build_config


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def check_torch() -> None:
    """libtorch has no stable C++ ABI across minor releases, so a mismatch must stop the import."""
    built, running = _build_config.TORCH_BUILT, torch.__version__
    if _major_minor(built) != _major_minor(running):
        raise ImportError(
            f"miras_ext was compiled against torch {built} but torch {running} is installed; "
            "rebuild it with `pip install --no-build-isolation .` in this environment"
        )


def build_info() -> dict:
    """Build facts: torch_built, torch_running, backends, cuda_archs, cuda_compiler, num_threads
    (at::get_num_threads() as seen by the extension), openmp (the _OPENMP date or None), compiler,
    cxx_standard."""
    from . import _C

    info = _C.build_info()
    info["torch_running"] = torch.__version__
    return info
