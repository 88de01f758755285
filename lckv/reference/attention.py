"""Pure PyTorch attention oracles with log-sum-exp, fp32 accumulation, any device.

Every fast op in :mod:`lckv.ops` has the same name and signature as its oracle here. Conventions:

* ``lse`` is the natural-log normaliser of the softmax, ``log(sum_j exp(score_j))``, float32.
* A query that attends to no key gets ``out = 0`` and ``lse = -inf`` (never NaN), so that merging
  with another part is exact.
* GQA: ``q_heads`` must be a multiple of ``kv_heads``; query head ``h`` reads kv head
  ``h // (q_heads // kv_heads)``.
* Outputs are returned in the dtype of ``q``; ``lse`` is always float32.
"""
from __future__ import annotations

import math

import torch

from lckv.checks import check_attention_inputs, check_key_padding, check_sparse_inputs, check_states

__all__ = ["attention_with_lse", "sparse_attention_with_lse", "merge_attention_states"]


def _softmax_with_lse(scores: torch.Tensor, v: torch.Tensor):
    """scores [..., Lq, S] fp32 (masked entries -inf; overwritten), v [..., S, D] fp32 -> (out, lse)."""
    m = scores.amax(dim=-1, keepdim=True) if scores.shape[-1] else scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    empty = torch.isneginf(m)
    m = m.masked_fill(empty, 0.0)
    if scores.requires_grad and torch.is_grad_enabled():
        probs = torch.exp(scores - m)  # out of place: autograd needs the inputs of exp
    else:
        probs = scores.sub_(m).exp_()  # inference: one exp pass, in place
    denom = probs.sum(dim=-1, keepdim=True)
    out = (probs @ v) / denom.masked_fill(empty, 1.0)
    lse = (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf for rows with no key
    return out.masked_fill(empty, 0.0), lse


def attention_with_lse(q, k, v, causal: bool = False, mask=None, scale=None, key_padding=None):
    """Dense attention returning the output and its log-sum-exp.

    Parameters
    ----------
    q : ``[batch, q_heads, q_len, head_dim]``
    k, v : ``[batch, kv_heads, kv_len, head_dim]`` (not GQA-expanded)
    causal : query ``i`` sees key ``j`` iff ``j <= i + kv_len - q_len`` (queries are the last
        ``q_len`` positions of the keys, as in a decode or chunked-prefill step).
    mask : optional, broadcastable to ``[batch, q_heads, q_len, kv_len]``; bool (True = attend)
        or float (added to the scores; ``-inf`` masks). Combined with ``causal`` if both are set.
    scale : defaults to ``1/sqrt(head_dim)``.
    key_padding : optional bool ``[batch, kv_len]``, True for real keys; padded keys are masked
        (the same as ``mask=key_padding[:, None, None, :]``, combined with ``mask``).

    Returns
    -------
    out : ``[batch, q_heads, q_len, head_dim]`` in ``q.dtype``; 0 for rows that attend to nothing.
    lse : ``[batch, q_heads, q_len]`` float32; ``-inf`` for rows that attend to nothing
        (including ``kv_len == 0``).

    Example
    -------
    >>> q = torch.randn(1, 4, 3, 16); k = torch.randn(1, 2, 5, 16); v = torch.randn(1, 2, 5, 16)
    >>> out, lse = attention_with_lse(q, k, v, causal=True)
    >>> out.shape, lse.shape
    (torch.Size([1, 4, 3, 16]), torch.Size([1, 4, 3]))
    """
    check_attention_inputs(q, k, v, mask)
    if key_padding is not None:
        check_key_padding(key_padding, q, k)
    return dense_attention_unchecked(q, k, v, causal, with_key_padding(mask, key_padding), scale)


def with_key_padding(mask, key_padding):
    """``mask`` (None, bool or additive float) combined with a ``[batch, kv_len]`` key padding."""
    if key_padding is None:
        return mask
    pad = key_padding[:, None, None, :]
    if mask is None:
        return pad
    return mask & pad if mask.dtype == torch.bool else mask.float().masked_fill(~pad, float("-inf"))


def dense_attention_unchecked(q, k, v, causal: bool = False, mask=None, scale=None):
    """:func:`attention_with_lse` without argument checks, for callers that validated already."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    qf = q.float().reshape(batch, kv_heads, group * q_len, head_dim)
    scores = (qf @ k.float().transpose(-1, -2)).mul_(scale)
    scores = scores.reshape(batch, q_heads, q_len, kv_len)
    if causal:
        rows = torch.arange(q_len, device=q.device).unsqueeze(1) + (kv_len - q_len)
        cols = torch.arange(kv_len, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(cols > rows, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    vf = v.float().unsqueeze(2).expand(batch, kv_heads, group, kv_len, head_dim)
    vf = vf.reshape(batch, q_heads, kv_len, head_dim)
    out, lse = _softmax_with_lse(scores, vf)
    return out.to(q.dtype), lse


def sparse_attention_with_lse(q, k, v, indices, scale=None):
    """Decode-time attention of one query per head over per-kv-head gathered keys.

    Parameters
    ----------
    q : ``[batch, q_heads, head_dim]``
    k, v : ``[batch, kv_heads, seq, head_dim]``
    indices : ``[batch, kv_heads, n_selected]`` int64 positions into ``seq``; ``-1`` means
        "no key" (padding). The query heads of a GQA group share their kv head's indices.
        Repeated indices are attended as many times as they appear (callers deduplicate).
    scale : defaults to ``1/sqrt(head_dim)``.

    Returns
    -------
    out : ``[batch, q_heads, head_dim]`` in ``q.dtype``; 0 where nothing is selected.
    lse : ``[batch, q_heads]`` float32, natural log; ``-inf`` where nothing is selected.

    Example
    -------
    >>> q = torch.randn(2, 4, 8); k = torch.randn(2, 2, 10, 8); v = torch.randn(2, 2, 10, 8)
    >>> idx = torch.tensor([[[0, 3, -1], [9, 1, 2]]] * 2)
    >>> out, lse = sparse_attention_with_lse(q, k, v, idx)
    """
    check_sparse_inputs(q, k, v, indices)
    batch, q_heads, head_dim = q.shape
    kv_heads, n_sel = k.shape[1], indices.shape[-1]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if k.shape[2] == 0:  # no rows: every index is -1 (checked), nothing is attended
        return q.new_zeros(q.shape), torch.full((batch, q_heads), float("-inf"), device=q.device)
    valid = indices >= 0
    safe = indices.clamp(min=0).unsqueeze(-1).expand(batch, kv_heads, n_sel, head_dim)
    k_sel = torch.gather(k.float(), 2, safe)  # [B, Hkv, n, D]
    v_sel = torch.gather(v.float(), 2, safe)
    qf = q.float().reshape(batch, kv_heads, group, head_dim)
    scores = (qf @ k_sel.transpose(-1, -2)).mul_(scale)  # [B, Hkv, G, n]
    scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf"))
    out, lse = _softmax_with_lse(scores, v_sel)  # [B, Hkv, G, n] @ [B, Hkv, n, D]
    return out.reshape(batch, q_heads, head_dim).to(q.dtype), lse.reshape(batch, q_heads)


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """Merges two partial attention states computed over disjoint key sets.

    ``out_*`` have any shape ``[..., head_dim]`` and ``lse_*`` the leading shape ``[...]``.
    With ``m = max(lse_a, lse_b)``: ``out = (out_a e^(lse_a-m) + out_b e^(lse_b-m)) /
    (e^(lse_a-m) + e^(lse_b-m))`` and ``lse = m + log(e^(lse_a-m) + e^(lse_b-m))``. An empty part
    (``lse = -inf``) contributes nothing; two empty parts give ``out = 0``, ``lse = -inf``.
    Returns ``out`` in ``out_a.dtype`` and ``lse`` in float32.
    """
    check_states(out_a, lse_a, out_b, lse_b)
    return merge_states_unchecked(out_a, lse_a, out_b, lse_b)


def merge_states_unchecked(out_a, lse_a, out_b, lse_b):
    """:func:`merge_attention_states` without argument checks."""
    la, lb = lse_a.float(), lse_b.float()
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    total = wa + wb
    denom = torch.where(total > 0, total, torch.ones_like(total))
    out = (out_a.float() * wa.unsqueeze(-1) + out_b.float() * wb.unsqueeze(-1)) / denom.unsqueeze(-1)
    lse = torch.where(total > 0, m_safe + torch.log(denom), torch.full_like(m, float("-inf")))
    return out.to(out_a.dtype), lse
