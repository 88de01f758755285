"""The ``retrieval`` policy's estimate of the offloaded keys it does not retrieve (RetroInfer-style).

Diffuse heads spread attention so widely that no top-k captures it. The offloaded keys of each
(batch row, kv head) are clustered, with per-cluster counts and value sums; the keys a step does
not retrieve are then estimated as ``count * exp(q . centroid)`` with the cluster's mean value, a
third partial state merged by LSE (math: :mod:`lckv.reference.estimate`; kernels:
:func:`lckv.ops.centroid_estimate`, :func:`lckv.ops.estimate_add_rows`).
"""
from __future__ import annotations

import torch

from lckv.layer_view import LayerView
from lckv.ops import centroid_estimate, estimate_add_rows, kmeans
from lckv.reference.estimate import centroid_estimate_blocks

__all__ = ["ClusterEstimate"]

#: upper bound on the query x cluster weights of one batch of blocks in :meth:`ClusterEstimate.attend_blocks`
#: (float32: 128 MiB, the engine's score block bound)
BLOCK_ELEMENTS = 1 << 25


class ClusterEstimate:
    """Per-cluster state of the estimate. ``assign`` grows by doubling its buffer, so the one row
    a decode step offloads costs O(1), not a copy of every row's cluster id."""

    def __init__(self, centroids: torch.Tensor, assign: torch.Tensor, view: LayerView):
        self.centroids = centroids  # [batch, kv_heads, clusters, head_dim] float32
        self.counts = torch.zeros(centroids.shape[:3])  # [batch, kv_heads, clusters] (non-pad rows)
        self.value_sums = torch.zeros_like(centroids)  # [batch, kv_heads, clusters, head_dim]
        self.half_norms = 0.5 * centroids.square().sum(-1)  # for assignments
        self._assign = assign  # [batch, kv_heads, capacity] int64 buffer
        self.rows = assign.shape[-1]
        weight = view.valid_rows(0, self.rows)[:, None, :].expand_as(assign).float()
        self.counts.scatter_add_(2, assign, weight)
        values = view.values[:, :, :self.rows].float()
        self.value_sums.scatter_add_(2, assign.unsqueeze(-1).expand_as(values), values * weight.unsqueeze(-1))

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_segments(cls, view: LayerView, cluster_size: int, max_clusters: int, index_heads=None) -> "ClusterEstimate":
        """Segment-wise clusters of about ``cluster_size`` keys (the :class:`~lckv.index.ClusterIndex`
        clustering), at most ``max_clusters`` per head (beyond, clusters grow). ``index_heads``
        (batch-major, or None) are ClusterIndex heads to reuse when their clusters are the same size."""
        from lckv.index import ClusterIndex

        keys = view.keys.float()
        batch, kv_heads, rows, head_dim = keys.shape
        cluster_size = max(cluster_size, -(-rows // max_clusters))
        cents, assigns = [], []
        for t in range(batch * kv_heads):
            head_keys = keys[t // kv_heads, t % kv_heads]
            index = index_heads[t] if index_heads else None
            if not (isinstance(index, ClusterIndex) and index.config["cluster_size"] == cluster_size and index.size == rows):
                index = ClusterIndex(head_dim, cluster_size=cluster_size).build(head_keys.contiguous())
            c, a = index.centroids(), index.assignments()
            if c.shape[0] == 0:  # too few keys to cluster: every key is its own centroid
                c, a = head_keys.clone(), torch.arange(rows)
            cents.append(c)
            assigns.append(a)
        # keys of a partial last segment (assignment -1, a suffix) join their nearest centroid
        # below, through the same kernel as rows offloaded later
        clustered = min(int((a >= 0).long().cumprod(0).sum()) for a in assigns)
        # heads padded to the largest cluster count with far-away centroids no key is assigned to
        width = max(c.shape[0] for c in cents)
        far = torch.zeros(head_dim)
        far[0] = 1e6
        centroids = torch.stack([torch.cat([c, far.expand(width - c.shape[0], head_dim)]) for c in cents])
        assign = torch.stack([a[:clustered] for a in assigns]).reshape(batch, kv_heads, clustered)
        estimate = cls(centroids.reshape(batch, kv_heads, width, head_dim), assign, view)
        if clustered < rows:
            estimate.add_rows(view, clustered, rows - clustered)
        return estimate

    @classmethod
    def from_kmeans(cls, view: LayerView, n_clusters: int, iterations: int = 8) -> "ClusterEstimate":
        """``n_clusters`` k-means centroids per head (:func:`lckv.ops.kmeans` from a random sample
        of the rows, the same positions in every head)."""
        keys = view.keys.float()
        batch, kv_heads, rows, head_dim = keys.shape
        init = torch.randperm(rows)[:min(n_clusters, rows)]
        centroids, assign = kmeans(keys.reshape(batch * kv_heads, rows, head_dim), init, iterations)
        return cls(centroids.reshape(batch, kv_heads, -1, head_dim), assign.reshape(batch, kv_heads, rows), view)

    # --- state ----------------------------------------------------------------------------------
    @property
    def assign(self) -> torch.Tensor:
        """``[batch, kv_heads, rows]`` int64: the cluster of each offloaded row."""
        return self._assign[..., :self.rows]

    def append(self, assign: torch.Tensor) -> None:
        """Records the clusters of rows that joined (their counts and sums are already added)."""
        n = assign.shape[-1]
        if self.rows + n > self._assign.shape[-1]:
            grown = self._assign.new_empty(*self._assign.shape[:2], max(2 * self._assign.shape[-1], self.rows + n))
            grown[..., :self.rows] = self._assign[..., :self.rows]
            self._assign = grown
        self._assign[..., self.rows:self.rows + n] = assign
        self.rows += n

    def add_state(self) -> tuple:
        """``(centroids, half_norms, counts, value_sums)``, what rows joining the clusters update."""
        return self.centroids, self.half_norms, self.counts, self.value_sums

    def step_state(self) -> tuple:
        """``(centroids, counts, value_sums, assign)``, what a step's estimate reads."""
        return self.centroids, self.counts, self.value_sums, self.assign

    # --- operations -----------------------------------------------------------------------------
    def add_rows(self, view: LayerView, first_row: int, n_rows: int) -> None:
        """Offloaded rows ``[first_row, first_row + n_rows)`` join their nearest clusters."""
        keys = view.keys[:, :, first_row:first_row + n_rows]
        values = view.values[:, :, first_row:first_row + n_rows]
        valid = None if view.padding is None else view.valid_rows(first_row, n_rows)
        self.append(estimate_add_rows(keys, values, valid, *self.add_state()))

    def attend(self, view: LayerView, q: torch.Tensor, indices: torch.Tensor, scale: float, lse_only: bool = False):
        """The partial state of the rows not in ``indices``: ``(out, lse)``, or ``lse`` alone."""
        return centroid_estimate(q, *self.step_state()[:3], self.assign, view.values, indices, scale, lse_only)

    def attend_blocks(self, view: LayerView, q: torch.Tensor, indices: torch.Tensor, scale: float):
        """:meth:`attend` for blocks of queries ``[batch, q_heads, m, block, head_dim]`` that share
        their rows ``indices`` ``[batch, kv_heads, m, n]`` (a retrieval prefill); torch matmuls
        (:func:`lckv.reference.estimate.centroid_estimate_blocks`), float32 out."""
        batch, q_heads, m, block, _ = q.shape
        per_batch = max(1, BLOCK_ELEMENTS // max(1, batch * q_heads * block * self.centroids.shape[2]))
        parts = [centroid_estimate_blocks(q[:, :, lo:lo + per_batch], *self.step_state()[:3], self.assign,
                                          view.values, indices[:, :, lo:lo + per_batch], scale)
                 for lo in range(0, m, per_batch)]
        return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)
