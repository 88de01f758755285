"""faiss-cpu indexes (Flat, HNSW, IVF; inner-product metric) behind the :class:`Index` interface,
as the baselines lckv's indexes are measured against.

``n_scored`` comes from faiss's own counters (``hnsw_stats.ndis``, ``indexIVF_stats.ndis`` plus
the ``nlist`` centroids): faiss counts per call, so every query of one call reports the call's
mean. faiss pads missing results with id -1 and a large negative score; the adapter turns those
scores into ``-inf`` to follow the interface's padding rule.

Threads: faiss's indexes may be searched from many threads but not while keys are added (faiss
reallocates the storage and links that searches read: unguarded, IVF searches returned ids outside
the index and an HNSW search crashed the process), so the index's Python lock guards them (searches shared,
``build`` / ``add`` exclusive). faiss counts the work of HNSW and IVF searches in process-wide
counters, so those searches run one at a time across all FaissIndex objects (each still uses faiss's
OpenMP threads over its queries) to report each call's own ``n_scored``; flat searches run in parallel.
"""
from __future__ import annotations

import functools
import math
import threading

import numpy as np
import torch

from lckv.index.base import Index

__all__ = ["FaissIndex"]

_KINDS = ("flat", "hnsw", "ivf")
_COUNTERS = threading.Lock()  # held by an HNSW / IVF search from resetting faiss's counters to reading them


@functools.lru_cache(maxsize=64)
def _search_settings(kind: str, value: int):
    """faiss's per-call settings of an HNSW (``efSearch``) or IVF (``nprobe``) search; read-only
    during a search, so one object serves concurrent searches."""
    faiss = _faiss()
    return faiss.SearchParametersHNSW(efSearch=value) if kind == "hnsw" else faiss.SearchParametersIVF(nprobe=value)


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("FaissIndex needs faiss-cpu (pip install faiss-cpu)") from exc
    return faiss


class FaissIndex(Index):
    """A faiss index with the inner-product metric.

    kind: ``"flat"`` (IndexFlatIP, exact), ``"hnsw"`` (IndexHNSWFlat, ``M`` links per node,
    ``ef_construction``; search parameter ``ef`` = efSearch) or ``"ivf"`` (IndexIVFFlat with
    ``n_lists`` k-means lists, default ``4 * sqrt(n)``; search parameter ``nprobe``).
    Build queries are ignored: faiss indexes are built from the keys alone. Safe to search from many
    threads while another adds keys (module docstring, "Threads").
    """

    def __init__(self, dim: int, kind: str = "hnsw", M: int = 32, ef_construction: int = 100,
                 n_lists: int | None = None):
        super().__init__(dim)
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        self.kind, self.M, self.ef_construction, self.n_lists = kind, M, ef_construction, n_lists
        self.search_params = {"hnsw": {"ef": 64}, "ivf": {"nprobe": 8}, "flat": {}}[kind]
        self._index = None
        self._make(0)

    def _make(self, n: int):
        faiss = _faiss()
        ip = faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            self._index = faiss.IndexFlatIP(self.dim)
        elif self.kind == "hnsw":
            self._index = faiss.IndexHNSWFlat(self.dim, self.M, ip)
            self._index.hnsw.efConstruction = self.ef_construction
        elif n > 0:  # ivf: the number of lists depends on n
            n_lists = min(n, self.n_lists or max(1, int(4 * math.sqrt(n))))
            quantizer = faiss.IndexFlatIP(self.dim)
            self._index = faiss.IndexIVFFlat(quantizer, self.dim, n_lists, ip)
            self._quantizer = quantizer  # keep it alive

    @property
    def size(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def memory_bytes(self) -> int:
        with self._lock.shared:
            if self._index is None:
                return 0
            return int(_faiss().serialize_index(self._index).nbytes)

    def _build(self, keys, queries):
        self._add(keys)

    def _add(self, keys):
        x = keys.numpy()
        if not x.shape[0]:  # an empty build: an IVF index is made (and trained) by the first keys
            return
        if self._index is None:
            self._make(x.shape[0])
        if not self._index.is_trained:
            self._index.train(x)
        self._index.add(x)

    def _search(self, queries, k, params):
        faiss = _faiss()
        q = queries.numpy()
        m = q.shape[0]
        if self.kind == "flat":
            distances, labels = self._index.search(q, k)
            total = m * self.size
        else:  # the settings go with the call, not into the index that concurrent searches share
            hnsw = self.kind == "hnsw"
            name = "ef" if hnsw else "nprobe"
            if params[name] < 1:  # faiss takes any int; a negative ef crashes its HNSW search
                raise ValueError(f"FaissIndex.search parameter {name} must be >= 1, got {params[name]}")
            settings = _search_settings(self.kind, int(params[name]))
            counters = faiss.cvar.hnsw_stats if hnsw else faiss.cvar.indexIVF_stats
            with _COUNTERS:
                counters.reset()
                distances, labels = self._index.search(q, k, params=settings)
                total = counters.ndis
            if self.kind == "ivf":
                total += m * self._index.nlist
        scores = torch.from_numpy(np.ascontiguousarray(distances, dtype=np.float32))
        ids = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        scores[ids < 0] = float("-inf")
        n_scored = torch.full((m,), int(round(total / max(m, 1))), dtype=torch.int64)
        return scores, ids, n_scored
