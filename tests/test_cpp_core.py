"""Builds the torch-free C++ cores with CMake and runs their unit tests (ctest)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake/ctest not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="2")
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", str(build)],
                ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, f"{' '.join(cmd[:2])} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert "tests passed" in done.stdout and "0 tests failed" in done.stdout
