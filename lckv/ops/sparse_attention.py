"""Public decode sparse attention: ``sparse_attention_with_lse`` with a backend choice."""
from __future__ import annotations

import torch

from lckv import reference
from lckv._extension import compiled
from lckv.backends import resolve_backend
from lckv.checks import check_scale, check_sparse_inputs
from lckv.ops._common import check_result, check_sparse_args, default_scale, next_power_of_2

__all__ = ["sparse_attention_with_lse"]


def _triton(q, k, v, indices, scale):
    from lckv.kernels.sparse_attention import sparse_attention_fwd_kernel

    batch, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    indices = indices.contiguous()
    out = torch.empty(batch, q_heads, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, q_heads, device=q.device, dtype=torch.float32)
    if batch * kv_heads == 0:
        return out.to(q.dtype), lse
    sparse_attention_fwd_kernel[(batch * kv_heads,)](
        q, k, v, indices, out, lse,
        default_scale(head_dim, scale), indices.shape[2], head_dim, kv_heads,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        indices.stride(0), indices.stride(1),
        out.stride(0), out.stride(1),
        lse.stride(0), lse.stride(1),
        GROUP=group, BLOCK_G=max(2, next_power_of_2(group)), BLOCK_D=max(2, next_power_of_2(head_dim)),
    )
    return out.to(q.dtype), lse


def _cpu(q, k, v, indices, scale, check_values: bool = False):
    return compiled("sparse_attention_with_lse").sparse_attention_with_lse(q, k, v, indices, scale, check_values)


_BACKENDS = {"triton": _triton, "cpu": _cpu}


def sparse_attention_with_lse(q, k, v, indices, scale=None, backend: str = "auto"):
    """Decode-time attention of one query per head over per-kv-head gathered keys.

    Same contract as :func:`lckv.reference.sparse_attention_with_lse`.

    Parameters
    ----------
    q : ``[batch, q_heads, head_dim]``
    k, v : ``[batch, kv_heads, seq, head_dim]`` (any strides; the ``cpu`` backend reads fp16/bf16
        rows in place, so a million-token cache is never converted or copied).
    indices : ``[batch, kv_heads, n_selected]`` int64 in ``[-1, seq)``; -1 = padding. The query
        heads of a GQA group share their kv head's indices; repeats are attended repeatedly.
    scale : defaults to ``1/sqrt(head_dim)``.
    backend : ``"auto"`` or one of :data:`lckv.backends.BACKENDS` (see :mod:`lckv.backends`).

    Returns
    -------
    out : ``[batch, q_heads, head_dim]`` in ``q.dtype``; 0 where nothing is selected.
    lse : ``[batch, q_heads]`` float32; ``-inf`` where nothing is selected.

    Raises ``ValueError``/``TypeError`` for bad shapes, dtypes, devices, out-of-range indices, a
    non-finite ``q`` or ``scale``, or NaN/inf in the K/V rows that were read.

    Example
    -------
    >>> q = torch.randn(1, 4, 64); k = torch.randn(1, 2, 1000, 64); v = torch.randn_like(k)
    >>> idx = torch.randint(0, 1000, (1, 2, 32))
    >>> out, lse = sparse_attention_with_lse(q, k, v, idx)   # [1, 4, 64], [1, 4]
    """
    check_scale(scale)
    name = resolve_backend("sparse_attention_with_lse", q.device if isinstance(q, torch.Tensor) else "cpu", backend)
    if name == "reference":
        return reference.sparse_attention_with_lse(q, k, v, indices, scale=scale)
    if name == "cpu":  # the C++ op checks the index range, q and its result in its own passes
        check_sparse_inputs(q, k, v, indices, scan_kv=False, values=False)
        return _cpu(q, k, v, indices, scale, check_values=True)
    check_sparse_args(q, k, v, indices)
    out, lse = _BACKENDS[name](q, k, v, indices, scale)
    return check_result(out, lse, "k or v")


def sparse_attention_unchecked(q, k, v, indices, scale=None):
    """:func:`sparse_attention_with_lse` on the ``auto`` backend without the Python-side argument
    and result checks: for the decode engine, whose inputs lckv made itself (a NaN in the cache
    then shows as NaN in the output, as in any attention). The C++ glue still checks shapes."""
    name = resolve_backend("sparse_attention_with_lse", q.device, "auto")
    if name == "reference":
        return reference.sparse_attention_with_lse(q, k, v, indices, scale=scale)
    return _BACKENDS[name](q, k, v, indices, scale)
