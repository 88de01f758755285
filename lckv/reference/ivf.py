"""Pure PyTorch oracle of an IVF (cluster) search over keys in device memory: score each query head
against its kv head's list centroids, scan the keys of the ``nprobe`` best lists exactly, keep the
``top_k``. The layout (:func:`ivf_layout`) groups a kv head's keys by list, as the GPU scan reads
them (csrc/cuda/topk_scan.cu)."""
from __future__ import annotations

import torch

from lckv.checks import _check_gqa, check_data, check_finite, check_same_device, check_tensor

__all__ = ["ivf_layout", "ivf_topk_scores"]


def ivf_layout(keys, assign, n_lists: int):
    """Groups the keys of each (batch row, kv head) by list.

    keys ``[batch, kv_heads, n, head_dim]``, assign ``[batch, kv_heads, n]`` int64 list ids in
    ``[0, n_lists)``. Returns ``(list_keys, list_offsets, list_rows)``: the keys reordered so that
    list ``l`` holds positions ``list_offsets[..., l] .. list_offsets[..., l + 1]`` (rows in their
    original order within a list), ``[batch, kv_heads, n_lists + 1]`` int64 offsets, and the
    original row of every position ``[batch, kv_heads, n]`` int64.
    """
    check_tensor(keys, "keys", 4, "[batch, kv_heads, n, head_dim]")
    check_tensor(assign, "assign", 3, "[batch, kv_heads, n]", dtypes=(torch.int64,))
    if isinstance(n_lists, bool) or not isinstance(n_lists, int) or n_lists < 1:
        raise ValueError(f"n_lists must be a positive int, got {n_lists!r}")
    if assign.shape != keys.shape[:3]:
        raise ValueError(f"assign must have shape {tuple(keys.shape[:3])} like keys, got {tuple(assign.shape)}")
    if assign.numel() and (int(assign.min()) < 0 or int(assign.max()) >= n_lists):
        raise ValueError(f"assign must hold list ids in [0, n_lists = {n_lists}), got [{int(assign.min())}, "
                         f"{int(assign.max())}]")
    order = torch.sort(assign, dim=-1, stable=True).indices
    list_keys = torch.gather(keys, 2, order[..., None].expand(-1, -1, -1, keys.shape[3]))
    counts = torch.zeros(*assign.shape[:2], n_lists, dtype=torch.int64, device=assign.device)
    counts.scatter_add_(2, assign, torch.ones_like(assign))
    offsets = torch.cat([counts.new_zeros(*assign.shape[:2], 1), counts.cumsum(-1)], dim=-1)
    return list_keys, offsets, order


def check_ivf_inputs(q, centroids, list_keys, list_offsets, list_rows, nprobe, top_k):
    check_tensor(q, "q", 3, "[batch, q_heads, head_dim]")
    check_tensor(centroids, "centroids", 4, "[batch, kv_heads, n_lists, head_dim]")
    check_tensor(list_keys, "list_keys", 4, "[batch, kv_heads, n, head_dim]")
    check_tensor(list_offsets, "list_offsets", 3, "[batch, kv_heads, n_lists + 1]", dtypes=(torch.int64,))
    check_tensor(list_rows, "list_rows", 3, "[batch, kv_heads, n]", dtypes=(torch.int64,))
    check_same_device({"q": q, "centroids": centroids, "list_keys": list_keys, "list_offsets": list_offsets,
                       "list_rows": list_rows})
    batch, kv_heads, n_lists, head_dim = centroids.shape
    if q.shape[0] != batch or q.shape[2] != head_dim or list_keys.shape[0] != batch or list_keys.shape[1] != kv_heads \
            or list_keys.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)}, centroids {tuple(centroids.shape)} and list_keys {tuple(list_keys.shape)} "
                         "must agree on batch, kv_heads and head_dim")
    _check_gqa(q.shape[1], kv_heads)
    if list_offsets.shape != (batch, kv_heads, n_lists + 1) or list_rows.shape != list_keys.shape[:3]:
        raise ValueError(f"list_offsets must be {(batch, kv_heads, n_lists + 1)} and list_rows "
                         f"{tuple(list_keys.shape[:3])}, got {tuple(list_offsets.shape)} and {tuple(list_rows.shape)}")
    n = list_keys.shape[2]
    check_data(list_offsets, "list_offsets")
    steps = list_offsets.diff(dim=-1)
    if bool((list_offsets[..., 0] != 0).any()) or bool((list_offsets[..., -1] != n).any()) or bool((steps < 0).any()):
        raise ValueError(f"list_offsets must rise from 0 to n = {n} along each (batch, kv head) (ivf_layout makes them)")
    if isinstance(nprobe, bool) or not isinstance(nprobe, int) or not 1 <= nprobe <= n_lists:
        raise ValueError(f"nprobe must be an int in [1, n_lists = {n_lists}], got {nprobe!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    for name, t in (("q", q), ("centroids", centroids), ("list_keys", list_keys)):
        check_finite(t, name)


def ivf_topk_scores(q, centroids, list_keys, list_offsets, list_rows, nprobe: int, top_k: int):
    """The ``top_k`` keys by inner product among the ``nprobe`` lists whose centroids score best.

    q ``[batch, q_heads, head_dim]`` (query head ``h`` searches kv head ``h // group``);
    centroids ``[batch, kv_heads, n_lists, head_dim]``; ``list_keys``, ``list_offsets``,
    ``list_rows`` from :func:`ivf_layout`; ``1 <= nprobe <= n_lists``, ``top_k >= 1``.
    Returns ``(scores float32, rows int64)``, each ``[batch, q_heads, top_k]``, best first, rows in
    the original numbering; ``-inf`` / ``-1`` past the probed lists' keys.
    """
    check_ivf_inputs(q, centroids, list_keys, list_offsets, list_rows, nprobe, top_k)
    batch, q_heads, head_dim = q.shape
    kv_heads = centroids.shape[1]
    group = q_heads // kv_heads
    scores = torch.full((batch, q_heads, top_k), float("-inf"), device=q.device)
    rows = torch.full((batch, q_heads, top_k), -1, dtype=torch.int64, device=q.device)
    for b in range(batch):
        for h in range(q_heads):
            kv = h // group
            query = q[b, h].float()
            probes = torch.topk(centroids[b, kv].float() @ query, nprobe).indices
            positions = torch.cat([torch.arange(int(list_offsets[b, kv, lst]), int(list_offsets[b, kv, lst + 1]),
                                                device=q.device) for lst in probes.tolist()])
            if positions.numel() == 0:
                continue
            found = list_keys[b, kv, positions].float() @ query
            best = torch.topk(found, min(top_k, found.numel()))
            scores[b, h, :best.values.numel()] = best.values
            rows[b, h, :best.values.numel()] = list_rows[b, kv, positions[best.indices]]
    return scores, rows
