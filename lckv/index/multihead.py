"""One index per kv head of a layer, searched together.

:class:`LayerIndex` holds the indexes of one layer's kv heads. Its ``search`` sends
``queries[h]`` to head ``h``; lckv's C++ indexes are searched in one call that releases the GIL
and runs all (head, query) pairs in parallel with OpenMP (:func:`search_heads`); other indexes
(faiss) are searched head by head (faiss parallelizes over queries itself).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from lckv._extension import compiled
from lckv.index.base import EmptyIndexError, Index, check_k, check_rows, check_shape
from lckv.index.native import IVFIndex, NativeIndex

__all__ = ["LayerIndex", "search_groups", "search_heads"]


def _native_handles(indexes):
    """The C++ indexes of ``indexes`` when all are built native indexes (one compiled call serves
    them), else None."""
    if all(isinstance(ix, NativeIndex) and ix.size for ix in indexes):
        return [ix.native_handle() for ix in indexes]
    return None


def _check_heads(indexes, queries, k, layout):
    """Checks shared by the per-head searches: one non-empty index per row of ``queries``. The
    values of ``queries`` are left to the compiled search (search_heads checks them for the others)."""
    if not indexes:
        raise ValueError("indexes must hold at least one index")
    dim = indexes[0].dim
    check_shape(queries, "queries", dim, ndim=3, layout=layout)
    check_k(k)
    if queries.shape[0] != len(indexes):
        raise ValueError(f"queries must have {len(indexes)} heads (one per index) in dim 0, got {tuple(queries.shape)}")
    for h, ix in enumerate(indexes):
        if ix.dim != dim:
            raise ValueError(f"indexes[{h}] has head_dim {ix.dim}, indexes[0] has {dim}")
        if ix.size == 0:
            raise EmptyIndexError(f"search on an empty index: indexes[{h}] holds no keys")


def search_heads(indexes: Sequence[Index], queries: torch.Tensor, k: int, **params):
    """Searches ``indexes[h]`` with ``queries[h]`` for every head h.

    queries: ``[heads, n_queries, head_dim]`` float32. Returns ``scores [heads, n_queries, k]``,
    ``ids [heads, n_queries, k]`` (padding -1 / -inf as in :mod:`lckv.index.base`) and
    ``n_scored [heads, n_queries]``. All indexes must share one class and head_dim.
    """
    _check_heads(indexes, queries, k, "[heads, n_queries, head_dim]")
    kinds = {type(ix) for ix in indexes}
    if len(kinds) != 1:
        raise TypeError(f"indexes must share one class, got {sorted(t.__name__ for t in kinds)}")
    first = indexes[0]
    unknown = set(params) - set(first.search_params)
    if unknown:
        raise TypeError(f"{type(first).__name__} search got unknown parameters {sorted(unknown)}")
    merged = {**first.search_params, **params}
    handles = _native_handles(indexes)
    if handles is not None:
        return compiled("search_heads").search_heads(handles, queries, k, **merged)
    check_rows(queries, "queries", first.dim, ndim=3, layout="[heads, n_queries, head_dim]")
    results = [ix._search_under_lock(queries[h], k, merged) for h, ix in enumerate(indexes)]
    return tuple(torch.stack(parts) for parts in zip(*results))


def search_groups(indexes: Sequence[Index], queries: torch.Tensor, k: int, scale: float, sort: bool = True,
                  **params):
    """A GQA group's top-k keys by summed attention probability, for every kv head at once.

    ``indexes`` are :class:`~lckv.index.ClusterIndex` es (one per kv head); ``queries`` ``[heads,
    group, head_dim]`` float32 holds each kv head's query heads; ``scale`` multiplies the inner
    products (the attention scale). Per head, the candidates are the keys of the clusters any query
    head's search would scan (``scan * k`` keys each, best centroids first) plus the unclustered
    tail; each query head's softmax is normalised over the candidates exactly and every other key at
    its cluster centroid (``size * exp(scale * q . centroid)``); candidates rank by the summed
    probabilities. With ``scan * k >= size`` the ranking is exact. Returns ``probs [heads, k]``
    (descending; with ``sort=False`` the same top k in no particular order, which saves a sort), ``ids [heads, k]`` (padded with 0 / -1 when fewer keys exist) and ``n_scored
    [heads]`` (inner products computed, all query heads). One C++ call, GIL released, heads in
    parallel.
    """
    from lckv.index.native import ClusterIndex

    if indexes and not all(isinstance(ix, ClusterIndex) for ix in indexes):
        raise TypeError(f"search_groups needs ClusterIndex heads, got {sorted({type(ix).__name__ for ix in indexes})}")
    _check_heads(indexes, queries, k, "[heads, group, head_dim]")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):  # its value: checked by the compiled op
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    unknown = set(params) - set(ClusterIndex.search_params)
    if unknown:
        raise TypeError(f"ClusterIndex search got unknown parameters {sorted(unknown)}")
    merged = group_search_settings(params)
    return compiled("search_groups").search_groups(_native_handles(indexes), queries, k, scale=float(scale),
                                                   sorted=bool(sort), **merged)


def group_search_settings(params: dict) -> dict:
    """``params`` with the :class:`~lckv.index.ClusterIndex` search defaults filled in, as the group
    search (:func:`search_groups`, the fused decode step) takes them: ``probe_supers`` is a setting
    of one query's own search only, so a non-zero one is refused (ValueError) and it is dropped."""
    from lckv.index.native import ClusterIndex

    merged = {**ClusterIndex.search_params, **params}
    if merged.pop("probe_supers", 0):
        raise ValueError("probe_supers applies to ClusterIndex.search (each query's own top-k), not to the group "
                         f"search; got probe_supers={params['probe_supers']!r}")
    return merged


