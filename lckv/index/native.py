"""lckv's own C++ indexes (csrc/include/lckv/*_index.h) behind the :class:`Index` interface.

The settings and their defaults are defined once, in the C++ params structs
(``ClusterBuildParams``, ``GraphBuildParams``, ``IVFBuildParams``, ``SearchParams``), and read
from the extension on first use (``lckv._C.index_defaults``): each class's ``build_defaults``
(constructor settings) and ``search_params`` (search keywords) are plain dicts of them, and a
constructor setting left at :data:`BUILD_DEFAULT` takes its ``build_defaults`` value. Importing this
module never needs the extension; reading the defaults or making an index without it raises
:class:`~lckv.ExtensionNotAvailableError`.
"""
from __future__ import annotations

import functools
import math

import torch  # noqa: F401  (doctest examples)

from lckv._extension import compiled
from lckv.index.base import EmptyIndexError, Index, check_shape

__all__ = ["FlatIndex", "IVFIndex", "GraphIndex", "ClusterIndex", "NativeIndex", "BUILD_DEFAULT"]


class _BuildDefault:
    """The default of a constructor setting: its value in the class's ``build_defaults``."""

    def __repr__(self) -> str:
        return "BUILD_DEFAULT"


BUILD_DEFAULT = _BuildDefault()


@functools.lru_cache(maxsize=None)
def _index_defaults(kind: str) -> dict:
    return compiled("index_defaults").index_defaults(kind)


class _CoreDefaults:
    """A class attribute read from the extension on first use: the ``part`` ("build" or "search")
    of ``lckv._C.index_defaults(owner._kind)``, as a fresh dict on every access."""

    def __init__(self, part: str):
        self.part = part

    def __get__(self, obj, owner) -> dict:
        return dict(_index_defaults(owner._kind)[self.part])


class NativeIndex(Index):
    """Common part of the C++-backed indexes: ``self._core`` is an ``lckv._C.VectorIndex``, made
    by ``_new_core(n)`` when the first keys arrive (some settings depend on n). The C++ glue checks
    dtype, device, contiguity and values of every input, so the Python side checks only shapes.

    Threads: the core's reader-writer lock (``RwLock``, ``csrc/include/lckv/vector_index.h``) makes
    every search share the index and every add or build own it, with the GIL released, also in the
    compiled calls that take :meth:`native_handle` s; so searches take no Python lock (they run in
    parallel), and ``build`` / ``add`` also hold the Python lock, which makes the first add's core
    creation and build's emptiness check atomic."""

    _kind: str  # the lckv._C.index_defaults kind, set by each subclass
    #: constructor settings and their defaults (from the C++ params struct)
    build_defaults = _CoreDefaults("build")
    #: search keyword arguments and their defaults (from the C++ SearchParams)
    search_params = _CoreDefaults("search")
    _check_input = staticmethod(check_shape)

    def __init__(self, dim: int):
        super().__init__(dim)
        self._core = None

    def _settings(self, **settings) -> dict:
        """``settings`` with every BUILD_DEFAULT replaced by its ``build_defaults`` value."""
        defaults = self.build_defaults
        return {name: defaults[name] if value is BUILD_DEFAULT else value for name, value in settings.items()}

    def _new_core(self, n: int):
        raise NotImplementedError

    def native_handle(self):
        """The C++ index this object wraps (an ``lckv._C.VectorIndex``), for the compiled ops that
        take index handles (``lckv._C.search_groups``, ``offload_rows``, ``decode_cluster_step``).
        It is made when the first keys arrive: before that, raises :class:`EmptyIndexError`."""
        if self._core is None:
            raise EmptyIndexError(f"{type(self).__name__} has no native index yet: build() or add() keys first")
        return self._core

    @property
    def size(self) -> int:
        return 0 if self._core is None else self._core.size

    @property
    def simd_level(self) -> str:
        """Inner-product kernel picked at construction: ``avx512``, ``avx2`` or ``scalar``."""
        return self._new_core(1).simd_level if self._core is None else self._core.simd_level

    def memory_bytes(self) -> int:
        return 0 if self._core is None else self._core.memory_bytes

    def _add(self, keys):
        if self._core is None:
            self._build(keys, None)
        else:
            self._core.add(keys)

    def _search_under_lock(self, queries, k, params):
        # no Python lock: the core's RwLock guards the search (see the class docstring)
        if self.size == 0:
            raise self._empty_error()
        return self._search(queries, k, params)

    def _search(self, queries, k, params):
        return self._core.search(queries, k, **params)


