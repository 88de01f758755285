"""Public sink + sliding-window attention: ``sink_window_attention_with_lse`` with a backend choice."""
from __future__ import annotations

import torch

from lckv import reference
from lckv._extension import compiled
from lckv.backends import resolve_backend
from lckv.checks import check_finite, check_scale
from lckv.ops._common import check_attention_args, check_result, default_scale, next_power_of_2
from lckv.reference.window import check_sink_window_args

__all__ = ["sink_window_attention_with_lse", "sink_window_indices"]


def sink_window_indices(q_len: int, kv_len: int, sink: int, window: int, device=None) -> torch.Tensor:
    """The keys each query sees, ``[q_len, min(sink, kv_len) + min(window, kv_len)]`` int64, -1 padded.

    Row ``i`` (position ``p = i + kv_len - q_len``) lists ``[0, min(sink, p + 1))`` then
    ``[max(sink, p - window + 1), p]``: the same key set as
    :func:`lckv.reference.window.sink_window_mask`, each key once.
    """
    sink_cap, window_cap = min(sink, kv_len), min(window, kv_len)
    pos = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    sink_keys = torch.arange(sink_cap, device=device).unsqueeze(0).expand(q_len, sink_cap)
    sink_keys = torch.where(sink_keys <= pos, sink_keys, -1)
    window_keys = pos - window_cap + 1 + torch.arange(window_cap, device=device).unsqueeze(0)
    window_keys = torch.where((window_keys >= sink) & (window_keys >= 0), window_keys, -1)
    return torch.cat([sink_keys, window_keys], dim=1)


def _cpu(q, k, v, sink, window, scale):
    """Runs the C++ sparse kernel with per-query index lists; K/V are never copied (a zero-stride
    view repeats one batch entry over the chunk's queries)."""
    kernel = compiled("sparse_attention_with_lse").sparse_attention_with_lse
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if batch == 0:
        return q.new_zeros(q.shape), q.new_full((0, q_heads, q_len), float("-inf"), dtype=torch.float32)
    idx = sink_window_indices(q_len, kv_len, sink, window, device=q.device)  # [L, n]
    idx = idx.unsqueeze(1).expand(q_len, kv_heads, idx.shape[1])
    scale = default_scale(head_dim, scale)
    outs, lses = [], []
    for b in range(batch):
        qb = q[b].transpose(0, 1)  # [L, Hq, D]
        kb = k[b:b + 1].expand(q_len, -1, -1, -1)
        vb = v[b:b + 1].expand(q_len, -1, -1, -1)
        out, lse = kernel(qb, kb, vb, idx, scale)
        outs.append(out.transpose(0, 1))
        lses.append(lse.transpose(0, 1))
    return torch.stack(outs), torch.stack(lses)


def _triton(q, k, v, sink, window, scale):
    import triton

    from lckv.kernels.window_attention import sink_window_attention_fwd_kernel

    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    out = torch.empty(batch, q_heads, q_len, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, q_heads, q_len, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out.to(q.dtype), lse.fill_(float("-inf"))
    grid = lambda meta: (triton.cdiv(group * q_len, meta["BLOCK_M"]), batch * kv_heads)  # noqa: E731
    sink_window_attention_fwd_kernel[grid](
        q, k, v, out, lse,
        default_scale(head_dim, scale), q_len, kv_len, head_dim, kv_heads, sink, window,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=group, BLOCK_D=max(16, next_power_of_2(head_dim)),
    )
    return out.to(q.dtype), lse


_BACKENDS = {"triton": _triton, "cpu": _cpu}


def _check_rows_read(k, v, q_len: int, sink: int, window: int) -> None:
    """NaN/inf in the K/V rows some query reads (the sink, and the window before the queries):
    the result check alone misses a ``-inf`` key, whose score is then ``-inf`` and whose row drops
    out silently. Reads what the op reads, once more."""
    kv_len = k.shape[2]
    if q_len == 0:
        return
    n_sink, first = min(sink, kv_len), max(0, kv_len - q_len - window + 1) if window else kv_len
    for name, t in (("k", k), ("v", v)):
        check_finite(t[:, :, :n_sink], name)
        check_finite(t[:, :, max(first, n_sink):], name)


def sink_window_attention_with_lse(q, k, v, sink: int, window: int, scale=None, backend: str = "auto"):
    """Attention over the first ``sink`` keys plus a causal window of the last ``window`` keys.

    Same contract as :func:`lckv.reference.sink_window_attention_with_lse`.

    Parameters
    ----------
    q : ``[batch, q_heads, q_len, head_dim]``, the queries at the last ``q_len`` key positions
        (``q_len == 1`` for decode, a chunk for chunked prefill).
    k, v : ``[batch, kv_heads, kv_len, head_dim]``, ``kv_len >= q_len``.
    sink, window : query at position ``p`` sees key ``j`` iff ``j <= p`` and (``j < sink`` or
        ``p - j < window``); ``window`` counts the query's own key.
    scale : defaults to ``1/sqrt(head_dim)``.
    backend : ``"auto"`` or one of :data:`lckv.backends.BACKENDS`.

    Returns
    -------
    out : ``[batch, q_heads, q_len, head_dim]`` in ``q.dtype``; 0 where a query sees no key.
    lse : ``[batch, q_heads, q_len]`` float32; ``-inf`` where a query sees no key.

    Example
    -------
    >>> out, lse = sink_window_attention_with_lse(q, k, v, sink=4, window=1024)
    """
    check_scale(scale)
    device = q.device if isinstance(q, torch.Tensor) else "cpu"
    name = resolve_backend("sink_window_attention_with_lse", device, backend)
    if name == "reference":
        return reference.sink_window_attention_with_lse(q, k, v, sink, window, scale=scale)
    check_attention_args(q, k, v)
    check_sink_window_args(q, k, sink, window)
    _check_rows_read(k, v, q.shape[2], sink, window)
    out, lse = _BACKENDS[name](q, k, v, sink, window, scale)
    return check_result(out, lse, "k or v")
