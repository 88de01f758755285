"""Triton kernels (``@triton.jit`` code only); installed as ``lckv.kernels``.

Launchers, shape checks and docs live in :mod:`lckv.ops`. Under ``TRITON_INTERPRET=1`` the kernels
run on the CPU through Triton's interpreter (set it before importing these modules).
"""
