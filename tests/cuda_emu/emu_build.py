"""Builds the CPU-emulator test drivers (tests/cuda_emu/drivers/*.cpp) with the host C++ compiler.

Binaries are cached in $MIRAS_EMU_CACHE (default: <repo>/build/cuda_emu), named by a hash of everything that
goes into them (the driver, the emulator headers, every csrc header, the flags and the compiler's version), so
that a rerun with unchanged sources compiles nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
NEEDED_HEADERS = ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include folder holding cuda_runtime.h, cuda_fp16.h and cuda_bf16.h, or None."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates += [Path("/usr/local/cuda"), Path("/opt/cuda")]
    for root in candidates:
        for inc in (root / "include", root / "targets" / "x86_64-linux" / "include",
                    root / "targets" / "sbsa-linux" / "include"):
            if all((inc / h).is_file() for h in NEEDED_HEADERS):
                return inc.resolve()
    return None


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def cache_dir() -> Path:
    return Path(os.environ.get("MIRAS_EMU_CACHE", ROOT / "build" / "cuda_emu"))


def _inputs_digest(source: Path, flags: list[str], cxx: str) -> str:
    h = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode())
    h.update("\0".join(flags).encode())
    files = [source, *sorted((HERE / "emu").glob("*.h"))]
    files += sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh", ".inc"))
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def driver_command(name: str, extra_flags: tuple[str, ...] = ()) -> tuple[Path, list[str] | None]:
    """(binary path, compile command or None when the cached binary is up to date)."""
    cxx, inc = compiler(), cuda_include_dir()
    assert cxx and inc
    source = HERE / "drivers" / f"{name}.cpp"
    flags = ["-std=c++20", "-O2", "-Wall", "-Wextra", *extra_flags, f"-I{HERE}", f"-I{CSRC}", f"-I{inc}"]
    tag = "-".join(f.lstrip("-").replace("=", "_") for f in extra_flags)
    binary = cache_dir() / f"{name}{'-' + tag if tag else ''}-{_inputs_digest(source, flags, cxx)}"
    if binary.exists():
        return binary, None
    return binary, [cxx, *flags, str(source), "-o", "{out}", "-pthread"]


def build_all(specs: dict[str, tuple[str, tuple[str, ...]]]) -> dict[str, Path]:
    """Compiles the drivers in parallel (key -> (driver name, extra flags)); returns key -> binary."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    running = []
    for key, (name, extra) in specs.items():
        binary, cmd = driver_command(name, extra)
        out[key] = binary
        if cmd is None:
            continue
        fd, tmp = tempfile.mkstemp(dir=cache_dir(), prefix=binary.name + ".tmp")
        os.close(fd)
        cmd = [tmp if c == "{out}" else c for c in cmd]
        running.append((binary, tmp, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                           text=True)))
    errors = []
    for binary, tmp, cmd, proc in running:
        log, _ = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"$ {' '.join(cmd)}\n{log}")
            Path(tmp).unlink(missing_ok=True)
        else:
            os.replace(tmp, binary)  # atomic: concurrent test runs never see half a binary
    if errors:
        raise RuntimeError("building the emulator test drivers failed:\n" + "\n".join(errors))
    return out


def run(binary: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("EMU_WORKERS", "2")
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout, env=env)
