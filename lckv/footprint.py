"""Memory footprint of an :class:`~lckv.cache.LckvCache`: what a cache holds, measured and predicted.

:func:`cache_bytes` measures a cache; :func:`predicted_bytes` computes the same numbers from the
model's shape, the policy's settings and the token schedule; :func:`per_token_bytes` gives the
growth rates the prediction is built from. Each component is reported as *written* bytes (what
the process has touched, so what its RSS grows by: a tensor's whole storage, but only the filled
rows of a buffer that grows by capacity) and *allocated* bytes (``<name>_allocated``: buffers with
their spare capacity).

Notation: ``L`` layers, ``B`` batch rows, ``H`` kv heads, ``Hq`` query heads, ``d`` head_dim, ``e``
bytes per element of the model's dtype, ``eh`` of the host store (``host_dtype``, else ``e``),
``n`` offloaded rows (tokens that left the window), ``T`` tokens in the context. One *head* below
is one (batch row, kv head) pair of one layer: there are ``L * B * H`` of them.

Components (bytes; the per-token rate is the slope in ``T``, see :func:`per_token_bytes`)

``resident``
    sink + window K and V on the compute device, ``2 L B H r d e`` with ``r = sink + w`` rows after
    a decode step (``w`` the policy's ``resident_window``: ``w - 1`` recent rows live, in the
    storage the step's update made, which also held the row its commit spilled) and ``r = sink +
    w - 1 + chunk`` after a prompt chunk (the chunk's rows stay in that storage until the next
    call). Constant in ``T``.
``host_kv``
    the offloaded store (:class:`~lckv.cache.HostKVStore`), ``2 B H d eh`` per row and layer:
    written ``2 L B H n d eh``; allocated at the capacity, which starts at 0 and becomes
    ``max(2 * capacity, rows needed)`` whenever an append overflows (so between ``n`` and ``2n``
    rows, and exactly predictable from the sizes of the appends). ``streaming`` keeps no store.
``index`` (``retrieval``, per head, index ``cluster`` with ``cs`` = ``cluster_size`` (16),
    ``seg`` = ``segment`` (8192), ``ss`` = ``super_size`` (64), ``span`` = ``super_span`` (4096))
    the :class:`~lckv.index.ClusterIndex` (``csrc/include/lckv/cluster_index.h``) keeps one float32
    copy of every clustered key, packed per cluster in blocks of 8 rows (a cluster of ``s`` keys
    takes ``8 ceil(s / 8)`` rows: about 3.5 rows of padding per cluster, :data:`CLUSTER_PADDING`),
    plus per key its id (uint32), per cluster its centroid twice (row-major and in blocks of 8),
    its size (float32) and two int64 offsets, and per super-cluster of ``ss`` clusters (formed
    once ``span`` clusters exist) its mean, radius, size, a second copy of the member centroids
    in blocks and 20 bytes per member. Keys past the last full segment (the tail, fewer than
    ``seg``) stay plain float32 rows. Per clustered key:
    ``4 d (1 + 3.5 / cs) + 4 + (8 d + 20) / cs`` (+ ``(4 d (1 + 3.5 / ss) + 12) / cs`` with
    super-clusters). Allocated: every array is reserved at ``9/8`` of what it needs when it grows
    (``reserve_more``); the super-cluster arrays grow like ``std::vector`` (doubling).
    Index ``flat`` keeps ``4 d`` bytes per key; ``exact`` keeps nothing.
``estimate`` (``retrieval`` with ``estimate_rest``)
    :class:`~lckv.policies.estimate.ClusterEstimate`, per head: every row's cluster (int64, in a
    buffer that doubles: ``8`` to ``16`` bytes per row) and per cluster the centroid and the value
    sum (``2 d`` float32) plus count and half-norm (float32): ``8 + (8 d + 8) / cs'`` per row,
    ``cs' = max(cluster_size, ceil(rows / max_clusters))`` (clusters grow past ``max_clusters``
    per head: 131,072 rows at the defaults). With ``clusters=k``: ``k`` clusters.
``queries``
    recorded prefill queries (:class:`~lckv.cache.QueryRecorder`), ``Hq d e`` bytes each per batch
    row and layer: ``retrieval`` with a query-aware index (``graph``, not modelled here) keeps a
    uniform sample of the prompt (between ``build_queries`` and ``2 * build_queries`` queries,
    constant in ``T``), with any other index none; ``snapkv`` and ``block`` keep the last
    ``observation`` queries.
``selection`` (other per-policy state, per head)
    ``snapkv``: one float32 score per row (4 bytes); ``quest``: a float32 min and max per channel
    per page (``8 d / page_size`` per row); ``block``: ``representatives`` float32 keys and flags
    per block (``representatives (4 d + 1) / block_size`` per row); ``retrolm``: one float32
    bookmark key per complete page (``4 d / page_size`` per row). ``full``, ``streaming``: none.
``log``
    the :class:`~lckv.cache.SelectionLog` a layer replays its state from: the resident K/V and the
    recorded queries the state was built from (held after the recorder moved on) and the torch RNG
    states (5 KB each) of the build and of chunked offloads, one tensor per distinct state.
    Constant in ``T``. ``block`` (which does not replay) keeps its state instead: nothing more.

Peak: between model calls the cache holds ``total`` (written) bytes. A model call is a transaction
(:meth:`~lckv.cache.LckvCache.transaction`): the call replaces tensors rather than writing them, and
its snapshot keeps what it replaced alive until the call commits. So the call's end holds ``total +
held``, ``held`` being the resident K/V storages the call found (after a prompt chunk: the whole
chunk plus the window, until the first decode step ends), the recorder's replaced sample and
recent queries, and, in the call where the stores grow, the old K/V buffers (their written rows:
the store before the growth). The call that builds the selection state also holds one layer's
build scratch at a time (``build_scratch``: for ``retrieval`` the keys and the query sample as
float32 copies for the index build, or every head's cluster ids and the weighted values for the
estimate; SnapKV's observation logits over every row, ``2 B Hq observation`` float32 per row,
the largest of all; see ``_LayerModel``). ``peak`` is the largest ``total + held`` (+ ``build_scratch``) over the
schedule. The new buffer's untouched tail and the ``9/8`` reserve are never written, so they stay
out of the RSS: RSS growth tracks the written bytes, not ``allocated``. Not modelled: the model's
activations and the attention engine's scratch during a call (bounded by
:data:`lckv.attention.SCORE_BLOCK_ELEMENTS`), the allocator's own slack, and the 2 MiB rounding of
a store on transparent huge pages (:mod:`lckv.memory`: per (batch row, kv head) region of a store
buffer of at least 16 MiB). glibc raises its mmap threshold (up to 32 MiB) as large blocks are
freed, after which freed buffers (a grown store's old ones, prompt-chunk temporaries) stay in the
heap and in the RSS until reused or trimmed (``malloc_trim``); with the threshold fixed
(``MALLOC_MMAP_THRESHOLD_``) the RSS follows the live bytes.

>>> from transformers import LlamaConfig
>>> config = LlamaConfig(num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4, hidden_size=64)
>>> p = predicted_bytes(config, "full", 4096)  # one call: 4 sink + 1023 window rows stay resident
>>> p["store_rows"], p["host_kv"]  # 2 (K, V) * 5 layers * 4 kv heads * 8 dims * 4 bytes per row
(3069, 3928320)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CLUSTER_PADDING", "ModelShape", "cache_bytes", "predicted_bytes", "per_token_bytes"]

#: mean padding rows per cluster of a ClusterIndex (a cluster of s keys is stored as 8 * ceil(s / 8)
#: rows; s mod 8 spread evenly gives 3.5)
CLUSTER_PADDING = 3.5

#: the components of :func:`cache_bytes` and :func:`predicted_bytes`, in report order
COMPONENTS = ("resident", "host_kv", "index", "estimate", "queries", "selection", "log")


# --- measured -------------------------------------------------------------------------------------
class _Tally:
    """Written and allocated bytes of tensors on any device, each storage counted once
    (:func:`lckv.cache.reachable_bytes`). A tensor's whole storage counts as written (views of a
    larger result keep all of it alive and touched), except where :func:`cache_bytes` knows a
    buffer's spare capacity (the store, the estimate's assignments)."""

    def __init__(self):
        self.seen: set = set()

    def tensor(self, t) -> tuple[int, int]:
        if not isinstance(t, torch.Tensor):
            return 0, 0
        return self.tree(t)

    def buffer(self, t, rows: int) -> tuple[int, int]:
        """A ``[..., capacity, ...]``-shaped growth buffer of which the first ``rows`` rows (along
        dim 2) are written."""
        allocated = self.tensor(t)[1]
        per_row = allocated // max(1, t.shape[2]) if t.dim() > 2 else 0
        return (rows * per_row, allocated) if allocated else (0, 0)

    def tree(self, obj, skip=()) -> tuple[int, int]:
        """Every tensor reachable from ``obj`` (attributes of ``obj`` named in ``skip`` aside)."""
        from lckv.cache import reachable_bytes

        n = reachable_bytes(obj, self.seen, device=None, skip=skip)
        return n, n


def _cluster_index_written(index) -> int:
    """Bytes of the rows a ClusterIndex's arrays hold (their sizes, not capacities): the arrays of
    ``csrc/include/lckv/cluster_index.h`` rebuilt from its accessors."""
    d = index.dim
    clusters, clustered, size = index.n_clusters, index.n_clustered, index.size
    assign = index.assignments()
    sizes = torch.bincount(assign[assign >= 0], minlength=clusters)
    packed_rows = int(((sizes + 7) // 8 * 8).sum())
    supers = index.n_supers
    members = index.super_assignments()
    members = members[members >= 0]
    sup_rows = int(((torch.bincount(members, minlength=supers) + 7) // 8 * 8).sum()) if supers else 0
    floats = (size - clustered) * d + clusters * d + _blocked(clusters) * d + packed_rows * d + clusters
    floats += _blocked(supers) * d + 2 * supers + members.numel() + sup_rows * d
    int64s = (2 * (clusters + 1) if clusters else 0) + (2 * (supers + 1) if supers else 0) + members.numel()
    return 4 * floats + 8 * int64s + 4 * clustered


def _blocked(rows: int) -> int:
    """Rows of a ``put_blocked_row`` array holding ``rows`` rows (whole blocks of 8)."""
    return -(-rows // 8) * 8


def _index_bytes(indexes) -> tuple[int, int]:
    """Written and allocated (``memory_bytes()``) bytes of the indexes of one layer; written bytes
    are known for ClusterIndex and FlatIndex (their keys), else taken as allocated."""
    from lckv.index import ClusterIndex, FlatIndex

    written = allocated = 0
    for layer_index in indexes:
        if layer_index is None:
            continue
        for index in layer_index.heads:
            allocated += index.memory_bytes()
            if isinstance(index, ClusterIndex):
                written += _cluster_index_written(index)
            elif isinstance(index, FlatIndex):
                written += 4 * index.size * index.dim
            else:
                written += index.memory_bytes()
    return written, allocated


def cache_bytes(cache) -> dict:
    """The bytes an :class:`~lckv.cache.LckvCache` holds now, by component (module docstring).

    Returns a dict with ``tokens`` (context length), for each name of :data:`COMPONENTS` the written
    bytes and ``<name>_allocated`` (with spare capacity), ``total`` and ``total_allocated``, and
    ``store_rows`` / ``store_capacity`` (rows per layer; 0 without a store). Tensors are counted
    once per storage wherever they are referenced (a storage shared by the recorder and the
    log counts for the recorder); an index counts ``memory_bytes()`` as allocated and the sizes
    of its arrays as written. Reading a ClusterIndex's written bytes copies its assignments
    (8 bytes per key, briefly).

    >>> cache = lckv.new_cache(model)            # doctest: +SKIP
    >>> model(ids, past_key_values=cache)        # doctest: +SKIP
    >>> cache_bytes(cache)["host_kv"]            # doctest: +SKIP
    """
    tally = _Tally()
    out = {"tokens": cache.get_seq_length()}
    for name in COMPONENTS:
        out[name] = out[f"{name}_allocated"] = 0
    first = next((layer for layer in cache.layers if layer.is_initialized and layer.store is not None), None)
    out["store_rows"] = first.store.length if first is not None else 0
    out["store_capacity"] = first.store.capacity if first is not None else 0

    def add(name, written_allocated):
        out[name] += written_allocated[0]
        out[f"{name}_allocated"] += written_allocated[1]

    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        for t in (layer.sink_k, layer.sink_v, layer.recent_k, layer.recent_v):
            add("resident", tally.tensor(t))
        store = layer.store
        if store is not None:
            add("host_kv", tally.buffer(store._k, store.length))
            add("host_kv", tally.buffer(store._v, store.length))
        if layer.queries is not None:
            add("queries", tally.tree([layer.queries.sample, layer.queries.recent]))
        state = layer.selection
        if state is not None:
            indexes = getattr(state, "indexes", None)
            if indexes is not None:
                add("index", _index_bytes(indexes))
            estimate = getattr(state, "estimate", None)
            if estimate is not None:
                add("estimate", tally.tree(estimate, skip=("_assign",)))
                add("estimate", tally.buffer(estimate._assign, estimate.rows))
            add("selection", tally.tree(state, skip=("indexes", "estimate")))
        log = getattr(layer, "log", None)
        if log is not None:
            add("log", tally.tree(log))
    out["total"] = sum(out[name] for name in COMPONENTS)
    out["total_allocated"] = sum(out[f"{name}_allocated"] for name in COMPONENTS)
    return out


# --- predicted ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the footprint depends on of a model: ``layers``, ``kv_heads``, ``q_heads``,
    ``head_dim`` and the byte size of its dtype (the keys' and queries' element size)."""

    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    dtype_bytes: int = 4

    @classmethod
    def from_config(cls, config, dtype: torch.dtype | None = None) -> "ModelShape":
        """From a transformers config (``num_hidden_layers``, ``num_key_value_heads``,
        ``num_attention_heads``, ``head_dim`` or ``hidden_size / num_attention_heads``); ``dtype``
        is the model's compute dtype (default float32)."""
        if isinstance(config, ModelShape):
            return config
        if getattr(config, "layer_types", None) and "sliding_attention" in config.layer_types:
            raise NotImplementedError("models with sliding-window layers are not modelled (their layers keep "
                                      "only a window); see lckv.integrations.hf")
        q_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
        return cls(config.num_hidden_layers, config.num_key_value_heads, q_heads, head_dim,
                   (dtype or torch.float32).itemsize)


