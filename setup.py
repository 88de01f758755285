"""Builds the one compiled extension, lckv._C.

CPU sources (csrc/bindings.cpp, csrc/cpu/*.cpp) always build, with C++17 and OpenMP, and never
need CUDA_HOME. CUDA sources (csrc/cuda/*.cu, and their torch glue csrc/cuda/*.cpp) join only when
torch was built with CUDA and a toolkit is found; on a CPU-only torch they are compile-checked
separately (plain nvcc for the kernels, a syntax-only pass for the glue; tests/test_cuda_compile.py).
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    sources = ["csrc/bindings.cpp"] + _rel("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    # Portable by default; LCKV_NATIVE=1 tunes for the build machine.
    if os.environ.get("LCKV_NATIVE") == "1":
        cxx_flags.append("-march=native")
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=["-fopenmp"],
    )
    cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and os.environ.get("LCKV_NO_CUDA") != "1"
    if use_cuda:
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

        if CUDA_HOME is None:
            use_cuda = False
            print("lckv: torch has CUDA but no toolkit was found; building the CPU extension only", file=sys.stderr)
    if use_cuda:
        return CUDAExtension(
            "lckv._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DLCKV_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17", "-DLCKV_WITH_CUDA"]},
            **kwargs,
        )
    return CppExtension("lckv._C", sources, extra_compile_args=cxx_flags, **kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
