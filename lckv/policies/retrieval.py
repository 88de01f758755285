"""RetrievalAttention: per-head vector-index retrieval of the offloaded keys (Liu et al., 2024),
with a RetroInfer-style estimate of the keys it does not retrieve."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch

from lckv._extension import compiled, extension_available
from lckv.index.native import ClusterIndex, NativeIndex
from lckv.policies.base import PolicyConfigError, register_policy
from lckv.policies.selection import SelectionPolicy, distinct_rows, group_sum, top_by_group_probability

__all__ = ["RetrievalPolicy", "INDEX_KINDS"]


def _index_factory(kind: str):
    """Constructor of one head's index for an index kind (imported lazily)."""
    from lckv import index

    return {
        "flat": index.FlatIndex,
        "ivf": index.IVFIndex,
        "graph": index.GraphIndex,
        "cluster": index.ClusterIndex,
        "faiss_flat": lambda dim, **kw: index.FaissIndex(dim, kind="flat", **kw),
        "faiss_hnsw": lambda dim, **kw: index.FaissIndex(dim, kind="hnsw", **kw),
        "faiss_ivf": lambda dim, **kw: index.FaissIndex(dim, kind="ivf", **kw),
    }[kind]


#: ``exact`` scores every offloaded key (lckv.ops.flat_topk_scores): the oracle top-k.
INDEX_KINDS = ("exact", "flat", "ivf", "graph", "cluster", "faiss_flat", "faiss_hnsw", "faiss_ivf")
_INDEX_CLASSES = {"flat": "FlatIndex", "ivf": "IVFIndex", "graph": "GraphIndex", "cluster": "ClusterIndex",
                  "faiss_flat": "FaissIndex", "faiss_hnsw": "FaissIndex", "faiss_ivf": "FaissIndex"}


class _Estimate:
    """Per-cluster state of the estimate. ``assign`` grows by doubling its buffer, so the one row
    a decode step offloads costs O(1), not a copy of every row's cluster id."""

    def __init__(self, centroids, counts, value_sums, assign):
        self.centroids = centroids  # [batch, kv_heads, clusters, head_dim] float32
        self.counts = counts  # [batch, kv_heads, clusters] float32 (non-pad rows)
        self.value_sums = value_sums  # [batch, kv_heads, clusters, head_dim] float32
        self._assign = assign  # [batch, kv_heads, capacity] int64 buffer
        self.rows = assign.shape[-1]
        self.half_norms = 0.5 * centroids.square().sum(-1)  # [batch, kv_heads, clusters], for assignments

    @property
    def assign(self) -> torch.Tensor:
        """``[batch, kv_heads, rows]`` int64: the cluster of each offloaded row."""
        return self._assign[..., :self.rows]

    def append(self, assign: torch.Tensor) -> None:
        n = assign.shape[-1]
        if self.rows + n > self._assign.shape[-1]:
            grown = self._assign.new_empty(*self._assign.shape[:2], max(2 * self._assign.shape[-1], self.rows + n))
            grown[..., :self.rows] = self._assign[..., :self.rows]
            self._assign = grown
        self._assign[..., self.rows:self.rows + n] = assign
        self.rows += n


@dataclass
class _RetrievalState:
    indexes: list  # one lckv.index.LayerIndex per batch row (None for kind "exact")
    estimate: _Estimate | None


