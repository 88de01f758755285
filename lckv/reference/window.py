"""Pure PyTorch oracle for sink + sliding-window attention (StreamingLLM-style), with LSE.

The resident "static part" of a compressed cache: every query sees the first ``sink`` keys and the
last ``window`` keys up to and including its own position. Decode is ``q_len == 1``; chunked
prefill is ``q_len > 1`` with the queries at the last ``q_len`` positions of the keys.
"""
from __future__ import annotations

import torch

from lckv.checks import check_attention_inputs
from lckv.reference.attention import attention_with_lse

__all__ = ["sink_window_attention_with_lse", "sink_window_mask"]


def check_sink_window_args(q, k, sink, window):
    """Checks the integer arguments of sink/window attention (tensor checks are shared)."""
    for name, value in (("sink", sink), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(
            f"q_len ({q.shape[2]}) must not exceed kv_len ({k.shape[2]}): queries are the last q_len key positions")


def sink_window_mask(q_len: int, kv_len: int, sink: int, window: int, device=None) -> torch.Tensor:
    """Bool mask ``[q_len, kv_len]``, True = attend.

    Query ``i`` sits at position ``p = i + kv_len - q_len`` and sees key ``j`` iff ``j <= p`` and
    (``j < sink`` or ``p - j < window``). ``window`` counts the query's own position, so
    ``window = 1`` is the query's own key only; ``sink = window = 0`` sees nothing.
    """
    pos = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    key = torch.arange(kv_len, device=device).unsqueeze(0)
    return (key <= pos) & ((key < sink) | (pos - key < window))


def sink_window_attention_with_lse(q, k, v, sink: int, window: int, scale=None):
    """Attention over the first ``sink`` keys plus a causal sliding window of ``window`` keys.

    Parameters
    ----------
    q : ``[batch, q_heads, q_len, head_dim]`` — the queries at the last ``q_len`` key positions
        (``q_len == 1`` for decode, a chunk for chunked prefill).
    k, v : ``[batch, kv_heads, kv_len, head_dim]`` with ``kv_len >= q_len`` (GQA not expanded).
    sink, window : non-negative ints; see :func:`sink_window_mask`. Overlapping sink and window
        keys are counted once.
    scale : defaults to ``1/sqrt(head_dim)``.

    Returns
    -------
    out : ``[batch, q_heads, q_len, head_dim]`` in ``q.dtype``; 0 where a query sees no key.
    lse : ``[batch, q_heads, q_len]`` float32; ``-inf`` where a query sees no key.

    Example
    -------
    >>> q = torch.randn(1, 4, 2, 16); k = torch.randn(1, 2, 9, 16); v = torch.randn(1, 2, 9, 16)
    >>> out, lse = sink_window_attention_with_lse(q, k, v, sink=2, window=3)
    >>> out.shape, lse.shape
    (torch.Size([1, 4, 2, 16]), torch.Size([1, 4, 2]))
    """
    check_attention_inputs(q, k, v)
    check_sink_window_args(q, k, sink, window)
    mask = sink_window_mask(q.shape[2], k.shape[2], sink, window, device=q.device)
    return attention_with_lse(q, k, v, mask=mask, scale=scale)
