"""Reference of the retrieval policy's estimate of the keys it does not retrieve (RetroInfer-style).

The offloaded keys of each (batch row, kv head) are grouped in clusters with a centroid, a count
of real (non-pad) rows and the sum of their values; ``assign`` gives each row's cluster. The rows a
step does not retrieve are estimated cluster by cluster as ``rest_c`` keys at the centroid with
the cluster's mean value. Computed as (all clusters) minus (the retrieved rows):

    num = sum_c e^{s_c} (vsum_c - sum_{j in c, retrieved} v_j)
    den = sum_c e^{s_c} (count_c - #{j in c, retrieved}),    s_c = scale * q . centroid_c

``out = num / den``, ``lse = log den``; a rest below 1e-6 of the clusters' total weight (everything
retrieved, up to rounding) gives ``lse = -inf`` and a zero output. These torch functions run on any
dtype and device; :mod:`lckv.ops.estimate` dispatches to the C++ kernels (lckv/centroid_estimate.h).
"""
from __future__ import annotations

import torch

from lckv.reference.group_rank import distinct_rows

__all__ = ["assign_nearest", "estimate_add_rows", "centroid_estimate", "centroid_estimate_blocks"]


def assign_nearest(keys: torch.Tensor, centroids: torch.Tensor, half_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest centroid in L2 of each key: ``argmax_c k . c - |c|^2 / 2`` (``keys [..., n, D]``,
    ``centroids [..., C, D]`` -> int64 ``[..., n]``)."""
    if half_norms is None:
        half_norms = 0.5 * centroids.square().sum(-1)
    return (keys @ centroids.transpose(-1, -2) - half_norms.unsqueeze(-2)).argmax(-1)


def estimate_add_rows(keys, values, valid, centroids, half_norms, counts, value_sums) -> torch.Tensor:
    """New rows ``keys``/``values`` ``[B, H, n, D]`` join their nearest clusters: ``counts``
    ``[B, H, C]`` and ``value_sums`` ``[B, H, C, D]`` grow in place by the rows that ``valid``
    ``[B, n]`` marks real (None: all). Returns the rows' clusters ``[B, H, n]`` int64."""
    assign = assign_nearest(keys.float(), centroids, half_norms)
    if valid is None:
        valid = torch.ones(assign.shape[0], assign.shape[-1], dtype=torch.bool, device=assign.device)
    weight = valid[:, None, :].expand_as(assign).float()
    counts.scatter_add_(2, assign, weight)
    value_sums.scatter_add_(2, assign.unsqueeze(-1).expand(*assign.shape, values.shape[-1]),
                            values.float() * weight.unsqueeze(-1))
    return assign


def centroid_estimate(q, centroids, counts, value_sums, assign, values, indices, scale, lse_only: bool = False):
    """The estimate of the rows *not* in ``indices`` (the module docstring's formula).

    ``q [B, Hq, D]``, ``centroids``/``value_sums [B, H, C, D]``, ``counts [B, H, C]``, ``assign
    [B, H, rows]``, ``values [B, H, rows, D]``, ``indices [B, H, n]`` (row ids, -1 = none, a repeat
    counts once). Returns ``(out [B, Hq, D] in q's dtype, lse [B, Hq] float32)``, or just ``lse``
    with ``lse_only``.
    """
    indices = distinct_rows(indices)
    batch, q_heads, head_dim = q.shape
    kv_heads = centroids.shape[1]
    group = q_heads // kv_heads
    qf = q.float().reshape(batch, kv_heads, group, head_dim)
    w, top = _cluster_weights(qf, centroids, counts, scale)  # [B, H, G, C]
    total = (w @ counts.unsqueeze(-1)).squeeze(-1)  # [B, H, G]
    num = w @ value_sums  # [B, H, G, D]
    valid = indices >= 0
    if values.shape[2] == 0:  # no offloaded rows: every index is -1 (checked), none was retrieved
        indices = indices.new_zeros(batch, kv_heads, 0)
        valid, assign, values = valid[:, :, :0], assign.new_zeros(batch, kv_heads, 1), values.new_zeros(batch, kv_heads, 1, head_dim)
    safe = indices.clamp(min=0)
    clusters = torch.gather(assign, 2, safe)  # [B, H, n]
    w_rows = torch.gather(w, 3, clusters.unsqueeze(2).expand(-1, -1, group, -1)) * valid.unsqueeze(2)
    got_values = torch.gather(values, 2, safe.unsqueeze(-1).expand(-1, -1, -1, head_dim)).float()
    out, lse = _rest_state(num - w_rows @ got_values, total - w_rows.sum(-1), total, top)
    lse = lse.reshape(batch, q_heads)
    if lse_only:
        return lse
    return out.reshape(batch, q_heads, head_dim).to(q.dtype), lse


def centroid_estimate_blocks(q, centroids, counts, value_sums, assign, values, indices, scale):
    """:func:`centroid_estimate` for blocks of queries that share their retrieved rows (a
    retrieval prefill): ``q [B, Hq, m, block, D]``, ``indices [B, H, m, n]`` (block ``j``'s rows,
    -1 = none, a repeat counts once), the cluster state as in :func:`centroid_estimate`. Returns
    ``(out [B, Hq, m, block, D] float32, lse [B, Hq, m, block] float32)``.

    Per block the retrieved rows are taken out of their clusters first (counts and value sums
    less the retrieved ones), so each query costs O(clusters * D) whatever ``n``."""
    indices = distinct_rows(indices)
    batch, q_heads, m, block, head_dim = q.shape
    kv_heads, n_clusters = centroids.shape[1], centroids.shape[2]
    group = q_heads // kv_heads
    qf = (q.float().reshape(batch, kv_heads, group, m, block, head_dim).transpose(2, 3)
          .reshape(batch, kv_heads, m, group * block, head_dim))
    w, top = _cluster_weights(qf, centroids.unsqueeze(2), counts.unsqueeze(2), scale)  # [B, H, m, G*block, C]
    valid = indices >= 0
    safe = indices.clamp(min=0)
    clusters = torch.gather(assign.unsqueeze(2).expand(-1, -1, m, -1), 3, safe)  # [B, H, m, n]
    got = torch.zeros(batch, kv_heads, m, n_clusters).scatter_add_(3, clusters, valid.float())
    rows = torch.gather(values.unsqueeze(2).expand(-1, -1, m, -1, -1), 3,
                        safe.unsqueeze(-1).expand(-1, -1, -1, -1, head_dim)).float() * valid.unsqueeze(-1)
    got_sums = torch.zeros(batch, kv_heads, m, n_clusters, head_dim).scatter_add_(
        3, clusters.unsqueeze(-1).expand(-1, -1, -1, -1, head_dim), rows)
    total = (w @ counts[:, :, None, :, None]).squeeze(-1)  # [B, H, m, G*block]
    den = (w @ (counts.unsqueeze(2) - got).unsqueeze(-1)).squeeze(-1)
    num = w @ (value_sums.unsqueeze(2) - got_sums)  # [B, H, m, G*block, D]
    out, lse = _rest_state(num, den, total, top)
    out = out.reshape(batch, kv_heads, m, group, block, head_dim).transpose(2, 3)
    lse = lse.reshape(batch, kv_heads, m, group, block).transpose(2, 3)
    return out.reshape(batch, q_heads, m, block, head_dim), lse.reshape(batch, q_heads, m, block)


def _cluster_weights(qf, centroids, counts, scale):
    """``exp(scale * q . c - top)`` of queries ``qf [..., Q, D]`` and clusters ``centroids [...,
    C, D]`` (0 for clusters with ``counts [..., C]`` <= 0), and the shift ``top [..., Q, 1]``."""
    s = (qf @ centroids.transpose(-1, -2)) * scale
    s = s.masked_fill((counts <= 0).unsqueeze(-2), float("-inf"))
    top = s.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return torch.exp(s - top), top


def _rest_state(num, den, total, top):
    """``(out, lse)`` of the rest from its weighted value sum ``num [..., D]`` and weight ``den``
    (``total``: every cluster's weight; ``top``: the weights' shift): a rest below 1e-6 of the
    total (everything retrieved, up to rounding) is empty, ``lse = -inf`` and ``out = 0``."""
    keep = den > 1e-6 * total
    den = torch.where(keep, den, torch.ones_like(den))
    lse = torch.where(keep, torch.log(den) + top.squeeze(-1), torch.full_like(den, float("-inf")))
    out = torch.where(keep.unsqueeze(-1), num / den.unsqueeze(-1), torch.zeros_like(num))
    return out, lse
