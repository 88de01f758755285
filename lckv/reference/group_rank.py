"""Reference of the GQA group ranking: the keys with the largest summed attention probability
over a query group, ``sum_h softmax_h(scale * q_h . k)`` (see
:func:`lckv.policies.group_rank.top_by_group_probability`). Torch ops, any dtype and device;
:func:`lckv.ops.rank_by_group_probability` dispatches to the C++ kernel (lckv/group_rank.h)."""
from __future__ import annotations

import torch

__all__ = ["distinct_rows", "rank_by_group_probability"]


def distinct_rows(candidates: torch.Tensor) -> torch.Tensor:
    """``[..., m]`` row ids sorted, with repeats (and -1) as -1: each row once."""
    pool = candidates.sort(dim=-1).values
    repeat = torch.zeros_like(pool, dtype=torch.bool)
    repeat[..., 1:] = pool[..., 1:] == pool[..., :-1]
    return pool.masked_fill(repeat, -1)


def rank_by_group_probability(q, keys, candidates, rest_lse, scale, n_select: int):
    """``q [B, Hq, D]``, ``keys [B, H, n, D]``; ``candidates [B, H, m]`` (row ids, -1 = none,
    repeats allowed) or None (every key competes); ``rest_lse [B, Hq]`` the log of the attention
    mass outside the candidates (None: none). Each head's softmax is over the distinct candidates
    plus the rest; returns int64 ``[B, H, min(n_select, pool)]``, -1 where fewer valid rows exist."""
    batch, q_heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale  # None: the attention default
    qh = q.float().reshape(batch, kv_heads, q_heads // kv_heads, head_dim)
    if candidates is None:
        logits = torch.einsum("bhgd,bhnd->bhgn", qh, keys.float())
        pool = None
    else:
        pool = distinct_rows(candidates)
        b_idx = torch.arange(batch, device=keys.device)[:, None, None]
        h_idx = torch.arange(kv_heads, device=keys.device)[None, :, None]
        rows = keys[b_idx, h_idx, pool.clamp(min=0)]  # [batch, kv_heads, m, D]: the candidates' keys
        logits = torch.einsum("bhgd,bhmd->bhgm", qh, rows.float())
        logits = logits.masked_fill((pool < 0).unsqueeze(2), float("-inf"))
    logits = logits * scale
    lse = torch.logsumexp(logits, dim=-1)  # [batch, kv_heads, group]
    if rest_lse is not None:
        lse = torch.logaddexp(lse, rest_lse.float().reshape(lse.shape))
    probs = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)  # a head with nothing to attend: 0
    top = probs.sum(dim=2).topk(min(n_select, probs.shape[-1]), dim=-1)
    ids = top.indices if pool is None else torch.gather(pool, -1, top.indices)
    return ids.masked_fill(top.values <= 0, -1)
