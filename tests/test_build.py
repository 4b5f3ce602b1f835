import re

import pytest
import torch

import miras_ext
from miras_ext.testing import bias_grad


def test_build_info_reports_versions_backends_and_compiler():
    info = miras_ext.build_info()
    assert info["torch_running"] == torch.__version__
    assert info["torch_built"].split(".")[:2] == torch.__version__.split(".")[:2]
    assert "cpu" in info["backends"]
    assert ("cuda" in info["backends"]) == bool(info["cuda_archs"])
    assert all(re.fullmatch(r"sm_\d+", arch) for arch in info["cuda_archs"])
    assert info["compiler"]
    assert info["cxx_standard"] >= 202002


def test_openmp_makes_aten_parallel():
    info = miras_ext.build_info()
    assert info["openmp"] is not None, "the extension was compiled without OpenMP"
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        # Without OpenMP in the extension, ATen inside it would report a single thread.
        assert miras_ext.build_info()["num_threads"] == 2
    finally:
        torch.set_num_threads(previous)


def test_ops_are_registered():
    assert hasattr(torch.ops.miras_ext, "bias_grad")
    assert hasattr(torch.ops.miras_ext, "bias_grad_backward")


@pytest.mark.cuda
def test_cuda_backend_runs():
    y = torch.randn(3, 5, device="cuda")
    g = bias_grad(y, torch.zeros_like(y), "l2")
    torch.testing.assert_close(g, y)
