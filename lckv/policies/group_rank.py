"""GQA ranking: how the query heads of a group share one selection per kv head.

``group_sum`` gives the summed query ``sum_h q_h`` (``snapkv``, ``quest``, ``block`` and
``retrieval`` with ``group_rank="logits"`` rank keys by summed logits);
:func:`top_by_group_probability` ranks keys by the group's summed attention probabilities
(``retrieval``'s default).
"""
from __future__ import annotations

import torch

from lckv.ops import rank_by_group_probability
from lckv.reference import group_rank as ref

__all__ = ["group_sum", "top_by_group_probability"]


def group_sum(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[batch, q_heads, D]`` -> ``[batch, kv_heads, D]``: the summed query of each GQA group."""
    batch, q_heads, head_dim = q.shape
    return q.float().reshape(batch, kv_heads, q_heads // kv_heads, head_dim).sum(dim=2)


def top_by_group_probability(q: torch.Tensor, keys: torch.Tensor, n_select: int, scale: float | None = None,
                             candidates: torch.Tensor | None = None,
                             rest_lse: torch.Tensor | None = None) -> torch.Tensor:
    """The ``n_select`` keys of each kv head with the largest summed attention probability over its
    query group, ``sum_h softmax_h(scale * q_h . k)``: the rows that keep the most attention mass
    for the group as a whole. Ranking by summed logits instead lets one head's large logits
    decide for every head of the group, and misses what a diffuse head attends.

    ``q`` ``[batch, q_heads, D]``, ``keys`` ``[batch, kv_heads, n, D]``. Without ``candidates``
    every key competes (softmax over all n); with ``candidates`` ``[batch, kv_heads, m]`` (row ids,
    -1 = none, repeats allowed) only those do, and each head's probabilities are normalised over
    the distinct candidates plus ``rest_lse`` ``[batch, q_heads]`` (the log of the attention mass
    of the keys outside the candidates, e.g. the centroid estimate's; None: the candidates only).
    Returns int64 ``[batch, kv_heads, min(n_select, pool)]``, -1 where fewer valid rows exist.
    With candidates: :func:`lckv.ops.rank_by_group_probability` (C++ for CPU keys of any float dtype).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if candidates is None:
        return ref.rank_by_group_probability(q, keys, None, rest_lse, scale, n_select)
    return rank_by_group_probability(q, keys, candidates, rest_lse, scale, n_select)
