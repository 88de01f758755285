"""Vector indexes over offloaded keys: one per (layer, kv head), inner-product top-k.

* :class:`FlatIndex` — exact (the oracle), C++ with SIMD and OpenMP.
* :class:`IVFIndex` — k-means inverted lists, C++.
* :class:`GraphIndex` — attention-aware graph built from keys plus a sample of queries, C++.
* :class:`ClusterIndex` — keys clustered segment by segment, scanned best cluster first until
  ``scan * k`` keys: for large k (C++).
* :class:`FaissIndex` — faiss-cpu Flat / HNSW / IVF (inner product), the baselines.
* :class:`LayerIndex` / :func:`search_heads` — all kv heads of a layer searched in parallel;
  :func:`search_groups` — a GQA group's top-k by summed probability (ClusterIndex).

All share ``build(keys, queries=None)``, ``add(keys)`` and
``search(queries, k, **params) -> (scores, ids, n_scored)``; see :mod:`lckv.index.base` for the
shapes, the padding rule when k exceeds the index size, the errors, and the thread-safety contract
(searches from many threads at once, also while keys are added).
"""
from lckv.index.base import DimensionMismatchError, EmptyIndexError, Index
from lckv.index.faiss_index import FaissIndex
from lckv.index.multihead import LayerIndex, search_groups, search_heads
from lckv.index.native import ClusterIndex, FlatIndex, GraphIndex, IVFIndex

__all__ = [
    "Index", "FlatIndex", "IVFIndex", "GraphIndex", "ClusterIndex", "FaissIndex", "LayerIndex", "search_groups", "search_heads",
    "EmptyIndexError", "DimensionMismatchError",
]
