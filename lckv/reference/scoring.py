"""Pure PyTorch oracles for the scoring ops that choose which offloaded keys to attend.

* Quest-style page scoring: keys are grouped in pages of ``page_size`` consecutive positions;
  each page keeps its per-channel min and max key, and ``sum_d max(q_d min_d, q_d max_d)`` is an
  upper bound of ``q . k`` over every key of the page.
* Flat top-k scoring: exact inner products of each query with every key, keeping the ``top_k``
  largest (the brute-force baseline that vector indexes are measured against).

Scores are raw inner products (no softmax scale: it does not change any ranking), float32.
"""
from __future__ import annotations

import torch

from lckv.checks import _check_gqa, check_finite, check_same_device, check_tensor

__all__ = ["page_key_bounds", "quest_page_scores", "flat_topk_scores"]


def check_page_bounds_args(k, page_size):
    check_tensor(k, "k", 4, "[batch, kv_heads, seq, head_dim]")
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    check_finite(k, "k")


def check_page_score_inputs(q, page_min, page_max):
    check_tensor(q, "q", 3, "[batch, q_heads, head_dim]")
    check_tensor(page_min, "page_min", 4, "[batch, kv_heads, n_pages, head_dim]")
    check_tensor(page_max, "page_max", 4, "[batch, kv_heads, n_pages, head_dim]")
    check_same_device({"q": q, "page_min": page_min, "page_max": page_max})
    if page_min.shape != page_max.shape:
        raise ValueError(
            f"page_min and page_max must have one shape, got {tuple(page_min.shape)} and {tuple(page_max.shape)}")
    if page_min.shape[0] != q.shape[0] or page_min.shape[3] != q.shape[2]:
        raise ValueError(
            f"page_min must have batch {q.shape[0]} and head_dim {q.shape[2]} like q, got {tuple(page_min.shape)}")
    _check_gqa(q.shape[1], page_min.shape[1])
    for name, t in (("q", q), ("page_min", page_min), ("page_max", page_max)):
        check_finite(t, name)


def check_flat_topk_inputs(q, k, top_k):
    check_tensor(q, "q", 3, "[batch, q_heads, head_dim]")
    check_tensor(k, "k", 4, "[batch, kv_heads, seq, head_dim]")
    check_same_device({"q": q, "k": k})
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2]:
        raise ValueError(f"k must have batch {q.shape[0]} and head_dim {q.shape[2]} like q, got {tuple(k.shape)}")
    _check_gqa(q.shape[1], k.shape[1])
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    check_finite(q, "q")
    check_finite(k, "k")


def page_key_bounds(k, page_size: int):
    """Per-page, per-channel min and max of the keys.

    Parameters
    ----------
    k : ``[batch, kv_heads, seq, head_dim]``
    page_size : keys per page; page ``p`` holds positions ``[p * page_size, (p + 1) * page_size)``.
        The last page may be partial: its bounds cover only its real keys.

    Returns
    -------
    page_min, page_max : ``[batch, kv_heads, ceil(seq / page_size), head_dim]`` float32
        (``n_pages == 0`` when ``seq == 0``).
    """
    check_page_bounds_args(k, page_size)
    batch, kv_heads, seq, head_dim = k.shape
    n_pages = -(-seq // page_size)
    pad = n_pages * page_size - seq
    kf = k.float()
    lo = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf"))
    hi = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf"))
    lo = lo.reshape(batch, kv_heads, n_pages, page_size, head_dim).amin(dim=3)
    hi = hi.reshape(batch, kv_heads, n_pages, page_size, head_dim).amax(dim=3)
    return lo, hi


def quest_page_scores(q, page_min, page_max):
    """Upper bound of ``q . k`` over each page (Quest's criticality estimate).

    Parameters
    ----------
    q : ``[batch, q_heads, head_dim]`` (one decode query per head)
    page_min, page_max : ``[batch, kv_heads, n_pages, head_dim]`` from :func:`page_key_bounds`;
        query head ``h`` reads kv head ``h // (q_heads // kv_heads)``.

    Returns
    -------
    scores : ``[batch, q_heads, n_pages]`` float32, ``sum_d max(q_d * min_d, q_d * max_d)``.
        Reduce over a GQA group (e.g. ``amax``) to pick pages per kv head.
    """
    check_page_score_inputs(q, page_min, page_max)
    batch, q_heads, head_dim = q.shape
    kv_heads, n_pages = page_min.shape[1], page_min.shape[2]
    group = q_heads // kv_heads
    qf = q.float().reshape(batch, kv_heads, group, 1, head_dim)
    lo = page_min.float().unsqueeze(2)  # [B, Hkv, 1, P, D]
    hi = page_max.float().unsqueeze(2)
    scores = torch.maximum(qf * lo, qf * hi).sum(dim=-1)  # [B, Hkv, G, P]
    return scores.reshape(batch, q_heads, n_pages)


def flat_topk_scores(q, k, top_k: int):
    """Exact top-k inner products of each query head with the keys of its kv head.

    Parameters
    ----------
    q : ``[batch, q_heads, head_dim]``; query head ``h`` searches kv head
        ``h // (q_heads // kv_heads)`` (pass a per-group query with ``q_heads == kv_heads`` to
        select once per kv head).
    k : ``[batch, kv_heads, seq, head_dim]``
    top_k : positive int; when ``top_k > seq`` the tail is padded with score ``-inf`` and index -1.

    Returns
    -------
    scores : ``[batch, q_heads, top_k]`` float32, descending.
    indices : ``[batch, q_heads, top_k]`` int64 positions into ``seq`` (ties in any order).
    """
    check_flat_topk_inputs(q, k, top_k)
    batch, q_heads, head_dim = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    qf = q.float().reshape(batch, kv_heads, group, head_dim)
    scores = (qf @ k.float().transpose(-1, -2)).reshape(batch, q_heads, seq)
    kept = min(top_k, seq)
    values, indices = torch.topk(scores, kept, dim=-1, largest=True, sorted=True)
    if kept < top_k:
        pad = top_k - kept
        values = torch.nn.functional.pad(values, (0, pad), value=float("-inf"))
        indices = torch.nn.functional.pad(indices, (0, pad), value=-1)
    return values, indices
