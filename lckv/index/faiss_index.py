"""faiss-cpu indexes (Flat, HNSW, IVF; inner-product metric) behind the :class:`Index` interface,
as the baselines lckv's indexes are measured against.

``n_scored`` comes from faiss's own counters (``hnsw_stats.ndis``, ``indexIVF_stats.ndis`` plus
the ``nlist`` centroids): faiss counts per call, so every query of one call reports the call's
mean. faiss pads missing results with id -1 and a large negative score; the adapter turns those
scores into ``-inf`` to follow the interface's padding rule.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from lckv.index.base import Index

__all__ = ["FaissIndex"]

_KINDS = ("flat", "hnsw", "ivf")


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
    Build queries are ignored: faiss indexes are built from the keys alone.
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
        if self._index is None:
            return 0
        return int(_faiss().serialize_index(self._index).nbytes)

    def _build(self, keys, queries):
        self._add(keys)

    def _add(self, keys):
        x = keys.numpy()
        if self._index is None:
            self._make(x.shape[0])
        if not self._index.is_trained:
            self._index.train(x)
        self._index.add(x)

    def _search(self, queries, k, params):
        faiss = _faiss()
        q = queries.numpy()
        m = q.shape[0]
        if self.kind == "hnsw":
            self._index.hnsw.efSearch = int(params["ef"])
            faiss.cvar.hnsw_stats.reset()
        elif self.kind == "ivf":
            self._index.nprobe = int(params["nprobe"])
            faiss.cvar.indexIVF_stats.reset()
        distances, labels = self._index.search(q, k)
        if self.kind == "hnsw":
            total = faiss.cvar.hnsw_stats.ndis
        elif self.kind == "ivf":
            total = faiss.cvar.indexIVF_stats.ndis + m * self._index.nlist
        else:
            total = m * self.size
        scores = torch.from_numpy(np.ascontiguousarray(distances, dtype=np.float32))
        ids = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        scores[ids < 0] = float("-inf")
        n_scored = torch.full((m,), int(round(total / max(m, 1))), dtype=torch.int64)
        return scores, ids, n_scored
