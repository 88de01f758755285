"""Public ops of the retrieval policy's one-call CPU paths (lckv/decode_step.h,
lckv/centroid_estimate.h), with their compositions of separate ops as the reference
(:mod:`lckv.reference.decode_step`): ``decode_cluster_step`` (search, sparse attention, estimate
and resident attention of one layer's decode step) and ``offload_rows`` (spilled rows join the
indexes and the estimate). ``indexes`` are the per-head index objects, batch-major."""
from __future__ import annotations

import torch

from lckv._extension import compiled
from lckv.checks import (
    ANY_FLOAT_DTYPES, check_cluster_state, check_estimate_add_inputs, check_finite, check_group_query, check_int,
    check_scale, check_tensor,
)
from lckv.ops._common import choose_backend
from lckv.reference import decode_step as ref

__all__ = ["decode_cluster_step", "offload_rows", "native_handles"]


def _check_heads(indexes, name: str, count: int, head_dim: int, allow_empty: bool) -> list:
    """``indexes``: a list of ``count`` index objects of ``head_dim`` (or empty / None when
    ``allow_empty``); returns it as a list."""
    if indexes is None and allow_empty:
        return []
    if not isinstance(indexes, (list, tuple)):
        raise TypeError(f"{name} must be a list of batch * kv_heads indexes, got {type(indexes).__name__}")
    if not (allow_empty and not indexes) and len(indexes) != count:
        raise ValueError(f"{name} must hold batch * kv_heads = {count} indexes"
                         f"{' (or none)' if allow_empty else ''}, got {len(indexes)}")
    for i, ix in enumerate(indexes):
        if getattr(ix, "dim", None) != head_dim:
            raise ValueError(f"{name}[{i}] must be an index of dim {head_dim} (the keys' head_dim), got "
                             f"{type(ix).__name__} of dim {getattr(ix, 'dim', None)}")
    return list(indexes)


