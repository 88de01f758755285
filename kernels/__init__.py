"""Triton kernels (``@triton.jit`` code only); installed as ``lckv.kernels``.

Launchers, shape checks and docs live in :mod:`lckv.ops`. Under ``TRITON_INTERPRET=1`` the kernels
run on the CPU through Triton's interpreter (set it before importing these modules).
"""

import os


def autotune_configs(configs):
    """The autotune list to use: all of ``configs`` on a GPU; only the first (the smallest) under
    ``TRITON_INTERPRET=1``, where nothing can be benchmarked."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return configs[:1]
    return configs