@register_policy
@dataclass
class RetrievalPolicy(SelectionPolicy):
    """Each decode step searches, per kv head, an index over the offloaded keys for the top
    ``budget - sink - window`` keys of its query group, and attends only those rows.

    ``group_rank`` says how the query heads of a GQA group share one selection:
    ``"probability"`` (default) ranks keys by the group's summed attention probabilities
    ``sum_h softmax_h(q_h . k)`` (:func:`~lckv.policies.selection.top_by_group_probability`): each
    query head searches the index for its own top keys (one batched search, ``group`` queries per
    kv head), and the union is ranked by summed probability, each head's softmax normalised over
    the candidates plus the estimated mass of the other offloaded keys (the candidates alone
    without ``estimate_rest``). With ``index="cluster"`` the rule runs inside the index in one pass
    (:func:`lckv.index.search_groups`): the candidates are the keys of every cluster any head of
    the group scans, and each head is normalised over them plus the index's own clusters (each
    unscanned key at its cluster centroid), so no separate search per head, estimate or ranking
    call is made. ``"logits"`` searches once per kv head with the summed query ``sum_h q_h`` (keys
    rank by summed logits; half the search work at group 2, but one head's large logits then
    decide for the group: on stories260K at 2K tokens and a 5% budget, exact selection by summed
    logits gives next-token KL 0.0053, by summed probability 0.0002). With one query head per kv
    head both rules are the same.

    ``index`` is one of :data:`INDEX_KINDS` (default ``cluster``: the segment-clustered index whose
    whole decode step runs in one C++ call, and the most faithful on real models; see
    ``docs/results.md``); ``index_params`` go to its constructor (e.g.
    ``{"max_degree": 32}`` for ``graph``) and ``search_params`` to its search (``{"ef": 128}``).
    The index is built at the first decode step from the offloaded keys and up to
    ``build_queries`` prefill queries (a uniform sample over the prompt, group-summed like the
    decode queries), which is what makes the attention-aware ``graph`` index accurate for decode
    queries; tokens spilling from the window later are inserted as decoding goes on.

    ``min_scanned`` (index ``cluster``): a search scans at least this many keys whatever k is
    (``scan`` is raised to ``min_scanned / k`` for small k). ``scan * k`` alone leaves a small budget
    a small candidate pool: on stories260K (bench_fidelity, next-token KL vs ``full``) at 32K tokens
    and a budget of 256, pools of at least 0 / 1024 / 2048 / 4096 / 8192 keys gave 0.204 / 0.045 /
    0.011 / 0.0014 / 0.0013 (at 8K and a 1% budget: 0.128 with no floor, 0.0010 from 1024 on).
    4096 is the pool a k = 2048 search scans anyway at the default scan 2, so the floor makes
    small budgets cost what large ones do, not more. 0 turns the floor off.

    ``exact_above``: when a step asks for more than this fraction of the offloaded keys, they are
    scored exactly (a flat scan, as index ``exact``) instead of searched: at that size a scan
    costs about what a graph search does, and graph searches lose recall when k nears n.

    ``estimate_rest``: diffuse heads spread attention so widely that no top-k captures it. The
    offloaded keys are clustered (per head, with per-cluster value sums and counts); the keys not
    retrieved are then estimated as ``count * exp(q . centroid)`` with the cluster's mean value, a
    third partial state merged by LSE (RetroInfer-style). ``clusters="auto"`` (default) makes one
    cluster per about ``cluster_size`` (16) offloaded keys, clustered segment by segment in C++ (the
    :class:`~lckv.index.ClusterIndex` clustering; reused when ``index="cluster"`` with the same
    cluster size), so the estimate's resolution grows with the context up to ``max_clusters``
    (8192) per head, beyond which clusters grow instead (a step's estimate costs
    O(clusters * head_dim)); an int asks for that many k-means centroids per head (torch Lloyd
    iterations). Keys offloaded later join their nearest centroid.
    """

    index: str = "cluster"
    index_params: dict = field(default_factory=dict)
    search_params: dict = field(default_factory=dict)
    build_queries: int = 4096
    estimate_rest: bool = True
    clusters: int | str = "auto"
    cluster_size: int = 16
    max_clusters: int = 8192
    exact_above: float = 0.25
    group_rank: str = "probability"
    min_scanned: int = 4096

    name = "retrieval"

    def validate(self) -> None:
        super().validate()
        if self.index not in INDEX_KINDS:
            raise PolicyConfigError(f"RetrievalPolicy.index must be one of {INDEX_KINDS}, got {self.index!r}")
        if self.index == "exact" and (self.index_params or self.search_params):
            raise PolicyConfigError("RetrievalPolicy: index 'exact' takes no index_params or search_params")
        if self.index != "exact":
            import lckv.index as index_module

            cls = getattr(index_module, _INDEX_CLASSES[self.index])
            accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "dim", "kind"}
            unknown = sorted(set(self.index_params) - accepted)
            if unknown:
                raise PolicyConfigError(f"RetrievalPolicy.index_params {unknown} are not settings of {self.index!r}; "
                                        f"settings: {sorted(accepted)}")
            # Search parameters: the class's (FaissIndex's depend on its kind, so ask an empty one).
            searchable = set(_index_factory(self.index)(1).search_params if cls is index_module.FaissIndex
                             else cls.search_params)
            unknown = sorted(set(self.search_params) - searchable)
            if unknown:
                raise PolicyConfigError(f"RetrievalPolicy.search_params {unknown} are not search parameters of "
                                        f"{self.index!r}; parameters: {sorted(searchable)}")
        if self.group_rank not in ("probability", "logits"):
            raise PolicyConfigError(f"RetrievalPolicy.group_rank must be 'probability' or 'logits', got {self.group_rank!r}")
        if self.build_queries < 0:
            raise PolicyConfigError(f"RetrievalPolicy.build_queries must be >= 0, got {self.build_queries}")
        if not 0.0 <= self.exact_above <= 1.0:
            raise PolicyConfigError(f"RetrievalPolicy.exact_above must be a fraction in [0, 1], got {self.exact_above}")
        if self.clusters != "auto" and (isinstance(self.clusters, bool) or not isinstance(self.clusters, int)
                                        or self.clusters < 1):
            raise PolicyConfigError(f"RetrievalPolicy.clusters must be 'auto' or an int >= 1, got {self.clusters!r}")
        if isinstance(self.cluster_size, bool) or not isinstance(self.cluster_size, int) or self.cluster_size < 1:
            raise PolicyConfigError(f"RetrievalPolicy.cluster_size must be an int >= 1, got {self.cluster_size!r}")
        if isinstance(self.min_scanned, bool) or not isinstance(self.min_scanned, int) or self.min_scanned < 0:
            raise PolicyConfigError(f"RetrievalPolicy.min_scanned must be an int >= 0, got {self.min_scanned!r}")
        if isinstance(self.max_clusters, bool) or not isinstance(self.max_clusters, int) or self.max_clusters < 1:
            raise PolicyConfigError(f"RetrievalPolicy.max_clusters must be an int >= 1, got {self.max_clusters!r}")

    def recorded_queries(self):
        return (self.build_queries, 0) if self.build_queries else None

    # --- build and insert ----------------------------------------------------------------------
    def build(self, layer):
        keys = layer.store.keys
        batch, kv_heads, _, head_dim = keys.shape
        indexes = [None] * batch
        if self.index != "exact":
            from lckv.index import LayerIndex

            make = _index_factory(self.index)
            sample = layer.queries.sample if layer.queries is not None else None
            for b in range(batch):
                queries = None
                if sample is not None:
                    queries = self._build_queries(sample[b], kv_heads)
                indexes[b] = LayerIndex(kv_heads, head_dim, lambda d: make(d, **self.index_params))
                indexes[b].build(keys[b].float().contiguous(), queries)
        estimate = self._build_estimate(layer, indexes) if self.estimate_rest else None
        return _RetrievalState(indexes, estimate)

    def _build_queries(self, sample, kv_heads):
        """``[q_heads, m, D]`` prefill queries -> ``[kv_heads, m, D]`` build queries distributed like
        the decode searches: group-summed for ``group_rank="logits"``; per query head otherwise
        (the group's queries interleaved, m of them, so the build cost stays the same)."""
        q_heads, m, head_dim = sample.shape
        if self.group_rank == "logits":
            return group_sum(sample.transpose(0, 1).reshape(-1, q_heads, head_dim), kv_heads).transpose(0, 1).contiguous()
        group = q_heads // kv_heads
        per_head = sample.float().reshape(kv_heads, group, m, head_dim).transpose(1, 2).reshape(kv_heads, m * group, head_dim)
        return per_head[:, ::group].contiguous()

    def on_offload(self, state, layer, first_row, n_rows):
        new = layer.store.keys[:, :, first_row:first_row + n_rows]
        cores = self._native_cores(state)
        if new.device.type == "cpu" and extension_available() and cores is not None:
            # one C++ call: the index heads and the estimate's clusters (lckv._C.offload_rows)
            est = state.estimate
            values = layer.store.values[:, :, first_row:first_row + n_rows]
            valid = None if layer.store_padding is None or est is None else self._valid_rows(layer, first_row, n_rows)
            estimate = None if est is None else (est.centroids, est.half_norms, est.counts, est.value_sums)
            assign = compiled("offload_rows").offload_rows(cores, new, values, valid, estimate)
            if est is not None:
                est.append(assign)
            return
        for b, index in enumerate(state.indexes):
            if index is not None:
                index.add(new[b].float().contiguous())
        if state.estimate is not None:
            est = state.estimate
            values = layer.store.values[:, :, first_row:first_row + n_rows]
            valid = None if layer.store_padding is None else self._valid_rows(layer, first_row, n_rows)
            if new.device.type == "cpu" and extension_available():  # one C++ call (centroid_estimate.h)
                assign = compiled("estimate_add").estimate_add(new.float().contiguous(), values.float().contiguous(), valid,
                                                               est.centroids, est.half_norms, est.counts, est.value_sums)
            else:
                assign = self._assign(new.float(), est.centroids, est.half_norms)
                self._accumulate(est, assign, values.float(), valid)
            est.append(assign)

    # --- selection -----------------------------------------------------------------------------
    def select(self, state, layer, q, n_select, scale=None):
        keys = layer.store.keys
        kv_heads = keys.shape[1]
        exact = self.index == "exact" or n_select > self.exact_above * layer.store.length
        if self.group_rank == "logits" or q.shape[1] == kv_heads:
            q_sum = group_sum(q, kv_heads)  # [batch, kv_heads, D]
            if exact:
                from lckv.ops import flat_topk_scores

                _, ids = flat_topk_scores(q_sum.to(keys.dtype), keys, n_select)
                return ids
            params = self._search_params(n_select)
            return torch.stack([index.search(q_sum[b].unsqueeze(1).contiguous(), n_select, **params)[1][:, 0]
                                for b, index in enumerate(state.indexes)])
        if exact:
            return top_by_group_probability(q, keys, n_select, scale)
        batch, q_heads, head_dim = q.shape
        per_head = q.float().reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
        if self.index == "cluster":  # the whole rule in one C++ pass per kv head (ClusterIndex.search_group)
            scale = head_dim ** -0.5 if scale is None else float(scale)
            params = self._search_params(n_select)
            return torch.stack([index.search_group(per_head[b].contiguous(), n_select, scale, False, **params)[1]
                                for b, index in enumerate(state.indexes)])
        params = self._search_params(n_select)
        candidates = torch.stack([index.search(per_head[b].contiguous(), n_select, **params)[1]
                                  for b, index in enumerate(state.indexes)])  # [batch, kv_heads, group, k]
        # repeats across the group's searches are fine: the estimate and the ranking take a set.
        # Each head's probabilities are over all offloaded keys: the candidates exactly, the rest
        # by the centroid estimate when there is one.
        pool = candidates.flatten(2)
        rest_lse = self._estimate(state, layer, q, pool, scale, lse_only=True)
        return top_by_group_probability(q, keys, n_select, scale, pool, rest_lse)

    def fused_step(self, state, layer, q, n_select, scale=None):
        """With ``index="cluster"`` and ``group_rank="probability"`` on the CPU: the step in one C++
        call per layer (``lckv._C.decode_cluster_step``, lckv/decode_step.h): per (batch, kv head),
        in one parallel region, the group search, sparse attention over the retrieved rows, the
        estimate of the rest and attention over the resident rows, merged by LSE; what
        :meth:`select`, sparse attention, :meth:`estimate` and the merges compute one by one. The
        queries stay float32 throughout (the separate path rounds them to a 16-bit store's dtype
        for the sparse attention). None where the step has no fused form (another index or rule, a
        step scored exactly by ``exact_above``, a non-CPU store or query, no extension)."""
        keys = layer.store.keys
        if (self.index != "cluster" or self.group_rank != "probability" or not extension_available()
                or keys.device.type != "cpu" or q.device.type != "cpu" or q.shape[1] == keys.shape[1]
                or n_select > self.exact_above * layer.store.length):
            return None
        heads = self._native_cores(state)
        if not heads:
            return None
        est = state.estimate
        estimate = None if est is None else (est.centroids, est.counts, est.value_sums, est.assign)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return compiled("decode_cluster_step").decode_cluster_step(
            heads, q.float().contiguous(), keys, layer.store.values, torch.cat([layer.sink_k, layer.recent_k], 2),
            torch.cat([layer.sink_v, layer.recent_v], 2), n_select, scale,
            estimate=estimate, **self._search_params(n_select, with_defaults=True))

    @staticmethod
    def _native_cores(state):
        """The C++ cores of every index head (batch-major; [] when no batch row has an index), or
        None when a head is not one of lckv's own built indexes (faiss): the one-call paths need them."""
        cores = [getattr(ix, "_core", None) if isinstance(ix, NativeIndex) else None
                 for index in state.indexes if index is not None for ix in index.heads]
        return None if any(core is None for core in cores) else cores

    def _search_params(self, n_select: int, with_defaults: bool = False) -> dict:
        """``search_params`` for a search of ``n_select`` keys: with index ``cluster``, ``scan``
        raised so that at least ``min_scanned`` keys are scanned; ``with_defaults`` adds the
        index's defaults for the settings not given."""
        params = dict(self.search_params)
        if self.index == "cluster":
            scan = params.get("scan", ClusterIndex.search_params["scan"])
            params["scan"] = max(scan, self.min_scanned / n_select)
            if with_defaults:
                params = {**ClusterIndex.search_params, **params}
        return params

    # --- the estimate of the rest --------------------------------------------------------------
    def _valid_rows(self, layer, first_row, n_rows):
        batch = layer.store.keys.shape[0]
        if layer.store_padding is None:
            return torch.ones(batch, n_rows, dtype=torch.bool)
        pad = layer.store_padding[:, first_row:first_row + n_rows].cpu()
        if pad.shape[1] < n_rows:  # rows spilled after the last padding update are real tokens
            pad = torch.cat([pad, torch.ones(batch, n_rows - pad.shape[1], dtype=torch.bool)], dim=1)
        return pad

    @staticmethod
    def _assign(keys, centroids, half_norms=None):
        # nearest centroid in L2: argmin |k|^2 - 2 k.c + |c|^2 = argmax k.c - |c|^2 / 2
        if half_norms is None:
            half_norms = 0.5 * centroids.square().sum(-1)
        return (keys @ centroids.transpose(-1, -2) - half_norms.unsqueeze(-2)).argmax(-1)

    @staticmethod
    def _accumulate(est, assign, values, valid):
        """Adds rows to their clusters' counts and value sums; ``valid`` [batch, rows] (None: all rows)."""
        if valid is None:
            valid = torch.ones(assign.shape[0], assign.shape[-1], dtype=torch.bool, device=assign.device)
        weight = valid[:, None, :].expand_as(assign).float()
        est.counts.scatter_add_(2, assign, weight)
        est.value_sums.scatter_add_(2, assign.unsqueeze(-1).expand_as(values), values * weight.unsqueeze(-1))

    def _cluster_heads(self, keys, indexes):
        """Segment-wise clusters of every (batch row, kv head): ``(centroids [B, Hkv, C, D],
        assign [B, Hkv, rows])``, heads padded to the largest C with far-away centroids that no key
        is assigned to (their count stays 0, so the estimate gives them no weight)."""
        batch, kv_heads, rows, head_dim = keys.shape
        # at most max_clusters per head: a step's estimate costs O(clusters * head_dim)
        cluster_size = max(self.cluster_size, -(-rows // self.max_clusters))
        reuse = self.index == "cluster" and self.index_params.get("cluster_size", 16) == cluster_size
        cents, assigns = [], []
        for b in range(batch):
            for h in range(kv_heads):
                index = indexes[b].heads[h] if reuse and indexes[b] is not None else None
                if index is None or index.size != rows:
                    index = ClusterIndex(head_dim, cluster_size=cluster_size).build(keys[b, h].contiguous())
                c, a = index.centroids(), index.assignments()
                if c.shape[0] == 0:  # too few keys to cluster: every key is its own centroid
                    c, a = keys[b, h].clone(), torch.arange(rows)
                tail = a < 0
                if tail.any():  # keys of a partial last segment: nearest centroid
                    a = a.clone()
                    a[tail] = self._assign(keys[b, h][tail], c)
                cents.append(c)
                assigns.append(a)
        width = max(c.shape[0] for c in cents)
        far = torch.zeros(head_dim)
        far[0] = 1e6
        centroids = torch.stack([torch.cat([c, far.expand(width - c.shape[0], head_dim)]) for c in cents])
        return (centroids.reshape(batch, kv_heads, width, head_dim),
                torch.stack(assigns).reshape(batch, kv_heads, rows))

    def _build_estimate(self, layer, indexes=None, iterations: int = 8):
        keys = layer.store.keys.float()
        batch, kv_heads, rows, head_dim = keys.shape
        if self.clusters == "auto":
            centroids, assign = self._cluster_heads(keys, indexes or [None] * batch)
            est = _Estimate(centroids, torch.zeros(centroids.shape[:3]), torch.zeros_like(centroids), assign)
            self._accumulate(est, assign, layer.store.values.float(), self._valid_rows(layer, 0, rows))
            return est
        n_clusters = min(self.clusters, rows)
        pick = torch.randperm(rows)[:n_clusters]
        centroids = keys[:, :, pick].clone()
        for _ in range(iterations):  # Lloyd iterations, all heads at once
            assign = self._assign(keys, centroids)
            sums = torch.zeros_like(centroids).scatter_add_(2, assign.unsqueeze(-1).expand_as(keys), keys)
            counts = torch.zeros(batch, kv_heads, n_clusters).scatter_add_(2, assign, torch.ones_like(assign, dtype=torch.float32))
            centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp(min=1).unsqueeze(-1), centroids)
        assign = self._assign(keys, centroids)
        est = _Estimate(centroids, torch.zeros(batch, kv_heads, n_clusters), torch.zeros_like(centroids), assign)
        self._accumulate(est, assign, layer.store.values.float(), self._valid_rows(layer, 0, rows))
        return est

    def estimate(self, state, layer, q, indices, scale):
        """The non-retrieved keys as one partial state: per cluster c, ``rest_c = count_c - retrieved``
        keys at the centroid, with the mean value of those keys. Computed as (all clusters) minus
        (the retrieved rows, each at its cluster's weight), so a step costs O(clusters * head_dim)
        with no [clusters, head_dim] temporaries:
        ``num = sum_c e^{s_c} (vsum_c - sum_{j in c, retrieved} v_j)``,
        ``den = sum_c e^{s_c} (count_c - #{j in c, retrieved})``, ``s_c = scale * q . centroid_c``;
        out = num / den, lse = log den. A rest below 1e-6 of the clusters' total weight (everything
        retrieved, up to rounding) gives lse = -inf and a zero output."""
        return self._estimate(state, layer, q, indices, scale, lse_only=False)

    def _estimate(self, state, layer, q, indices, scale, lse_only):
        """:meth:`estimate`; with ``lse_only`` just the rest's lse ``[batch, q_heads]`` (no values read)."""
        est = state.estimate
        if est is None:
            return None
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        values = layer.store.values
        if (values.dtype == torch.float32 and values.device.type == "cpu" and q.device.type == "cpu"
                and extension_available()):  # the same computation in C++ (lckv/centroid_estimate.h)
            out, lse = compiled("centroid_estimate").centroid_estimate(
                q.float().contiguous(), est.centroids, est.counts, est.value_sums, est.assign, values,
                indices.contiguous(), float(scale), lse_only)
            return lse if lse_only else (out.to(q.dtype), lse)
        out, lse = self._estimate_torch(est, values, q, indices, scale)
        return lse if lse_only else (out, lse)

    @staticmethod
    def _estimate_torch(est, values, q, indices, scale):
        """The estimate in torch ops (any dtype or device; the C++ path's reference). Like the C++
        kernel it takes ``indices`` as a set: a row listed twice is retrieved once."""
        indices = distinct_rows(indices)
        batch, q_heads, head_dim = q.shape
        kv_heads = est.centroids.shape[1]
        group = q_heads // kv_heads
        qf = q.float().reshape(batch, kv_heads, group, head_dim)
        s = (qf @ est.centroids.transpose(-1, -2)) * scale  # [B, Hkv, G, C]
        s = s.masked_fill((est.counts <= 0).unsqueeze(2), float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.exp(s - m)  # 0 for empty clusters
        total = (w @ est.counts.unsqueeze(-1)).squeeze(-1)  # [B, Hkv, G]
        num = w @ est.value_sums  # [B, Hkv, G, D]
        valid = indices >= 0
        safe = indices.clamp(min=0)
        clusters = torch.gather(est.assign, 2, safe)  # [B, Hkv, n]
        w_rows = torch.gather(w, 3, clusters.unsqueeze(2).expand(-1, -1, group, -1)) * valid.unsqueeze(2)
        got_values = torch.gather(values, 2, safe.unsqueeze(-1).expand(-1, -1, -1, head_dim)).float()
        den = total - w_rows.sum(-1)
        num = num - w_rows @ got_values
        keep = den > 1e-6 * total
        den = torch.where(keep, den, torch.ones_like(den))
        lse = torch.where(keep, torch.log(den) + m.squeeze(-1), torch.full_like(den, float("-inf")))
        out = torch.where(keep.unsqueeze(-1), num / den.unsqueeze(-1), torch.zeros_like(num))
        return out.reshape(batch, q_heads, head_dim).to(q.dtype), lse.reshape(batch, q_heads)
