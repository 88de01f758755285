"""Public ops of the retrieval policy's one-call CPU paths (lckv/decode_step.h,
lckv/centroid_estimate.h), with their compositions of separate ops as the reference
(:mod:`lckv.reference.decode_step`): ``decode_cluster_step`` (search, sparse attention, estimate
and resident attention of one layer's decode step) and ``offload_rows`` (spilled rows join the
indexes and the estimate). ``indexes`` are the per-head index objects, batch-major."""
from __future__ import annotations

from lckv._extension import compiled
from lckv.ops._common import choose_backend
from lckv.reference import decode_step as ref

__all__ = ["decode_cluster_step", "offload_rows", "native_handles"]


def native_handles(indexes):
    """The C++ cores of ``indexes`` (lckv's own built indexes), or None when one is not (faiss, or
    not built yet): the one-call kernels need them."""
    from lckv.index.native import NativeIndex

    if not all(isinstance(ix, NativeIndex) and ix.size for ix in indexes):
        return None
    return [ix.native_handle() for ix in indexes]


def decode_cluster_step(indexes, q, keys, values, resident_k, resident_v, n_select: int, scale: float,
                        estimate=None, search: dict | None = None, backend: str = "auto"):
    """See :func:`lckv.reference.decode_step.decode_cluster_step`; ``indexes`` are ClusterIndex
    heads. The ``cpu`` kernel reads float32/float16/bfloat16 K/V in place (the resident rows in the
    store's dtype or float32, e.g. a 16-bit ``host_dtype`` store under a float32 model) and keeps
    the queries in float32. ``search``: ClusterIndex search settings (defaults for those not given)."""
    from lckv.index import ClusterIndex

    handles = native_handles(indexes)
    name = choose_backend("decode_cluster_step", q.device, backend, handles is not None,
                          "indexes must be built lckv ClusterIndex heads")
    search = {**ClusterIndex.search_params, **(search or {})}
    if name == "reference":
        return ref.decode_cluster_step(indexes, q, keys, values, resident_k, resident_v, n_select, scale, estimate,
                                       search)
    return compiled("decode_cluster_step").decode_cluster_step(
        handles, q.float().contiguous(), keys, values, resident_k, resident_v, n_select, float(scale),
        estimate=estimate, **search)


def offload_rows(indexes, keys, values, valid=None, estimate=None, backend: str = "auto"):
    """See :func:`lckv.reference.decode_step.offload_rows` (``estimate = (centroids, half_norms,
    counts, value_sums)`` or None). The ``cpu`` kernel checks every input before changing anything,
    so a bad call leaves the indexes and the estimate as they were."""
    handles = native_handles(indexes) if indexes else []
    name = choose_backend("offload_rows", keys.device, backend, handles is not None,
                          "indexes must be built lckv indexes")
    if name == "reference":
        return ref.offload_rows(indexes, keys, values, valid, estimate)
    return compiled("offload_rows").offload_rows(handles, keys, values, valid, estimate)