class FlatIndex(NativeIndex):
    """Exact inner-product top-k: every query scores every key (cache-blocked, SIMD, OpenMP).

    >>> index = FlatIndex(8).build(torch.randn(100, 8))
    >>> scores, ids, n_scored = index.search(torch.randn(3, 8), k=5)   # n_scored == 100
    """

    _kind = "flat"

    def _new_core(self, n: int):
        return compiled("FlatIndex").FlatIndex(self.dim)

    def _build(self, keys, queries):
        core = self._new_core(keys.shape[0])
        core.add(keys)
        self._core = core  # only once the keys passed the glue's checks


class IVFIndex(NativeIndex):
    """k-means inverted lists: a search scans the ``nprobe`` lists whose centroids have the largest
    inner product with the query. ``n_lists`` defaults to ``4 * sqrt(n)`` at build time; the
    k-means runs ``n_iters`` Lloyd iterations from a sample drawn by ``seed``.

    Settings and their defaults: ``IVFIndex.build_defaults``; search parameter ``nprobe``
    (``IVFIndex.search_params``).
    """

    _kind = "ivf"

    def __init__(self, dim: int, n_lists: int | None = None, n_iters: int = BUILD_DEFAULT, seed: int = BUILD_DEFAULT):
        super().__init__(dim)
        self.n_lists = n_lists
        self.config = self._settings(n_iters=n_iters, seed=seed)
        self._new_core(0)  # validates the settings now (ValueError naming the bad one)

    def _new_core(self, n: int):
        n_lists = self.n_lists or max(1, int(4 * math.sqrt(max(n, 1))))
        return compiled("IVFIndex").IVFIndex(self.dim, n_lists, **self.config)

    def _build(self, keys, queries):
        core = self._new_core(keys.shape[0])
        core.build(keys)
        self._core = core


