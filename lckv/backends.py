"""Which backend serves which op on which device: one declared table, one resolver.

Backends
--------
``triton``    Triton kernels (``lckv.kernels``) on CUDA tensors. On CPU tensors only when
              ``TRITON_INTERPRET=1`` (the numpy interpreter, for tests) and only when asked for
              explicitly: ``auto`` never picks the interpreter.
``cuda``      hand-written CUDA kernels in ``lckv._C`` (csrc/cuda/), bound only when the extension
              was built against a torch with CUDA; on CUDA tensors only. After ``triton`` in
              ``auto``'s order: neither has run on a GPU yet (docs/kernels.md), and the Triton
              kernels were checked longer (under the interpreter).
``cpu``       the C++ extension ``lckv._C`` on CPU tensors (OpenMP, SIMD, GIL released).
``torch``     torch's own fused kernels where they already do the job (dense attention with LSE:
              ``aten._scaled_dot_product_flash_attention_for_cpu``); always usable.
``reference`` the pure PyTorch oracles in :mod:`lckv.reference`, on any device (the index-driven
              ops, whose indexes live in host memory, on CPU tensors only).

A backend is listed only where it serves an op. The engine
and the policies reach every compiled or Triton kernel through an op of :mod:`lckv.ops` and this
table; only the indexes (:mod:`lckv.index`) wrap their C++ classes directly.

``auto`` walks the op's row in :data:`PREFERENCE` order and takes the first backend that serves the
device and is usable here (triton importable, extension built and new enough). An explicit name is
honoured or refused with :class:`BackendUnavailableError` naming the op, the device and the
backends that are available for it.

Example
-------
>>> from lckv.backends import resolve_backend
>>> resolve_backend("merge_attention_states", torch.device("cpu"))   # 'cpu' (or 'reference')
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from lckv._extension import extension_available

__all__ = [
    "BACKENDS", "PREFERENCE", "TABLE", "BackendUnavailableError", "available_backends", "resolve_backend",
    "describe_table",
]

BACKENDS = ("triton", "cuda", "cpu", "torch", "reference")
PREFERENCE = ("triton", "cuda", "cpu", "torch", "reference")
ANY_DEVICE = "*"

# op -> backend -> device types it serves.
TABLE: dict[str, dict[str, tuple[str, ...]]] = {
    "sparse_attention_with_lse": {"triton": ("cuda",), "cpu": ("cpu",), "reference": (ANY_DEVICE,)},
    "sink_window_attention_with_lse": {"triton": ("cuda",), "cpu": ("cpu",), "reference": (ANY_DEVICE,)},
    "merge_attention_states": {"triton": ("cuda",), "cpu": ("cpu",), "reference": (ANY_DEVICE,)},
    "quest_page_scores": {"triton": ("cuda",), "reference": (ANY_DEVICE,)},
    "flat_topk_scores": {"triton": ("cuda",), "cuda": ("cuda",), "reference": (ANY_DEVICE,)},
    "gather_rows": {"cuda": ("cuda",), "reference": (ANY_DEVICE,)},
    "ivf_topk_scores": {"cuda": ("cuda",), "reference": (ANY_DEVICE,)},
    "page_key_bounds": {"reference": (ANY_DEVICE,)},
    "attention_with_lse": {"torch": ("cpu",), "reference": (ANY_DEVICE,)},
    "centroid_estimate": {"cpu": ("cpu",), "reference": (ANY_DEVICE,)},
    "estimate_add_rows": {"cpu": ("cpu",), "reference": (ANY_DEVICE,)},
    "rank_by_group_probability": {"cpu": ("cpu",), "reference": (ANY_DEVICE,)},
    "decode_cluster_step": {"cpu": ("cpu",), "reference": ("cpu",)},
    "offload_rows": {"cpu": ("cpu",), "reference": ("cpu",)},
    "kmeans": {"cpu": ("cpu",), "reference": (ANY_DEVICE,)},
}

# The compiled symbol each `cpu` entry needs in lckv._C.
_CPU_SYMBOL = {
    "sparse_attention_with_lse": "sparse_attention_with_lse",
    "sink_window_attention_with_lse": "sparse_attention_with_lse",  # served by the sparse kernel
    "merge_attention_states": "merge_attention_states",
    "centroid_estimate": "centroid_estimate",
    "estimate_add_rows": "estimate_add",
    "rank_by_group_probability": "rank_by_group_probability",
    "decode_cluster_step": "decode_cluster_step",
    "offload_rows": "offload_rows",
    "kmeans": "kmeans",
}


# The compiled symbol each `cuda` entry needs in lckv._C (csrc/cuda/bind.cpp).
_CUDA_SYMBOL = {"flat_topk_scores": "flat_topk_scores_cuda", "gather_rows": "gather_rows_cuda",
                "ivf_topk_scores": "ivf_topk_scores_cuda"}


class BackendUnavailableError(ValueError):
    """No backend can serve the requested (op, device, backend)."""


def triton_interpreter_enabled() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _extension_has(symbol: str) -> bool:
    if not extension_available():
        return False
    from lckv._extension import _load

    return hasattr(_load()[0], symbol)


def _cpu_extension_has(op: str) -> bool:
    return _extension_has(_CPU_SYMBOL[op])


def _cuda_extension_has(op: str) -> bool:
    return _extension_has(_CUDA_SYMBOL[op])


def _serves(op: str, backend: str, device_type: str, explicit: bool) -> bool:
    """Whether the table lists (op, backend) for this device and it is usable in this process."""
    devices = TABLE[op].get(backend, ())
    listed = ANY_DEVICE in devices or device_type in devices
    if backend == "triton" and device_type == "cpu" and explicit and triton_interpreter_enabled():
        listed = "cuda" in devices  # the interpreter runs the CUDA kernels on CPU tensors
    if not listed:
        return False
    if backend == "triton":
        return _triton_importable()
    if backend == "cpu":
        return _cpu_extension_has(op)
    if backend == "cuda":
        return _cuda_extension_has(op)
    return True


def _device_type(device) -> str:
    return torch.device(device).type


def available_backends(op: str, device, explicit: bool = True) -> list[str]:
    """Backends that can run ``op`` on ``device`` here, in ``auto`` preference order.

    With ``explicit=False`` the list is what ``auto`` may choose from (no Triton interpreter).
    """
    if op not in TABLE:
        raise BackendUnavailableError(f"unknown op {op!r}; known ops: {', '.join(sorted(TABLE))}")
    device_type = _device_type(device)
    return [b for b in PREFERENCE if _serves(op, b, device_type, explicit)]


def resolve_backend(op: str, device, backend: str = "auto") -> str:
    """The backend that will run ``op`` for tensors on ``device``.

    ``backend="auto"`` picks the first usable backend in :data:`PREFERENCE`; any other value must be
    one of :data:`BACKENDS` and usable for this op and device, else
    :class:`BackendUnavailableError` says which backends are.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise BackendUnavailableError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    device_type = _device_type(device)
    if backend == "auto":
        choices = available_backends(op, device, explicit=False)
        if not choices:  # the ops on host-memory indexes on another device
            raise BackendUnavailableError(f"op {op!r} has no backend for device {device_type!r}")
        return choices[0]
    if _serves(op, backend, device_type, explicit=True):
        return backend
    available = available_backends(op, device, explicit=True)
    reason = ""
    if backend == "triton" and device_type == "cpu":
        reason = " (Triton runs on CPU tensors only under TRITON_INTERPRET=1, for testing)"
    elif backend == "cpu" and device_type == "cpu" and "cpu" in TABLE[op]:
        reason = " (the compiled extension lckv._C is not built or lacks this op)"
    elif backend == "cuda" and device_type != "cuda":
        reason = " (the hand-written CUDA kernels take CUDA tensors)"
    elif backend == "cuda" and "cuda" in TABLE[op]:
        reason = " (lckv._C was built without its CUDA kernels: a torch without CUDA, or no CUDA toolkit at build time)"
    raise BackendUnavailableError(
        f"op {op!r} cannot run on backend {backend!r} for device {device_type!r}{reason}; "
        f"available backends there: {available or 'none'}")


def describe_table() -> str:
    """The table as aligned text (one row per op), e.g. for docs and bug reports."""
    lines = [f"{'op':34s} " + " ".join(f"{b:10s}" for b in BACKENDS)]
    for op, row in TABLE.items():
        cells = [",".join(row.get(b, ())) or "-" for b in BACKENDS]
        lines.append(f"{op:34s} " + " ".join(f"{c:10s}" for c in cells))
    return "\n".join(lines)
