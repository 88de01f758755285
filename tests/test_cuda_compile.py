"""Every CUDA source compiles on a machine without a GPU: each csrc/cuda/*.cu with plain nvcc for
sm_80 and sm_90, warnings as errors (a host-only call from device code is a warning there), and
each torch glue file csrc/cuda/*.cpp with a syntax-only pass against torch's headers.

The kernels are torch-free, so they compile without CUDA torch; their shared host/device cores are
unit-tested on the host by tests/cpp (ctest). A CPU-only torch ships the CUDA headers but not the
generated ``c10/cuda/impl/cuda_cmake_macros.h``; the glue check supplies that one-line header.
"""
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
GLUE_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (looked on PATH and in $CUDA_HOME/bin, /usr/local/cuda/bin)")
    out = tmp_path / (source.stem + ".o")
    cmd = [nvcc, "-c", "-std=c++17", "-O2", f"-arch={arch}", "--Werror", "all-warnings", "-DLCKV_WITH_CUDA",
           f"-I{ROOT / 'csrc' / 'include'}", str(source), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nvcc failed on {source.name} for {arch}:\n{result.stderr}"
    assert out.stat().st_size > 0


@pytest.mark.parametrize("source", GLUE_SOURCES, ids=lambda p: p.name)
def test_cuda_glue_compiles(source, tmp_path):
    from torch.utils.cpp_extension import include_paths

    nvcc = _nvcc()
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             str(Path(nvcc).resolve().parent.parent) if nvcc else None]
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists()]
    if not found:
        pytest.skip("the CUDA toolkit's headers were not found ($CUDA_HOME, /usr/local/cuda, beside nvcc)")
    cuda_include = found[0]
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = ["g++", "-fsyntax-only", "-std=c++17", "-DLCKV_WITH_CUDA", f"-I{ROOT / 'csrc' / 'include'}",
           f"-I{ROOT / 'csrc'}", *(f"-I{p}" for p in include_paths()), f"-I{tmp_path}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}", str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 0 and not errors, f"{source.name} does not compile:\n{result.stderr[-4000:]}"


def test_there_is_cuda_source_to_check():
    assert CUDA_SOURCES and GLUE_SOURCES, "csrc/cuda/ holds no .cu or no glue .cpp file"