class GraphIndex(NativeIndex):
    """Attention-aware graph index (RoarGraph / RetrievalAttention style).

    Built from the keys plus a sample of queries: each build query is linked to its exact
    top-``build_knn`` keys, the query-key links are projected onto a key graph of degree at most
    ``max_degree`` (keys that answer the same queries become neighbours), the same projection over
    coarse subsamples of the keys (every ``coarse_stride``-th, ...) adds ``coarse_degree`` long-range
    edges per level, build queries whose search
    misses their top-1 key add long-range edges, and keys no build query reaches (and keys added
    later) are linked by searching with the key itself. An upper level of up to ``upper_size`` keys
    that cover the build queries (the entries plus the top-1 keys of k-means clusters of the build
    queries) gets a graph of its own (``upper_degree`` edges, from each build query's top-32 upper
    keys): its edges are long, so it navigates between regions of keys that no build query links.
    A search scores the ``n_entry`` entry keys, walks the upper level from them (beam ``upper_ef``),
    then runs a beam search of width ``ef`` over the key graph from the best keys found;
    ``n_scored`` counts every key scored on the way. Without build queries it degrades to a key-only graph.

    Build queries: at most ``max_build_queries`` rows of ``queries`` are used (an even subsample).
    ``max_degree=None`` picks 48 for head_dim < 64, else the build default. Measured (bench_index, 262K keys, one
    search thread): on the real stories260K heads (head_dim 8) degree 48 reaches recall@100 0.9 at
    ef 28-32 instead of 48, about 1.2x the QPS at recall 0.9 for the same keys scored; on the
    synthetic head_dim-128 set (with the upper level) it gives the same QPS at recall 0.9-0.95 but
    scores ~10% more keys for recall 0.95. Other head dims were not measured.
    ``upper_size`` is 0 (no upper level) by default; ``None`` picks ``n // 64`` when that exceeds
    128. ``n_entry=None`` picks the build default with an upper level, else at least that many and
    ``n // 512``. Measured (bench_index, 262K keys): on the synthetic head_dim-128 set the upper
    level takes recall@100 at ~1% scored from 0.80 to 0.95; on the real stories260K heads (head_dim 8),
    where the entries already navigate, it scores fewer keys for the same recall but runs at
    about a third of the QPS at recall 0.9-0.95.
    Keys added after the build are not in the upper level (the key graph reaches them).
    Settings and their defaults: ``GraphIndex.build_defaults``. Search parameters
    (``GraphIndex.search_params``): ``ef``, larger is slower and more accurate; ``upper_ef``, the
    walk's beam over the upper level (0: the ``upper_ef`` given at construction).

    >>> keys, prefill_q = torch.randn(5000, 16), torch.randn(1000, 16) + 1
    >>> index = GraphIndex(16).build(keys, prefill_q)
    >>> scores, ids, n_scored = index.search(torch.randn(4, 16) + 1, k=10, ef=48)
    """

    uses_build_queries = True

    _kind = "graph"

    def __init__(self, dim: int, max_degree: int | None = None, build_knn: int = BUILD_DEFAULT,
                 rank_window: int = BUILD_DEFAULT, lists_per_key: int = BUILD_DEFAULT, n_entry: int | None = None,
                 build_ef: int = BUILD_DEFAULT, repair_queries: int = BUILD_DEFAULT, coarse_stride: int = BUILD_DEFAULT,
                 coarse_degree: int = BUILD_DEFAULT, upper_size: int | None = BUILD_DEFAULT,
                 upper_degree: int = BUILD_DEFAULT, upper_ef: int = BUILD_DEFAULT, max_build_queries: int = 65536):
        super().__init__(dim)
        if max_degree is None:
            max_degree = 48 if dim < 64 else BUILD_DEFAULT
        self.config = self._settings(max_degree=max_degree, build_knn=build_knn, rank_window=rank_window,
                                     lists_per_key=lists_per_key, n_entry=n_entry, build_ef=build_ef,
                                     repair_queries=repair_queries, coarse_stride=coarse_stride,
                                     coarse_degree=coarse_degree, upper_size=upper_size, upper_degree=upper_degree,
                                     upper_ef=upper_ef)
        self._new_core(0)  # validates the settings now (ValueError naming the bad one)
        self.max_build_queries = max_build_queries

    def _new_core(self, n: int):
        config = dict(self.config)
        if config["upper_size"] is None:
            config["upper_size"] = n // 64 if n // 64 > 128 else 0
        if config["n_entry"] is None:  # with an upper level, the walk navigates: fewer entries
            entries = self.build_defaults["n_entry"]
            config["n_entry"] = entries if config["upper_size"] > 0 else max(entries, n // 512)
        return compiled("GraphIndex").GraphIndex(self.dim, **config)

    @property
    def mean_degree(self) -> float:
        return 0.0 if self._core is None else self._core.mean_degree

    def _build(self, keys, queries):
        core = self._new_core(keys.shape[0])
        if queries is None:
            queries = keys.new_empty((0, self.dim))
        elif queries.shape[0] > self.max_build_queries:
            step = queries.shape[0] / self.max_build_queries
            pick = (torch.arange(self.max_build_queries, dtype=torch.float64) * step).long()
            queries = queries[pick].contiguous()
        core.build(keys, queries)
        self._core = core


class ClusterIndex(NativeIndex):
    """Segment-clustered inverted index, built for large k (hundreds to thousands of keys).

    Keys are clustered one segment of ``segment`` consecutive keys at a time (k-means, about
    ``cluster_size`` keys per cluster, ``n_iters`` Lloyd iterations), and each cluster's keys are
    stored contiguously. A search scores every centroid, then scans clusters in descending centroid
    score until ``scan * k`` keys were scanned, plus the tail (keys that do not fill a segment yet,
    scanned exactly), and returns the top k. Unlike a graph beam, the work grows with k, so recall
    holds when k is a large fraction of the keys; with ``scan * k >= size`` the search is exact.
    ``add`` clusters the tail whenever it reaches ``segment`` keys (decode-time inserts never
    re-cluster old keys). ``build`` also clusters a last partial segment of >= 4 * cluster_size keys.
    Build queries are ignored (the clusters are over keys).

    Super-clusters keep the centroid work sub-linear at long contexts: every ``super_span``
    consecutive clusters (default 4096, i.e. 64K keys) are grouped by k-means over their centroids
    into super-clusters of about ``super_size`` (64) clusters, each with its mean and radius (the
    largest member-centroid distance from the mean), so ``q . mean + |q| * radius`` bounds every
    member's score. A search scores the super means, then the member centroids of the supers whose
    bound could reach the clusters it scans (``expand``: at least that share of the supers, best
    bound first); the clusters scanned are exactly those of a search over every centroid (up to
    ties). :meth:`search_group` also takes the rest's mass from the supers it did not open (their
    keys at the mean), its one approximation; ``expand=1`` makes it exact. Clusters of a partial
    span (the newest) are scored one by one. ``super_size=0`` turns super-clusters off.

    ``probe_supers`` (search parameter, default 0) trades that exactness for a cost that barely
    grows with the context: a search opens only the query's ``probe_supers`` best supers by the
    score of their mean (more, best first, while they and the loose clusters hold fewer than
    ``2 * scan * k`` keys) and picks its clusters among their members and the loose clusters, so a
    query scores the super means, the loose centroids and a few supers' members, not every centroid
    (batched: the products are with the super means). Approximate: a cluster in an unopened super
    is never scanned. The retrieval policy uses it for a prefill's per-query picks
    (``prefill_query_probe``); the group search (:meth:`search_group`) refuses it.

    Many queries at once (16 or more in one ``search``, or per head in
    :func:`lckv.index.search_heads`): each block of queries gets its inner products with every
    centroid and every tail key from one matrix product (torch's BLAS, one thread per block), then
    picks and scans its clusters as above; the same results up to the rounding of the products,
    several times faster than query by query when the tail or the centroids are many (a chunk's
    per-query picks in a retrieval prefill). A small ``k`` keeps only the tail's own top ``k``
    before the clusters' keys join.

    Each accessor (``n_clusters``, ``assignments()``, ``centroids()``, ...) reads one consistent state;
    while another thread adds keys, two calls may read different states.

    Settings and their defaults: ``ClusterIndex.build_defaults``. Search parameters
    (``ClusterIndex.search_params``): ``scan`` (default 2.0, >= 1): keys scanned per
    result wanted; ``expand`` (default 0.1, in (0, 1]): share of the super-clusters opened at least;
    ``probe_supers`` (default 0, >= 0): super-clusters opened per query, 0 = the exact rule.

    >>> index = ClusterIndex(16).build(torch.randn(5000, 16))
    >>> scores, ids, n_scored = index.search(torch.randn(4, 16), k=500, scan=3.0)
    """

    _kind = "cluster"

    def __init__(self, dim: int, cluster_size: int = BUILD_DEFAULT, segment: int = BUILD_DEFAULT,
                 n_iters: int = BUILD_DEFAULT, super_size: int = BUILD_DEFAULT, super_span: int = BUILD_DEFAULT):
        super().__init__(dim)
        self.config = self._settings(cluster_size=cluster_size, segment=segment, n_iters=n_iters,
                                     super_size=super_size, super_span=super_span)
        self._new_core(0)  # validates the settings now (ValueError naming the bad one)

    def _new_core(self, n: int):
        return compiled("ClusterIndex").ClusterIndex(self.dim, **self.config)

    @property
    def n_clusters(self) -> int:
        return 0 if self._core is None else self._core.n_clusters

    @property
    def n_supers(self) -> int:
        return 0 if self._core is None else self._core.n_supers

    def super_assignments(self) -> torch.Tensor:
        """Super-cluster of every cluster, ``[n_clusters]`` int64 (-1: loose, in a partial span)."""
        return torch.empty(0, dtype=torch.int64) if self._core is None else self._core.super_assignments()

    def super_means(self) -> torch.Tensor:
        """``[n_supers, dim]`` float32."""
        return torch.empty(0, self.dim) if self._core is None else self._core.super_means()

    def super_radii(self) -> torch.Tensor:
        """``[n_supers]`` float32: each super-cluster's largest member-centroid distance from its mean
        (rounded up ~1e-5 relative, so ``q . mean + |q| * radius`` bounds every member's float score)."""
        return torch.empty(0) if self._core is None else self._core.super_radii()

    @property
    def n_clustered(self) -> int:
        """Keys held in clusters; the remaining ``size - n_clustered`` (the tail) are scanned exactly."""
        return 0 if self._core is None else self._core.n_clustered

    def search_group(self, queries, k: int, scale: float, **params):
        """Top-k keys of one GQA group (``queries [group, dim]``) by summed softmax probability:
        :func:`lckv.index.search_groups` for this index alone. Returns ``(probs [k], ids [k], n_scored)``."""
        from lckv.index.multihead import search_groups

        if isinstance(queries, torch.Tensor) and queries.dim() != 2:
            raise ValueError(f"queries must have shape [group, head_dim] (2 dims), got {tuple(queries.shape)}")
        probs, ids, n_scored = search_groups([self], queries[None] if isinstance(queries, torch.Tensor) else queries,
                                             k, scale, **params)
        return probs[0], ids[0], int(n_scored[0])

    def assignments(self) -> torch.Tensor:
        """Cluster of every key, ``[size]`` int64 (-1 for the tail)."""
        return torch.empty(0, dtype=torch.int64) if self._core is None else self._core.assignments()

    def centroids(self) -> torch.Tensor:
        """``[n_clusters, dim]`` float32."""
        return torch.empty(0, self.dim) if self._core is None else self._core.centroids()

    def _build(self, keys, queries):
        core = self._new_core(keys.shape[0])
        core.build(keys)
        self._core = core
