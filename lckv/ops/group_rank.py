"""Public op of the GQA group ranking over candidate rows (contract in
:func:`lckv.reference.group_rank.rank_by_group_probability`), with a backend choice (``cpu``: the
C++ kernel of lckv/group_rank.h, float32, float16 or bfloat16 keys; ``reference``: torch ops, any dtype or device)."""
from __future__ import annotations

import torch

from lckv._extension import compiled
from lckv.checks import check_group_rank_inputs
from lckv.ops._common import choose_backend, default_scale, last_dim_contiguous
from lckv.reference import group_rank as ref

__all__ = ["rank_by_group_probability"]


def rank_by_group_probability(q, keys, candidates, rest_lse, scale: float, n_select: int, backend: str = "auto"):
    """The ``n_select`` candidate rows of each kv head with the largest summed probability over the
    head's query group: ``q [B, Hq, D]``, ``keys [B, H, rows, D]``, ``candidates [B, H, m]`` (row ids,
    -1 = none, repeats allowed), ``rest_lse [B, Hq]`` or None; ``scale`` None is ``1/sqrt(head_dim)``.
    Returns int64 ``[B, H, <= n_select]``. Bad arguments (shapes, dtypes, ids out of range, NaN in
    ``q`` or ``rest_lse``) raise ValueError/TypeError naming them on every backend."""
    check_group_rank_inputs(q, keys, candidates, rest_lse, scale, n_select, values_too=False)
    supported = keys.dtype in (torch.float32, torch.float16, torch.bfloat16) and candidates is not None
    name = choose_backend("rank_by_group_probability", q.device, backend, supported,
                          "keys must be float32, float16 or bfloat16 and candidates given")
    if name == "reference":
        check_group_rank_inputs(q, keys, candidates, rest_lse, scale, n_select)
        return ref.rank_by_group_probability(q, keys, candidates, rest_lse, scale, n_select)
    rest = None if rest_lse is None else rest_lse.float().contiguous()
    n_select = min(n_select, max(1, candidates.shape[-1]))  # the same output; a huge n_select fits the kernel's int64
    return compiled("rank_by_group_probability").rank_by_group_probability(
        q.float().contiguous(), last_dim_contiguous(keys), candidates.contiguous(), rest,
        default_scale(q.shape[-1], scale), n_select)
