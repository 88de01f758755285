"""Reference of the retrieval policy's fused CPU decode step and offload (lckv/decode_step.h):
the same computation composed of the separate ops, so the one-call kernels can be checked against
it. The index searches are the indexes' own (:func:`lckv.index.search_groups`)."""
from __future__ import annotations

import torch

from lckv.reference.attention import attention_with_lse, merge_states_unchecked, sparse_attention_with_lse
from lckv.reference.estimate import centroid_estimate, estimate_add_rows

__all__ = ["decode_cluster_step", "offload_rows"]


def decode_cluster_step(indexes, q, keys, values, resident_k, resident_v, n_select: int, scale: float,
                        estimate=None, search: dict | None = None):
    """One decode step of ``retrieval`` with ``index="cluster"``: per (batch row, kv head) the group
    search of ``n_select`` rows in ``indexes[b * H + h]`` (ClusterIndex), sparse attention over them,
    the estimate of the rest (``estimate = (centroids, counts, value_sums, assign)`` or None) and
    attention over the resident rows, merged by LSE; ``search``: ClusterIndex search settings
    (None: its defaults). ``q [B, Hq, D]``; ``keys``/``values [B, H,
    rows, D]``; ``resident_k``/``resident_v [B, H, r, D]``. Returns ``(out [B, Hq, D] float32,
    lse [B, Hq], indices [B, H, n_select])``."""
    from lckv.index import search_groups

    batch, q_heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    qf = q.float()
    per_head = qf.reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
    indices = torch.stack([search_groups(indexes[b * kv_heads:(b + 1) * kv_heads], per_head[b].contiguous(), n_select,
                                         scale, False, **(search or {}))[1] for b in range(batch)])
    out, lse = sparse_attention_with_lse(qf, keys.float(), values.float(), indices, scale)
    if estimate is not None:
        centroids, counts, value_sums, assign = estimate
        rest = centroid_estimate(qf, centroids, counts, value_sums, assign, values, indices, scale)
        out, lse = merge_states_unchecked(out, lse, *rest)
    res_out, res_lse = attention_with_lse(qf.unsqueeze(2), resident_k.float(), resident_v.float(), scale=scale)
    out, lse = merge_states_unchecked(out, lse, res_out[:, :, 0], res_lse[:, :, 0])
    return out, lse, indices


def offload_rows(indexes, keys, values, valid=None, estimate=None):
    """Rows ``keys``/``values [B, H, n, D]`` join ``indexes[b * H + h]`` (may be empty) and, with
    ``estimate = (centroids, half_norms, counts, value_sums)``, the estimate's clusters (``valid
    [B, n]`` or None); returns their clusters ``[B, H, n]`` int64, or None without an estimate."""
    batch, kv_heads = keys.shape[:2]
    for t, index in enumerate(indexes):
        index.add(keys[t // kv_heads, t % kv_heads].float().contiguous())
    if estimate is None:
        return None
    return estimate_add_rows(keys, values, valid, *estimate)
