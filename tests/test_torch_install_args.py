"""scripts/torch-install-args: which torch scripts/env installs into .venv. Without an NVIDIA GPU on Linux
the CPU build (+cpu), from the CPU wheel index unless pip finds it without one (then no network is asked)."""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "torch-install-args"
pytestmark = pytest.mark.skipif(platform.system() != "Linux" or shutil.which("bash") is None,
                                reason="the CPU-build choice is made on Linux")


def _args(tmp_path, gpu: bool, **env) -> list[str]:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: fake'\n" if gpu else "#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MIRAS_TORCH")}
    environ.update(PATH=f"{fake}:{environ['PATH']}", **env)
    out = subprocess.run(["bash", str(SCRIPT), sys.executable], capture_output=True, text=True, env=environ,
                         check=True, timeout=120)
    return out.stdout.split()


def test_no_gpu_means_the_cpu_build(tmp_path):
    args = _args(tmp_path, gpu=False, MIRAS_TORCH_INDEX="https://example.invalid/cpu",
                 MIRAS_TORCH_SPEC="torch==0.0.1+cpu")  # a wheel no find-links has: the index is added
    assert args == ["--extra-index-url", "https://example.invalid/cpu", "torch==0.0.1+cpu"]
    assert _args(tmp_path, gpu=False)[-1] == "torch==2.13.0+cpu"


def test_a_gpu_means_the_default_wheel(tmp_path):
    assert _args(tmp_path, gpu=True) == ["torch==2.13.0"]


def test_the_spec_can_be_chosen(tmp_path):
    assert _args(tmp_path, gpu=True, MIRAS_TORCH_SPEC="torch==2.14.1") == ["torch==2.14.1"]
