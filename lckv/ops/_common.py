"""Helpers shared by the public ops: light input checks and Triton launch utilities.

The hot ops do not scan the whole K/V cache for NaN (at a million tokens that pass would cost far
more than the op): they check q, the indices and the shapes up front, and check the *result* for
non-finite values afterwards, which catches NaN/inf in every row the op actually read.
"""
from __future__ import annotations

import torch

from lckv.checks import check_attention_inputs, check_sparse_inputs


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_sparse_args(q, k, v, indices):
    """Shapes, dtypes, devices, GQA and index range of sparse attention; q must be finite."""
    check_sparse_inputs(q, k, v, indices, scan_kv=False)


def check_attention_args(q, k, v):
    """Shapes, dtypes, devices and GQA of dense-layout attention; q must be finite."""
    check_attention_inputs(q, k, v, scan_kv=False)


def check_result(out, lse, read: str):
    """Raises if the op produced NaN/inf: the rows it read from ``read`` were not finite."""
    bad_lse = torch.isnan(lse) | (lse == float("inf"))
    if bool(bad_lse.any()) or not bool(torch.isfinite(out).all()):
        raise ValueError(f"{read} contains NaN or inf in the rows this op read")
    return out, lse


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has stride 1 (what the C++ kernels read in place), else a
    contiguous copy (even of a size-1 last dim, which ``.contiguous()`` leaves as it is)."""
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def default_scale(head_dim: int, scale) -> float:
    return 1.0 / head_dim ** 0.5 if scale is None else float(scale)


def choose_backend(op: str, device, backend: str, cpu_takes: bool, why: str = "") -> str:
    """:func:`lckv.backends.resolve_backend`, then a dtype condition of the ``cpu`` kernel:
    ``cpu_takes`` False turns an ``auto`` choice of ``cpu`` into ``reference`` and refuses an
    explicit ``backend="cpu"`` (``why`` says what the kernel takes)."""
    from lckv.backends import BackendUnavailableError, resolve_backend

    name = resolve_backend(op, device, backend)
    if name == "cpu" and not cpu_takes:
        if backend == "auto":
            return "reference"
        raise BackendUnavailableError(f"op {op!r} cannot run on backend 'cpu' for these inputs: {why}")
    return name
