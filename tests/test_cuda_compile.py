"""Every csrc/cuda/*.cu compiles with plain nvcc (compile-only: this machine has no GPU).

The CUDA sources are torch-free, so they compile without CUDA torch; their shared host/device
cores are unit-tested on the host by tests/cpp (ctest).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (looked on PATH and in $CUDA_HOME/bin, /usr/local/cuda/bin)")
    cmd = [nvcc, "-c", "-std=c++17", "-O2", "-arch=sm_80", "-DLCKV_WITH_CUDA", f"-I{ROOT / 'csrc' / 'include'}",
           str(source), "-o", str(tmp_path / (source.stem + ".o"))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0


def test_there_is_cuda_source_to_check():
    assert CUDA_SOURCES, "csrc/cuda/ holds no .cu file"
