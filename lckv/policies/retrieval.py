"""RetrievalAttention: per-head vector-index retrieval of the offloaded keys (Liu et al., 2024),
with a RetroInfer-style estimate of the keys it does not retrieve.

The policy is the configuration and the four hooks; the jobs live beside it: index wiring
(:mod:`lckv.policies.retrieval_index`), GQA ranking (:mod:`lckv.policies.group_rank`), the estimate
(:mod:`lckv.policies.estimate`), the kernels (:mod:`lckv.ops`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lckv.layer_view import LayerView
from lckv.ops import decode_cluster_step, flat_topk_scores, offload_rows
from lckv.policies.base import PolicyConfigError, register_policy
from lckv.policies.estimate import ClusterEstimate
from lckv.policies.group_rank import group_sum, top_by_group_probability
from lckv.policies.retrieval_index import (INDEX_KINDS, build_indexes, check_index_settings, index_heads, search_settings,
                                          uses_build_queries)
from lckv.policies.selection import SelectionPolicy, unique_rows

__all__ = ["RetrievalPolicy", "INDEX_KINDS"]


@dataclass
class _RetrievalState:
    indexes: list  # one lckv.index.LayerIndex per batch row (None for kind "exact")
    estimate: ClusterEstimate | None
    estimate_rows: int = 0  # offloaded rows when the estimate was built

    @property
    def heads(self) -> list:
        """Every head's index, batch-major."""
        return index_heads(self.indexes)


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
    queries (only query-aware indexes, ``uses_build_queries``, get them: for the others no prefill
    query is recorded or kept); tokens spilling from the window later are inserted as decoding
    goes on.

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

    ``prefill_estimate`` (with ``prefill="retrieval"`` and ``estimate_rest``): each prefill query
    also gets the estimate of the store rows its block did not attend. Off by default: it costs
    O(chunk * clusters * head_dim) per layer and chunk (by operation count at 128K tokens, 8,192
    clusters per head, about what the selected attention costs) for little gain on a real model
    (Qwen at 8K: next-token KL vs exact prefill 0.073 with it, 0.075 without; docs/prefill.md).

    ``prefill_per_query`` (with ``prefill="retrieval"``): each prefill query also picks its own
    top ``prefill_per_query`` store rows per kv head, by its group's summed query (each query
    head's own, ``prefill_per_query`` rows each, with ``prefill_per_head``; ignored at 0), searched
    over a pool of ``prefill_query_scan`` keys (scored exactly where the block's rows are), and its
    block attends the union of those and its mean query's ``prefill_select`` rows, each row once.
    A block's mean query misses the sharp keys single queries look for (a needle, the earlier
    assignment of a variable): on Qwen at 8K, 16 rows per query cut the next-token KL vs exact
    prefill from 0.075 to 0.0096 for 18% more prefill time (docs/prefill.md).

    The prefill defaults (4 rows per query head, and the prompt's last 256 positions exact:
    ``prefill_exact_tail`` of :class:`SelectionPolicy`) are the settings that equal exact prefill
    on the accuracy harness at 32K on Qwen2.5-0.5B; with blocks alone (``prefill_per_query=0,
    prefill_exact_tail=0``) the prefill is about 20% faster at 128K and loses needles and
    variable bindings at 32K (docs/prefill.md).

    ``prefill_query_probe`` (index ``cluster``): a per-query search opens only its best
    ``prefill_query_probe`` super-clusters by mean score (the index's ``probe_supers``; every
    64K keys form 64 of them) beside the newest, loose clusters, instead of every super whose bound
    could hold a better cluster: the search's cost then barely grows with the context. Below 64K
    offloaded keys per head there are no super-clusters and nothing changes. On stories260K's keys
    at 1M tokens, 32 supers find the true top-4 keys as often as the exact rule (recall@4 0.34-0.37
    vs 0.36) in a quarter of its time; 0 restores the exact rule (docs/prefill.md).

    ``prefill_query_share`` (in (0, 1], default 1): only that share of each block's per-query
    searches run, those whose query has the lowest cosine with the block's mean query (the query
    head's own mean with ``prefill_per_head``, else the group's summed means): the queries the
    block's selection serves worst. The others add no rows of their own. At 0.25 the 32K harness
    on Qwen2.5-0.5B loses needles and variable bindings that every search keeps (niah_multivalue
    0.25 vs 0.75, variable_tracking 0.60 vs 0.80; docs/prefill.md): a speed knob, not a default.
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
    prefill_estimate: bool = False
    prefill_per_query: int = 4
    prefill_query_scan: int = 256
    prefill_per_head: bool = True
    prefill_query_probe: int = 32
    prefill_query_share: float = 1.0

    name = "retrieval"

    def validate(self) -> None:
        super().validate()
        check_index_settings(self.index, self.index_params, self.search_params)
        if self.group_rank not in ("probability", "logits"):
            raise PolicyConfigError(f"RetrievalPolicy.group_rank must be 'probability' or 'logits', got {self.group_rank!r}")
        if self.prefill_estimate and not self.estimate_rest:
            raise PolicyConfigError("RetrievalPolicy.prefill_estimate needs estimate_rest=True (it is the same estimate)")
        for name in ("prefill_per_query", "prefill_query_scan", "prefill_query_probe"):  # ints (Policy.validate)
            if getattr(self, name) < 0:
                raise PolicyConfigError(f"RetrievalPolicy.{name} must be >= 0, got {getattr(self, name)}")
        share = self.prefill_query_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share <= 1.0:
            raise PolicyConfigError(f"RetrievalPolicy.prefill_query_share must be a fraction in (0, 1], got {share!r}")
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
        if not (self.build_queries and uses_build_queries(self.index)):
            return None  # the index is built from the keys alone: no query to keep
        return (self.build_queries, 0)

    def search_settings(self, n_select: int) -> dict:
        """The index search settings of a step selecting ``n_select`` keys (``min_scanned`` applied)."""
        return search_settings(self.index, self.search_params, self.min_scanned, n_select)

    # --- build and insert ----------------------------------------------------------------------
    def build(self, view: LayerView) -> _RetrievalState:
        indexes = build_indexes(self.index, self.index_params, view, self.group_rank)
        state = _RetrievalState(indexes, None)
        self._build_estimate(state, view)
        return state

    def _build_estimate(self, state: _RetrievalState, view: LayerView) -> None:
        if not self.estimate_rest:
            return
        if self.clusters == "auto":
            state.estimate = ClusterEstimate.from_segments(view, self.cluster_size, self.max_clusters, state.heads)
        else:
            state.estimate = ClusterEstimate.from_kmeans(view, self.clusters)
        state.estimate_rows = view.length

    def on_offload(self, state, view, first_row, n_rows):
        """New rows join the indexes and the estimate's nearest clusters. When a chunk of rows
        arrives (a ``prefill="retrieval"`` prompt, whose state was built early) and the store has
        doubled since the estimate was built, the estimate is rebuilt over every row -- from the
        index's own clusters where they match -- so its clusters grow with the context at O(1)
        amortised cost per row. Single rows (decoding) never trigger a rebuild: a step stays O(1)."""
        est = state.estimate
        keys = view.keys[:, :, first_row:first_row + n_rows]
        values = view.values[:, :, first_row:first_row + n_rows]
        valid = None if view.padding is None or est is None else view.valid_rows(first_row, n_rows)
        assign = offload_rows(state.heads, keys, values, valid, None if est is None else est.add_state())
        if est is not None:
            est.append(assign)
            if n_rows > 1 and view.length >= 2 * max(1, state.estimate_rows):
                self._build_estimate(state, view)

    # --- selection -----------------------------------------------------------------------------
    def _exact(self, view: LayerView, n_select: int) -> bool:
        return self.index == "exact" or n_select > self.exact_above * view.length

    def select(self, state, view, q, n_select, scale=None):
        keys = view.keys
        kv_heads = keys.shape[1]
        exact = self._exact(view, n_select)
        if self.group_rank == "logits" or q.shape[1] == kv_heads:
            q_sum = group_sum(q, kv_heads)  # [batch, kv_heads, D]
            if exact:
                return flat_topk_scores(q_sum.to(keys.dtype), keys, n_select)[1]
            return self._search_summed(state, q_sum.unsqueeze(2), n_select)[:, :, 0]
        if exact:
            return top_by_group_probability(q, keys, n_select, scale)
        batch, q_heads, head_dim = q.shape
        per_head = q.float().reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
        params = self.search_settings(n_select)
        scale = head_dim ** -0.5 if scale is None else float(scale)
        if self.index == "cluster":  # the whole rule in one C++ pass per kv head (ClusterIndex.search_group)
            return torch.stack([index.search_group(per_head[b].contiguous(), n_select, scale, False, **params)[1]
                                for b, index in enumerate(state.indexes)])
        candidates = torch.stack([index.search(per_head[b].contiguous(), n_select, **params)[1]
                                  for b, index in enumerate(state.indexes)])  # [batch, kv_heads, group, k]
        # repeats across the group's searches are fine: the estimate and the ranking take a set.
        # Each head's probabilities are over all offloaded keys: the candidates exactly, the rest
        # by the centroid estimate when there is one.
        pool = candidates.flatten(2)
        rest_lse = None if state.estimate is None else state.estimate.attend(view, q, pool, scale, lse_only=True)
        return top_by_group_probability(q, keys, n_select, scale, pool, rest_lse)

    def select_blocks(self, state, view, q, n_select, scale=None, queries=None):
        """A retrieval prefill's block queries ``[batch, q_heads, m, head_dim]``: one batched index
        search per batch row for all ``m`` of them, each kv head searching with its group's summed
        query (the ``"logits"`` rule: a block's mean query already averages many queries, and one
        search per block and query head would cost ``group`` times more). Scored exactly where a
        decode step would be (index ``exact``, ``exact_above``).

        With ``prefill_per_query`` and the chunk's ``queries`` ``[batch, q_heads, q_len, head_dim]``,
        each query also searches for its own top rows (:meth:`_per_query_rows`), and a block
        attends the union of its mean query's rows and its queries' own (repeats -1)."""
        batch, q_heads, m, head_dim = q.shape
        kv_heads = view.keys.shape[1]
        exact = self._exact(view, n_select)
        if exact:
            rows = super().select_blocks(state, view, q, n_select, scale)
        else:
            q_sum = q.float().reshape(batch, kv_heads, q_heads // kv_heads, m, head_dim).sum(2)
            rows = self._search_summed(state, q_sum, n_select)
        if not self.prefill_per_query or queries is None:
            return rows
        own = self._per_query_rows(state, view, queries, m, q)
        return unique_rows(torch.cat([rows, own], dim=-1))

    def _per_query_rows(self, state, view, queries: torch.Tensor, m: int, means: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """Each query's own top ``prefill_per_query`` rows per kv head, by its group's summed query
        (by each query head's own with ``prefill_per_head``), searched in the index with a pool of
        ``prefill_query_scan`` keys and no ``min_scanned`` floor (scored exactly only with index
        ``exact``: even where the block's rows are scored exactly, the index's batched search,
        which scans its unclustered tail exactly, costs a fraction of a flat top-k over every row
        for this many queries), gathered per block of ``prefill_block`` queries: ``[batch,
        kv_heads, m, block * picks]``, ``picks`` = ``prefill_per_query`` (times the group with
        ``prefill_per_head``), -1 past the chunk's last query. With ``prefill_query_share < 1``
        only that share of each block's searches run (:meth:`_least_aligned`, against the block
        means ``means`` ``[batch, q_heads, m, head_dim]``); the others' rows are -1."""
        batch, q_heads, q_len, head_dim = queries.shape
        kv_heads = view.keys.shape[1]
        group = q_heads // kv_heads
        k = min(self.prefill_per_query, view.length)
        grouped = queries.float().reshape(batch, kv_heads, group, q_len, head_dim)
        if self.prefill_per_head:  # every head's query on its own: [batch, kv_heads, q_len * group, D]
            q_search = grouped.transpose(2, 3).reshape(batch, kv_heads, q_len * group, head_dim)
        else:
            q_search = grouped.sum(2)
        per_position = q_search.shape[2] // q_len  # searches per position: group or 1
        units = self.prefill_block * per_position  # searches per block
        pad = m * self.prefill_block - q_len
        q_search = torch.nn.functional.pad(q_search, (0, 0, 0, pad * per_position)) if pad else q_search
        chosen = None
        if self.prefill_query_share < 1.0 and means is not None:
            chosen = self._least_aligned(q_search, means, m, per_position, q_len)  # [batch, kv_heads, m, n_sel]
            q_search = q_search.reshape(batch, kv_heads, m, units, head_dim).gather(
                3, chosen.unsqueeze(-1).expand(-1, -1, -1, -1, head_dim)).reshape(batch, kv_heads, -1, head_dim)
        n = q_search.shape[2]
        if not state.indexes or state.indexes[0] is None:
            # every query of a kv head as one "query head" of it: n heads per kv head
            flat = q_search.reshape(batch, kv_heads * n, head_dim).to(view.keys.dtype)
            rows = flat_topk_scores(flat, view.keys, k)[1].view(batch, kv_heads, n, k)
        else:  # the pool floor is prefill_query_scan, not min_scanned
            params = search_settings(self.index, self.search_params, self.prefill_query_scan, k)
            if self.index == "cluster":
                params["probe_supers"] = self.prefill_query_probe
            rows = self._search(state, q_search, k, params)  # [batch, kv_heads, n, k]
        if chosen is not None:  # back to every unit of its block, -1 where none searched
            full = rows.new_full((batch, kv_heads, m, units, k), -1)
            rows = full.scatter_(3, chosen.unsqueeze(-1).expand(-1, -1, -1, -1, k),
                                 rows.reshape(batch, kv_heads, m, -1, k))
        rows = rows.reshape(batch, kv_heads, m * self.prefill_block, per_position * k)
        if pad:  # the padded positions' searches (zero queries) pick nothing
            rows[:, :, q_len:] = -1
        return rows.reshape(batch, kv_heads, m, self.prefill_block * per_position * k)

    def _least_aligned(self, q_search: torch.Tensor, means: torch.Tensor, m: int, per_position: int,
                       q_len: int) -> torch.Tensor:
        """The searches of each block that run with ``prefill_query_share < 1``: of its ``block x
        per_position`` searches (``q_search`` ``[batch, kv_heads, m * block * per_position,
        head_dim]``, position-major, padded past ``q_len``), the ``ceil(share x block x
        per_position)`` whose query has the lowest cosine with its block's mean query (that query
        head's mean, or the group's summed means), whose rows the block selection serves worst:
        their indices in the block, ``[batch, kv_heads, m, n_sel]``. Padded positions come last."""
        batch, kv_heads, _, head_dim = q_search.shape
        units = self.prefill_block * per_position
        grouped = means.float().reshape(batch, kv_heads, -1, m, head_dim)  # [batch, kv_heads, group, m, D]
        ref = grouped.transpose(2, 3) if per_position > 1 else grouped.sum(2, keepdim=True).transpose(2, 3)
        # [batch, kv_heads, m, per_position, D] -> every position of the block
        ref = ref.unsqueeze(3).expand(-1, -1, -1, self.prefill_block, -1, -1)
        shape = (batch, kv_heads, m, units, head_dim)
        cos = torch.nn.functional.cosine_similarity(q_search.reshape(shape), ref.reshape(shape), dim=-1)
        position = torch.arange(m * self.prefill_block, device=cos.device).repeat_interleave(per_position)
        cos = cos.masked_fill((position >= q_len).view(m, units), float("inf"))
        n_sel = max(1, math.ceil(self.prefill_query_share * units))
        return cos.topk(n_sel, dim=-1, largest=False, sorted=False).indices

    def _search_summed(self, state, q_sum: torch.Tensor, n_select: int) -> torch.Tensor:
        """One index search per batch row with each kv head's summed queries ``[batch, kv_heads,
        m, D]``: the top ``n_select`` row ids ``[batch, kv_heads, m, n_select]``."""
        return self._search(state, q_sum, n_select, self.search_settings(n_select))

    @staticmethod
    def _search(state, queries: torch.Tensor, k: int, params: dict) -> torch.Tensor:
        """One index search per batch row with each kv head's queries ``[batch, kv_heads, m, D]``
        and search ``params``: the top ``k`` row ids ``[batch, kv_heads, m, k]``."""
        return torch.stack([index.search(queries[b].contiguous(), k, **params)[1]
                            for b, index in enumerate(state.indexes)])

    def fused_step(self, state, view, q, n_select, scale=None):
        """With ``index="cluster"`` and ``group_rank="probability"`` on the CPU: the step in one call
        per layer (:func:`lckv.ops.decode_cluster_step`, lckv/decode_step.h): per (batch, kv head),
        in one parallel region, the group search, sparse attention over the retrieved rows, the
        estimate of the rest and attention over the resident rows, merged by LSE; what
        :meth:`select`, sparse attention, :meth:`estimate` and the merges compute one by one. The
        queries stay float32 throughout (the separate path rounds them to a 16-bit store's dtype
        for the sparse attention). A 16-bit ``host_dtype`` store under a float32 model is read in
        place beside the float32 resident rows. None where the step has no fused form (another index
        or rule, a step scored exactly by ``exact_above``, a non-CPU store or query, one query head
        per kv head, or resident rows of a third dtype, e.g. a float16 store under a bfloat16
        model). Without the extension no ClusterIndex exists, so the step never gets here."""
        keys = view.keys
        resident = view.resident_keys.dtype
        if (self.index != "cluster" or self.group_rank != "probability" or keys.device.type != "cpu"
                or q.device.type != "cpu" or q.shape[1] == keys.shape[1] or self._exact(view, n_select)
                or resident not in (keys.dtype, torch.float32)):  # the kernel's two resident types
            return None
        heads = state.heads  # ClusterIndex heads: built only where the extension is
        if not heads:
            return None
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        estimate = None if state.estimate is None else state.estimate.step_state()
        return decode_cluster_step(heads, q, keys, view.values, view.resident_keys, view.resident_values, n_select,
                                   scale, estimate, self.search_settings(n_select))

    def estimate(self, state, view, q, indices, scale):
        """The non-retrieved keys as one partial state (:class:`~lckv.policies.estimate.ClusterEstimate`);
        None with ``estimate_rest=False``."""
        if state.estimate is None:
            return None
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return state.estimate.attend(view, q, indices, scale)

    def estimate_blocks(self, state, view, q, indices, scale):
        """With ``prefill_estimate``, the estimate of the rows a retrieval prefill block does not
        attend, per query (:meth:`ClusterEstimate.attend_blocks`); None otherwise."""
        if not self.prefill_estimate or state.estimate is None:
            return None
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return state.estimate.attend_blocks(view, q, indices, scale)