def _check_decode_step(indexes, q, keys, values, resident_k, resident_v, n_select, scale, estimate, search):
    """Types, shapes, devices and settings of :func:`decode_cluster_step` (the kernel checks the
    values; the reference path adds q's NaN scan)."""
    from lckv.index import ClusterIndex

    check_tensor(q, "q", 3, "[batch, q_heads, head_dim]", dtypes=ANY_FLOAT_DTYPES)
    for name, t in (("keys", keys), ("values", values), ("resident_k", resident_k), ("resident_v", resident_v)):
        check_tensor(t, name, 4, "[batch, kv_heads, rows, head_dim]", dtypes=ANY_FLOAT_DTYPES)
    batch, kv_heads, rows, head_dim = keys.shape
    check_group_query(q, batch, kv_heads, head_dim)
    if values.shape != keys.shape:
        raise ValueError(f"values must have the shape of keys {tuple(keys.shape)}, got {tuple(values.shape)}")
    if resident_k.shape[:2] != (batch, kv_heads) or resident_k.shape[3] != head_dim:
        raise ValueError(f"resident_k must have shape [{batch}, {kv_heads}, r, {head_dim}], "
                         f"got {tuple(resident_k.shape)}")
    if resident_v.shape != resident_k.shape:
        raise ValueError(f"resident_v must have the shape of resident_k {tuple(resident_k.shape)}, "
                         f"got {tuple(resident_v.shape)}")
    heads = _check_heads(indexes, "indexes", batch * kv_heads, head_dim, allow_empty=False)
    for i, ix in enumerate(heads):
        if not isinstance(ix, ClusterIndex):
            raise TypeError(f"indexes[{i}] must be a ClusterIndex, got {type(ix).__name__}")
        if ix.size != rows:
            raise ValueError(f"indexes[{i}] holds {ix.size} keys, the offloaded keys have {rows} rows")
    check_int(n_select, "n_select", 1)
    check_scale(scale, optional=False)
    if float(scale) <= 0:
        raise ValueError(f"scale must be > 0, got {float(scale)}")
    if search is not None:
        if not isinstance(search, dict):
            raise TypeError(f"search must be a dict of ClusterIndex search settings or None, "
                            f"got {type(search).__name__}")
        unknown = sorted(set(search) - set(ClusterIndex.search_params))
        if unknown:
            raise TypeError(f"search got unknown settings {unknown}; "
                            f"ClusterIndex takes {sorted(ClusterIndex.search_params)}")
    if estimate is not None:
        if not isinstance(estimate, (list, tuple)) or len(estimate) != 4:
            raise TypeError("estimate must be (centroids, counts, value_sums, assign) or None")
        centroids, counts, value_sums, assign = estimate
        check_cluster_state(centroids, counts, value_sums)
        if centroids.shape[:2] != (batch, kv_heads) or centroids.shape[3] != head_dim:
            raise ValueError(f"centroids must have shape [{batch}, {kv_heads}, clusters, {head_dim}], "
                             f"got {tuple(centroids.shape)}")
        check_tensor(assign, "assign", 3, "[batch, kv_heads, rows]", dtypes=(torch.int64,))
        if assign.shape != (batch, kv_heads, rows):
            raise ValueError(f"assign must have shape [{batch}, {kv_heads}, {rows}], got {tuple(assign.shape)}")
    if rows == 0:
        raise ValueError("keys hold no rows: a decode step searches the offloaded rows, build the indexes first")


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
    from lckv.backends import resolve_backend
    from lckv.index.multihead import group_search_settings

    resolve_backend("decode_cluster_step", q.device if isinstance(q, torch.Tensor) else "cpu", backend)  # device first
    _check_decode_step(indexes, q, keys, values, resident_k, resident_v, n_select, scale, estimate, search)
    handles = native_handles(indexes)
    name = choose_backend("decode_cluster_step", q.device, backend, handles is not None,
                          "indexes must be built lckv ClusterIndex heads")
    search = group_search_settings(search or {})
    if name == "reference":
        check_finite(q, "q")
        return ref.decode_cluster_step(indexes, q, keys, values, resident_k, resident_v, n_select, scale, estimate,
                                       search)
    return compiled("decode_cluster_step").decode_cluster_step(
        handles, q.float().contiguous(), keys, values, resident_k, resident_v, n_select, float(scale),
        estimate=estimate, **search)


def offload_rows(indexes, keys, values, valid=None, estimate=None, backend: str = "auto"):
    """See :func:`lckv.reference.decode_step.offload_rows` (``estimate = (centroids, half_norms,
    counts, value_sums)`` or None; ``indexes`` empty or None: no index). Every input is checked before
    anything changes (here, and by the ``cpu`` kernel), so a bad call leaves the indexes and the
    estimate as they were."""
    check_tensor(keys, "keys", 4, "[batch, kv_heads, n, head_dim]", dtypes=ANY_FLOAT_DTYPES)
    check_tensor(values, "values", 4, "[batch, kv_heads, n, head_dim]", dtypes=ANY_FLOAT_DTYPES)
    if values.shape != keys.shape or values.dtype != keys.dtype:
        raise ValueError(f"values must have the shape and dtype of keys ({tuple(keys.shape)}, {keys.dtype}), "
                         f"got {tuple(values.shape)}, {values.dtype}")
    batch, kv_heads, _, head_dim = keys.shape
    indexes = _check_heads(indexes, "indexes", batch * kv_heads, head_dim, allow_empty=True)
    if estimate is not None:
        if not isinstance(estimate, (list, tuple)) or len(estimate) != 4:
            raise TypeError("estimate must be (centroids, half_norms, counts, value_sums) or None")
        check_estimate_add_inputs(keys, values, valid, *estimate, values_too=False)
    handles = native_handles(indexes) if indexes else []
    name = choose_backend("offload_rows", keys.device, backend, handles is not None,
                          "indexes must be built lckv indexes")
    if name == "reference":
        check_finite(keys, "keys")  # before the first index changes
        return ref.offload_rows(indexes, keys, values, valid, estimate)
    return compiled("offload_rows").offload_rows(handles, keys, values, valid, estimate)