def _grow(capacity: int, need: int) -> int:
    """HostKVStore / ClusterEstimate.append: ``max(2 * capacity, need)`` when ``need`` overflows."""
    return max(2 * capacity, need) if need > capacity else capacity


def _reserve_more(capacity: int, need: int) -> int:
    """ClusterIndex.reserve_more: ``need + need / 8`` when ``need`` overflows."""
    return need + need // 8 if need > capacity else capacity


def _vector_append(capacity: int, size: int, n: int) -> int:
    """libstdc++ ``insert``/``resize`` of ``n`` elements onto ``size``: ``size + max(size, n)``."""
    return size + max(size, n) if size + n > capacity else capacity


class _ClusterIndexModel:
    """One head's ClusterIndex as sizes: ``build`` and ``add`` follow ``cluster_tail`` and
    ``form_supers`` of ``csrc/include/lckv/cluster_index.h``; padding is :data:`CLUSTER_PADDING`."""

    ARRAYS = ("centroids", "blocks", "packed", "members", "sizes", "starts", "block_starts")

    def __init__(self, dim: int, cluster_size: int, segment: int, super_size: int, super_span: int):
        self.d, self.cs, self.segment, self.ss, self.span = dim, cluster_size, segment, super_size, super_span
        self.size = self.clustered = self.clusters = self.keys_capacity = 0
        self.packed_rows = 0.0
        self.spanned = self.supers = 0
        self.sup_rows = 0.0
        self.capacity = dict.fromkeys(self.ARRAYS, 0)

    def build(self, n: int) -> "_ClusterIndexModel":
        self.keys_capacity = n
        self.size = n
        self._cluster_tail(partial=True)
        return self

    def add(self, n: int) -> None:
        tail = self.size - self.clustered
        self.keys_capacity = _vector_append(self.keys_capacity, tail, n)
        self.size += n
        self._cluster_tail(partial=False)

    def _cluster_tail(self, partial: bool) -> None:
        ranges, lo = [], self.clustered
        while self.size - lo >= self.segment:
            ranges.append(self.segment)
            lo += self.segment
        if partial and self.size - lo >= 4 * self.cs:
            ranges.append(self.size - lo)
            lo = self.size
        if not ranges:
            return
        new = [max(1, min(n, (n + self.cs // 2) // self.cs)) for n in ranges]
        c_new, n_new = sum(new), sum(ranges)
        rows_new = n_new + CLUSTER_PADDING * c_new
        d, cap = self.d, self.capacity
        starts = self.clusters + 1 if self.clusters else 1  # push_back(0) on the first segment
        if not self.clusters:
            cap["starts"] = cap["block_starts"] = 1
        cap["centroids"] = _reserve_more(cap["centroids"], (self.clusters + c_new) * d)
        cap["blocks"] = _reserve_more(cap["blocks"], (_blocked(self.clusters) + c_new + 8) * d)
        cap["packed"] = _reserve_more(cap["packed"], round((self.packed_rows + rows_new) * d))
        cap["members"] = _reserve_more(cap["members"], self.clustered + n_new)
        cap["sizes"] = _reserve_more(cap["sizes"], self.clusters + c_new)
        cap["starts"] = _reserve_more(cap["starts"], starts + c_new)
        cap["block_starts"] = _reserve_more(cap["block_starts"], starts + c_new)
        self.clusters += c_new
        self.packed_rows += rows_new
        self.clustered = lo
        self.keys_capacity = self.size - lo  # drop_keys_before: erase + shrink_to_fit
        self._form_supers()

    def _form_supers(self) -> None:
        if self.ss <= 0:
            return
        while self.clusters - self.spanned >= self.span:
            s = max(1, (self.span + self.ss // 2) // self.ss)
            self.supers += s
            self.spanned += self.span
            self.sup_rows += self.span + CLUSTER_PADDING * s

    def _sup_written(self) -> float:
        s, p, d = self.supers, self.spanned, self.d
        if not s:
            return 0.0
        return 4 * (_blocked(s) * d + 2 * s + p + self.sup_rows * d) + 8 * (2 * (s + 1) + p)

    def written(self) -> float:
        d, c = self.d, self.clusters
        floats = (self.size - self.clustered) * d + c * d + _blocked(c) * d + self.packed_rows * d + c
        int64s = 2 * (c + 1) if c else 0
        return 4 * floats + 8 * int64s + 4 * self.clustered + self._sup_written()

    def allocated(self) -> float:
        cap = self.capacity
        floats = self.keys_capacity * self.d + cap["centroids"] + cap["blocks"] + cap["packed"] + cap["sizes"]
        # the super-cluster arrays double as they grow: between 1x and 2x their size, 1.5x on average
        return 4 * floats + 4 * cap["members"] + 8 * (cap["starts"] + cap["block_starts"]) + 1.5 * self._sup_written()


class _FlatIndexModel:
    """One head's FlatIndex: its keys as float32 rows, in a ``std::vector`` (insert growth)."""

    def __init__(self, dim: int):
        self.d, self.size, self.keys_capacity = dim, 0, 0

    def build(self, n: int) -> "_FlatIndexModel":
        self.size = self.keys_capacity = n
        return self

    def add(self, n: int) -> None:
        self.keys_capacity = _vector_append(self.keys_capacity, self.size, n)
        self.size += n

    def written(self) -> float:
        return 4 * self.size * self.d

    def allocated(self) -> float:
        return 4 * self.keys_capacity * self.d


class _RecorderModel:
    """QueryRecorder as counts: sample and recent queries, and the rows of their storages."""

    def __init__(self, capacity: int, recent_capacity: int):
        self.capacity, self.recent_capacity = capacity, recent_capacity
        self.stride = 1
        self.seen = self.sample = self.sample_storage = self.recent = self.recent_storage = 0

    def add(self, n: int, sample: bool) -> None:
        first, self.seen = self.seen, self.seen + n
        if self.capacity and sample:
            picked = _multiples(first, first + n, self.stride)
            self.sample += picked
            self.sample_storage = self.sample  # a fresh tensor (boolean index, or cat)
            while self.sample > 2 * self.capacity:  # a strided view of the same storage
                self.sample, self.stride = -(-self.sample // 2), self.stride * 2
        if self.recent_capacity:  # a copy of exactly the kept rows
            self.recent = self.recent_storage = min(self.recent_capacity, self.recent + n)


def _multiples(lo: int, hi: int, stride: int) -> int:
    """How many multiples of ``stride`` lie in ``[lo, hi)``."""
    return -(-hi // stride) - -(-lo // stride)


class _LayerModel:
    """One cache layer of ``policy`` through a schedule of model calls, as row counts (the update
    path of :class:`~lckv.cache.LckvCacheLayer`: ``update`` spills to the window at the coming
    length, the call's commit spills to the window at the next token's)."""

    def __init__(self, policy, shape: ModelShape, batch: int):
        from lckv.policies import RetrievalPolicy, SelectionPolicy

        self.policy, self.shape, self.batch = policy, shape, batch
        heads = batch * shape.kv_heads
        #: bytes of one token's K and V (model dtype, host dtype) and of one recorded query
        self.kv_row = 2 * heads * shape.head_dim * shape.dtype_bytes
        self.host_row = 2 * heads * shape.head_dim * (
            getattr(torch, policy.host_dtype).itemsize if policy.host_dtype else shape.dtype_bytes)
        self.q_row = batch * shape.q_heads * shape.head_dim * shape.dtype_bytes
        self.selecting = isinstance(policy, SelectionPolicy)
        self.retrieval = isinstance(policy, RetrievalPolicy)
        self.total = self.sink = self.recent = self.recent_storage = 0
        self.store = self.capacity = 0 if policy.keeps_offloaded else None
        self.growth_transient = 0  # store rows the call's transaction still holds (old buffers)
        self.held = 0  # bytes of replaced resident and recorder tensors the call's transaction holds
        self.build_scratch = 0  # bytes a selection build holds besides its state (one layer at a time)
        self.scratch = 0  # build_scratch in the call that built the state, else 0
        recorded = policy.recorded_queries()
        self.recorder = _RecorderModel(*recorded) if recorded else None
        self.built_at = None  # store rows when the selection state was built
        self.log_recent = 0  # storage rows of the recent queries the log's build holds
        self.log_resident = 0  # resident rows the log's build holds
        self.rng_states = 0  # distinct torch RNG states the log holds (one per state seen, see _offload)
        self.rng_drawn = False  # random numbers drawn since the log last recorded the RNG state
        self.indexes = self.estimate_rows = self.assign = self.assign_capacity = None
        self.estimate_clusters = 0

    # -- the update path --
    def _move_out(self, n_new: int) -> int:
        keep = self.policy.resident_window(self.total + n_new) - 1
        overflow = self.recent - keep
        if self.recent == 0 or overflow <= 0:
            return 0
        if self.store is not None:
            grown = _grow(self.capacity, self.store + overflow)
            if grown != self.capacity and self.store:
                self.growth_transient += self.store
            self.capacity = grown
            self.store += overflow
        self.recent -= overflow
        return overflow

    def call(self, n: int) -> None:
        """One model call of ``n`` tokens: update, attention (selection build), commit. Sets
        ``growth_transient`` and ``held``: what the call's transaction snapshot keeps of the state
        the call found (old store buffers, the resident and recorder tensors it replaced)."""
        self.growth_transient = 0
        held_rows = 0
        rec = self.recorder
        before = None if rec is None else (rec.sample_storage, rec.recent_storage)
        self._offload(self._move_out(n))
        to_sink = min(max(0, self.policy.sink - self.sink), n)
        if to_sink:  # torch.cat: new storages of exactly these rows
            held_rows += self.sink
            self.sink += to_sink
        if to_sink < n:
            held_rows += self.recent_storage
            self.recent_storage = self.recent = self.recent + n - to_sink
        self.total += n
        built = False
        if self.selecting and self.store and self.built_at is None and self._builds(n):
            self._build()
            built = True
        held = held_rows * self.kv_row
        if rec is not None:  # after attending: sampled until the state exists
            sampled = rec.capacity and self.built_at is None
            rec.add(n, self.built_at is None)
            if sampled and before[0]:  # the sample was replaced (cat)
                held += before[0] * self.q_row
            # replaced; at a build of a replaying policy the log keeps it
            if rec.recent_capacity and before[1] and not (built and self.policy.replays_state):
                held += before[1] * self.q_row
        self._offload(self._move_out(1))
        self.held = held + self.growth_transient * self.host_row
        self.scratch = self.build_scratch if built else 0

    def _builds(self, n: int) -> bool:
        if n == 1:
            n_select = self.policy.budget_tokens(self.total) - self.sink - self.recent
            return 0 < n_select < self.store
        return self.policy.prefill == "retrieval" and self.policy.prefill_select < self.store

    # -- selection state --
    def _build(self) -> None:
        self.built_at = self.store
        if self.policy.replays_state:  # else the log holds the state itself (counted as selection)
            self.rng_states = 1
            self.log_resident = self.sink + self.recent
            if self.recorder is not None:
                self.log_recent = self.recorder.recent_storage
        if self.retrieval:
            self._build_retrieval(self.store)
        else:
            self.build_scratch = self._page_build_scratch(self.store)

    def _page_build_scratch(self, rows: int) -> int:
        """Bytes the build of a ``snapkv``, ``quest``, ``block`` or ``retrolm`` state holds besides
        the state, at its largest (one layer; measured on stories260K at 64K tokens within 5%):
        SnapKV's observation logits over every row, twice ``[B, Hq, observation, rows]`` float32;
        Quest's keys padded to whole pages twice (for the min and the max); the block policy's keys
        padded to whole blocks and two relevance scores per row; RetroLM's page keys laid out for
        its einsum and three ``[B, Hq, rows]`` float32 logits (scaled, with the bookmark's own,
        softmax). A 16-bit store's rows are read as float32 copies on top."""
        s, policy = self.shape, self.policy
        heads, d = self.batch * s.kv_heads, s.head_dim
        keys = heads * rows * d * 4  # the keys as float32
        sixteen = (self.host_row != 2 * heads * d * 4) * keys
        name = policy.name
        if name == "snapkv":
            return 2 * self.batch * s.q_heads * self.recorder.recent * rows * 4 + sixteen
        if name == "quest":
            return 2 * heads * -(-rows // policy.page_size) * policy.page_size * d * 4 + sixteen
        if name == "block":
            padded = heads * -(-rows // policy.block_size) * policy.block_size
            return padded * d * 4 + 2 * padded * 4 + sixteen
        if name == "retrolm":
            return keys + 3 * self.batch * s.q_heads * rows * 4 + 2 * sixteen
        return 0

    def _offload(self, rows: int) -> None:
        if not rows or self.built_at is None:
            return
        if rows > 1 and self.rng_drawn:  # SelectionLog.rng_state: a new tensor only when it changed
            self.rng_states += 1
            self.rng_drawn = False
        if self.retrieval:
            for index in self.indexes or ():
                index.add(rows)
            if self.estimate_rows is not None:
                self.assign_capacity = _grow(self.assign_capacity, self.assign + rows)
                self.assign += rows
                if rows > 1 and self.store >= 2 * max(1, self.estimate_rows):
                    self._build_estimate(self.store)

    def _index_model(self):
        from lckv.index import ClusterIndex

        kind, params, d = self.policy.index, self.policy.index_params, self.shape.head_dim
        if kind == "cluster":
            config = {**ClusterIndex.build_defaults, **params}
            return _ClusterIndexModel(d, config["cluster_size"], config["segment"], config["super_size"],
                                      config["super_span"])
        if kind == "flat":
            return _FlatIndexModel(d)
        if kind == "exact":
            return None
        raise NotImplementedError(f"the footprint of index {kind!r} is not modelled (cluster, flat and exact are)")

    def _build_retrieval(self, rows: int) -> None:
        model = self._index_model()
        self.indexes = [model.build(rows)] if model is not None else []
        self._build_estimate(rows)
        self.build_scratch = self._retrieval_build_scratch(rows, model is not None)

    def _retrieval_build_scratch(self, rows: int, indexed: bool) -> int:
        """Bytes a retrieval build holds besides the state it makes, at its largest (one layer):
        while the indexes are built (per batch row: the keys as a contiguous float32 copy unless
        the store already is one, the sample of prefill queries as build queries, and one head's
        key copy and k-means assignments in C++), or while the estimate is (every head's cluster
        ids twice, one float weight per row and the weighted values; a 16-bit store's keys and
        values as float32 too)."""
        s, policy = self.shape, self.policy
        h, d, heads = s.kv_heads, s.head_dim, self.batch * s.kv_heads
        sixteen = self.host_row != 2 * heads * d * 4
        index = 0
        if indexed:
            copy = sixteen or self.capacity != rows
            sample = self.recorder.sample if self.recorder is not None else 0
            queries = sample * d * 4 * (s.q_heads + h if policy.group_rank == "probability" else h)
            index = copy * h * rows * d * 4 + queries + rows * (4 * d + 8)
        estimate = 0
        if policy.estimate_rest:
            estimate = heads * rows * (8 + 4 + 4 * d) + sixteen * 2 * heads * rows * d * 4
        return max(index, estimate)

    def _build_estimate(self, rows: int) -> None:
        policy = self.policy
        if not policy.estimate_rest:
            return
        if policy.clusters != "auto":  # ClusterEstimate.from_kmeans: torch.randperm draws
            self.estimate_clusters, clustered = min(policy.clusters, rows), rows
            self.rng_drawn = True
        else:
            from lckv.index import ClusterIndex

            cs = max(policy.cluster_size, -(-rows // policy.max_clusters))
            index = self.indexes[0] if self.indexes else None
            if not (isinstance(index, _ClusterIndexModel) and index.cs == cs and index.size == rows):
                config = ClusterIndex.build_defaults
                index = _ClusterIndexModel(self.shape.head_dim, cs, config["segment"], config["super_size"],
                                           config["super_span"]).build(rows)
            self.estimate_clusters, clustered = index.clusters, index.clustered
            if index.clusters == 0:  # too few keys to cluster: every key its own centroid
                self.estimate_clusters, clustered = rows, rows
        self.estimate_rows = rows
        self.assign = self.assign_capacity = clustered
        if clustered < rows:  # the unclustered tail joins through append
            self.assign_capacity = _grow(self.assign_capacity, rows)
            self.assign = rows

    # -- bytes --
    def bytes(self) -> dict:
        """Written and allocated bytes of one layer by component (``<name>`` / ``<name>_allocated``)."""
        s, b, policy = self.shape, self.batch, self.policy
        h, d = s.kv_heads, s.head_dim
        kv_row, host_row, q_row = self.kv_row, self.host_row, self.q_row
        out = dict.fromkeys(("resident", "resident_allocated"), (self.sink + self.recent_storage) * kv_row)
        out["host_kv"] = (self.store or 0) * host_row
        out["host_kv_allocated"] = (self.capacity or 0) * host_row
        rec = self.recorder
        queries = 0 if rec is None else (rec.sample_storage + rec.recent_storage) * q_row
        out["queries"] = out["queries_allocated"] = queries
        for name in ("index", "estimate", "selection", "log"):
            out[name] = out[f"{name}_allocated"] = 0
        if self.built_at is None:
            return out
        heads = b * h
        rows = self.store
        if self.retrieval:
            for index in self.indexes:
                out["index"] += heads * index.written()
                out["index_allocated"] += heads * index.allocated()
            if self.estimate_rows is not None:
                per_cluster = heads * self.estimate_clusters * (2 * d + 2) * 4
                out["estimate"] = per_cluster + heads * self.assign * 8
                out["estimate_allocated"] = per_cluster + heads * self.assign_capacity * 8
        elif policy.name == "snapkv":
            out["selection"] = heads * rows * 4
        elif policy.name == "quest":
            out["selection"] = heads * -(-rows // policy.page_size) * 2 * d * 4
        elif policy.name == "block":
            out["selection"] = heads * -(-rows // policy.block_size) * policy.representatives * (4 * d + 1)
        elif policy.name == "retrolm":
            out["selection"] = heads * (rows // policy.page_size) * d * 4
        if policy.name in ("snapkv", "quest", "block", "retrolm"):
            out["selection_allocated"] = out["selection"]
        # the log: the build's resident K/V copy, its recent queries (a storage the recorder left),
        # and the torch RNG states the build and the chunked offloads saw (one tensor per state)
        log = self.log_resident * kv_row + self.rng_states * torch.random.get_rng_state().numel()
        if rec is not None and rec.recent_capacity:
            log += self.log_recent * q_row
        out["log"] = out["log_allocated"] = log
        return out


def _schedule(tokens: int, prompt: int, chunk: int | None):
    """Sizes of the model calls: the prompt in chunks of ``chunk`` (one call without), then one
    call per decoded token."""
    step = chunk or prompt
    for lo in range(0, prompt, step):
        yield min(step, prompt - lo)
    for _ in range(tokens - prompt):
        yield 1


def predicted_bytes(config, policy, tokens: int, batch: int = 1, *, prompt: int | None = None,
                    chunk: int | None = None, dtype: torch.dtype | None = None) -> dict:
    """The bytes a cache of ``policy`` holds after ``tokens`` tokens, by component (the formulas of
    the module docstring, evaluated along the schedule of model calls).

    Parameters
    ----------
    config : a transformers config or a :class:`ModelShape`.
    policy : a policy instance or a registered name (default settings).
    tokens : context length (prompt + decoded tokens).
    batch : batch rows (all of the same length, no padding).
    prompt : tokens that came as the prompt (default ``tokens``: the cache right after the prompt,
        before a decode step); the other ``tokens - prompt`` came one per model call (decoding).
    chunk : the prompt's chunk size (``prefill_chunk_size``, or forward calls of ``chunk`` tokens);
        None: one call. The store's capacity and the recorded queries depend on it.
    dtype : the model's dtype (default float32).

    Returns
    -------
    dict
        The keys of :func:`cache_bytes` (``store_rows`` and ``store_capacity`` per layer), plus
        ``held`` (bytes of the state the last call replaced, which its transaction held until it
        committed), ``build_scratch`` (bytes a layer's selection build holds besides the state it
        makes), ``peak`` (the largest ``total + held`` over the calls,
        plus ``build_scratch`` in the call that built the state), ``peak_decode`` (the
        same over the decoding calls; None without any), and ``per_token`` (:func:`per_token_bytes`).
        Components are exact sizes except the ClusterIndex, whose cluster padding is
        :data:`CLUSTER_PADDING` rows per cluster and whose super-cluster arrays' capacity is taken
        as 1.5x their size.

    Raises
    ------
    NotImplementedError
        An index kind other than ``cluster``, ``flat`` or ``exact``, or a model with sliding-window
        layers.
    ValueError
        ``prompt`` outside ``[1, tokens]`` or ``tokens < 1``.
    """
    from lckv.policies import resolve_policy

    policy = resolve_policy(policy)
    shape = ModelShape.from_config(config, dtype)
    prompt = tokens if prompt is None else prompt
    if tokens < 1 or not 1 <= prompt <= tokens:
        raise ValueError(f"need 1 <= prompt <= tokens, got prompt={prompt}, tokens={tokens}")
    layer = _LayerModel(policy, shape, batch)
    peaks = {"prompt": 0, "decode": 0}  # the largest total + held bytes over each phase's calls
    calls = list(_schedule(tokens, prompt, chunk))
    for i, n in enumerate(calls):
        first_decode, unbuilt = layer.total == prompt, layer.built_at is None
        layer.call(n)
        # decode calls between these hold the same few rows and the total only grows: the last
        # call stands for them
        if n > 1 or first_decode or layer.growth_transient or unbuilt or i == len(calls) - 1:
            total = sum(layer.bytes()[c] for c in COMPONENTS) * shape.layers
            phase = "prompt" if layer.total <= prompt else "decode"
            peaks[phase] = max(peaks[phase], total + layer.held * shape.layers + layer.scratch)
    per_layer = layer.bytes()
    out = {"tokens": tokens}
    for name in COMPONENTS:
        out[name] = round(per_layer[name] * shape.layers)
        out[f"{name}_allocated"] = round(per_layer[f"{name}_allocated"] * shape.layers)
    out["total"] = sum(out[name] for name in COMPONENTS)
    out["total_allocated"] = sum(out[f"{name}_allocated"] for name in COMPONENTS)
    out["store_rows"], out["store_capacity"] = layer.store or 0, layer.capacity or 0
    out["held"] = round(layer.held * shape.layers)
    out["build_scratch"] = layer.build_scratch
    out["peak"] = round(max(peaks["prompt"], peaks["decode"], out["total"]))
    out["peak_decode"] = round(max(peaks["decode"], out["total"])) if tokens > prompt else None
    out["per_token"] = per_token_bytes(shape, policy, batch)
    return out


def per_token_bytes(config, policy, batch: int = 1, dtype: torch.dtype | None = None, decoded: bool = False) -> dict:
    """Bytes per context token of each component at long contexts: the slopes of the module
    docstring's formulas in written bytes, for prompt tokens (the selection state is built over
    them) or, with ``decoded``, for tokens decoded after the build (they join the estimate's
    existing clusters: 8 bytes per head, their cluster id). Super-clusters, ``max_clusters`` and
    the index's tail are left out, as are the parts that do not grow. ``host_kv_allocated`` is
    the store at its largest (2x, right after a doubling).

    >>> from lckv.footprint import ModelShape
    >>> rates = per_token_bytes(ModelShape(layers=5, kv_heads=4, q_heads=8, head_dim=8), "retrieval")
    >>> rates["host_kv"], rates["index"], rates["estimate"]
    (1280, 965.0, 250.0)
    """
    from lckv.policies import resolve_policy

    policy = resolve_policy(policy)
    s = ModelShape.from_config(config, dtype)
    heads = s.layers * batch * s.kv_heads
    d = s.head_dim
    eh = getattr(torch, policy.host_dtype).itemsize if policy.host_dtype else s.dtype_bytes
    out = dict.fromkeys(COMPONENTS, 0.0)
    if policy.keeps_offloaded:
        out["host_kv"] = heads * 2 * d * eh
    name = policy.name
    if name == "retrieval":
        if policy.index == "cluster":
            from lckv.index import ClusterIndex

            cs = {**ClusterIndex.build_defaults, **policy.index_params}["cluster_size"]
            out["index"] = heads * (4 * d * (1 + CLUSTER_PADDING / cs) + 4 + (8 * d + 20) / cs)
        elif policy.index == "flat":
            out["index"] = heads * 4 * d
        elif policy.index != "exact":
            raise NotImplementedError(f"the footprint of index {policy.index!r} is not modelled")
        if policy.estimate_rest:
            auto = policy.clusters == "auto" and not decoded
            per_cluster = (8 * d + 8) / policy.cluster_size if auto else 0.0
            out["estimate"] = heads * (8 + per_cluster)
    elif name == "snapkv":
        out["selection"] = heads * 4
    elif name == "quest":
        out["selection"] = heads * 8 * d / policy.page_size
    elif name == "block":
        out["selection"] = heads * policy.representatives * (4 * d + 1) / policy.block_size
    elif name == "retrolm":
        out["selection"] = heads * 4 * d / policy.page_size
    out = {k: round(v, 3) for k, v in out.items()}
    out["total"] = round(sum(out[c] for c in COMPONENTS), 3)
    out["host_kv_allocated"] = 2 * out["host_kv"]
    return out
