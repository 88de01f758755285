"""The offload path's gather (:func:`lckv.reference.gather_rows`): selected rows of the K/V store
into a dense device block. ``cuda``: csrc/cuda/gather_rows.cu, reading a pinned host store in place
over the bus (no staging copy of the whole store)."""
from __future__ import annotations

from lckv import reference
from lckv._extension import compiled
from lckv.backends import resolve_backend
from lckv.reference.gather import check_gather_inputs

__all__ = ["gather_rows"]


def gather_rows(src, indices, backend: str = "auto"):
    """Same contract as :func:`lckv.reference.gather_rows`; the backend is chosen by the device of
    ``indices`` (the result's). The ``cuda`` kernel takes ``src`` on that device or in pinned host
    memory (``tensor.pin_memory()``)."""
    device = indices.device if hasattr(indices, "device") else "cpu"
    name = resolve_backend("gather_rows", device, backend)
    if name == "reference":
        return reference.gather_rows(src, indices)
    check_gather_inputs(src, indices)
    return compiled("gather_rows_cuda").gather_rows_cuda(src, indices)