class LayerIndex:
    """The indexes of one layer, one per kv head.

    ``make_index(head_dim)`` creates one head's index, e.g. ``lambda d: GraphIndex(d, max_degree=24)``.

    * ``build(keys [kv_heads, n, head_dim], queries [kv_heads, m, head_dim] or None)``: for GQA, pass
      each kv head's query group flattened (``[kv_heads, group * m, head_dim]``).
    * ``add(keys [kv_heads, n, head_dim])``.
    * ``search(queries [kv_heads, n_queries, head_dim], k, **params)`` -> ``[kv_heads, n_queries, k]``
      scores and ids, ``[kv_heads, n_queries]`` n_scored.
    * ``search_group(queries [kv_heads, group, head_dim], k, scale, **params)``: each kv head's top-k
      keys for its whole query group by summed probability (:func:`search_groups`, ClusterIndex).
    """

    def __init__(self, kv_heads: int, head_dim: int, make_index: Callable[[int], Index]):
        if kv_heads <= 0:
            raise ValueError(f"kv_heads must be positive, got {kv_heads}")
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.heads = [make_index(head_dim) for _ in range(kv_heads)]

    @property
    def size(self) -> int:
        return self.heads[0].size

    def _check(self, x, name, layout, values=True):
        """The shape and, with ``values``, dtype, device, contiguity and values: all heads are checked
        before any changes (the compiled add_heads checks the values itself)."""
        (check_rows if values else check_shape)(x, name, self.head_dim, ndim=3, layout=layout)
        if x.shape[0] != self.kv_heads:
            raise ValueError(f"{name} must have kv_heads={self.kv_heads} in dim 0, got {tuple(x.shape)}")

    def build(self, keys: torch.Tensor, queries: torch.Tensor | None = None) -> "LayerIndex":
        self._check(keys, "keys", "[kv_heads, n, head_dim]")
        if queries is not None:
            self._check(queries, "queries", "[kv_heads, n_queries, head_dim]")
        for h, index in enumerate(self.heads):
            index.build(keys[h], None if queries is None else queries[h])
        return self

    def add(self, keys: torch.Tensor) -> None:
        handles = _native_handles(self.heads)
        self._check(keys, "keys", "[kv_heads, n, head_dim]", values=handles is None)
        if handles is not None:
            compiled("add_heads").add_heads(handles, keys)  # one call, GIL released
            return
        for h, index in enumerate(self.heads):
            index.add(keys[h].contiguous())

    def search(self, queries: torch.Tensor, k: int, **params):
        return search_heads(self.heads, queries, k, **params)

    def search_group(self, queries: torch.Tensor, k: int, scale: float, sort: bool = True, **params):
        """:func:`search_groups` over this layer's heads (ClusterIndex heads only)."""
        return search_groups(self.heads, queries, k, scale, sort, **params)
