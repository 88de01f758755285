"""Public scoring ops: Quest page bounds/scores and block-wise flat top-k, with a backend choice."""
from __future__ import annotations

import torch

from lckv import reference
from lckv._extension import compiled
from lckv.backends import resolve_backend
from lckv.reference.scoring import check_flat_topk_inputs, check_page_score_inputs
from lckv.ops._common import next_power_of_2

__all__ = ["page_key_bounds", "quest_page_scores", "flat_topk_scores"]

_TOPK_BLOCK_N = 64  # keys per program of the flat top-k kernel


def page_key_bounds(k, page_size: int, backend: str = "auto"):
    """Per-page, per-channel key min/max ``[batch, kv_heads, ceil(seq / page_size), head_dim]``
    float32; see :func:`lckv.reference.page_key_bounds` (reference backend only: it runs once per
    filled page, off the decode path)."""
    device = k.device if isinstance(k, torch.Tensor) else "cpu"
    resolve_backend("page_key_bounds", device, backend)
    return reference.page_key_bounds(k, page_size)


def _page_scores_triton(q, page_min, page_max):
    import triton

    from lckv.kernels.page_scores import quest_page_scores_kernel

    batch, q_heads, head_dim = q.shape
    kv_heads, n_pages = page_min.shape[1], page_min.shape[2]
    group = q_heads // kv_heads
    q = q.contiguous()
    page_min = page_min.contiguous()
    page_max = page_max.to(page_min.dtype).contiguous()
    scores = torch.empty(batch, q_heads, n_pages, device=q.device, dtype=torch.float32)
    if scores.numel() == 0:
        return scores
    grid = lambda meta: (batch * kv_heads, triton.cdiv(n_pages, meta["BLOCK_P"]))  # noqa: E731
    quest_page_scores_kernel[grid](
        q, page_min, page_max, scores,
        n_pages, head_dim, kv_heads,
        q.stride(0), q.stride(1),
        page_min.stride(0), page_min.stride(1), page_min.stride(2),
        scores.stride(0), scores.stride(1),
        GROUP=group, BLOCK_G=max(2, next_power_of_2(group)), BLOCK_D=max(2, next_power_of_2(head_dim)),
    )
    return scores


def quest_page_scores(q, page_min, page_max, backend: str = "auto"):
    """Upper bound of ``q . k`` over each page: ``sum_d max(q_d min_d, q_d max_d)``.

    q ``[batch, q_heads, head_dim]``; page_min/page_max ``[batch, kv_heads, n_pages, head_dim]``
    (from :func:`page_key_bounds`). Returns ``[batch, q_heads, n_pages]`` float32; reduce over a
    GQA group (e.g. ``amax``) to choose pages per kv head. Same contract as
    :func:`lckv.reference.quest_page_scores`.
    """
    device = q.device if isinstance(q, torch.Tensor) else "cpu"
    name = resolve_backend("quest_page_scores", device, backend)
    if name == "reference":
        return reference.quest_page_scores(q, page_min, page_max)
    check_page_score_inputs(q, page_min, page_max)
    return _page_scores_triton(q, page_min, page_max)


def _flat_topk_triton(q, k, top_k):
    import triton

    from lckv.kernels.flat_topk import flat_topk_block_kernel

    batch, q_heads, head_dim = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    q = q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    n_blocks = triton.cdiv(seq, _TOPK_BLOCK_N)
    k_block = min(next_power_of_2(top_k), _TOPK_BLOCK_N)
    cand_scores = torch.empty(batch, q_heads, n_blocks * k_block, device=q.device, dtype=torch.float32)
    cand_idx = torch.empty(batch, q_heads, n_blocks * k_block, device=q.device, dtype=torch.int64)
    if cand_scores.numel():
        flat_topk_block_kernel[(batch * kv_heads, n_blocks)](
            q, k, cand_scores, cand_idx,
            seq, head_dim, kv_heads,
            q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), k.stride(2),
            cand_scores.stride(0), cand_scores.stride(1), cand_scores.stride(2),
            GROUP=group, BLOCK_G=max(2, next_power_of_2(group)), BLOCK_N=_TOPK_BLOCK_N,
            BLOCK_D=max(2, next_power_of_2(head_dim)), K_BLOCK=k_block,
        )
    kept = min(top_k, cand_scores.shape[-1])
    values, pos = torch.topk(cand_scores, kept, dim=-1, largest=True, sorted=True)
    indices = torch.gather(cand_idx, -1, pos)
    if kept < top_k:
        values = torch.nn.functional.pad(values, (0, top_k - kept), value=float("-inf"))
        indices = torch.nn.functional.pad(indices, (0, top_k - kept), value=-1)
    return values, indices


def _flat_topk_cuda(q, k, top_k):
    """csrc/cuda/topk_scan.cu: each tile of 128 keys keeps its best min(top_k, 128) per query head,
    then torch.topk over those candidates."""
    return compiled("flat_topk_scores_cuda").flat_topk_scores_cuda(q.float(), k, top_k)


def flat_topk_scores(q, k, top_k: int, backend: str = "auto"):
    """Exact top-k inner products of each query head with the keys of its kv head.

    q ``[batch, q_heads, head_dim]``, k ``[batch, kv_heads, seq, head_dim]``. Returns
    ``(scores, indices)``, each ``[batch, q_heads, top_k]``: float32 scores descending and int64
    positions; when ``top_k > seq`` the tail is ``-inf`` / ``-1`` (a ``top_k`` whose outputs cannot
    be allocated raises ValueError naming it). Same contract as
    :func:`lckv.reference.flat_topk_scores` (ties may come in a different order).
    """
    device = q.device if isinstance(q, torch.Tensor) else "cpu"
    name = resolve_backend("flat_topk_scores", device, backend)
    check_flat_topk_inputs(q, k, top_k)
    topk = {"reference": reference.flat_topk_scores, "triton": _flat_topk_triton, "cuda": _flat_topk_cuda}[name]
    seq = k.shape[2]
    if top_k <= seq:
        return topk(q, k, top_k)
    # padded past seq: the outputs first, so that a top_k too large to hold is refused by name
    shape = (q.shape[0], q.shape[1], top_k)
    try:
        scores = torch.full(shape, float("-inf"), device=q.device)
        indices = torch.full(shape, -1, dtype=torch.int64, device=q.device)
    except (RuntimeError, MemoryError, TypeError, OverflowError) as exc:  # TypeError: past int64
        raise ValueError(f"top_k={top_k} is too large: the outputs of shape {list(shape)} (batch, q_heads, top_k) "
                         f"cannot be allocated ({str(exc).splitlines()[0][:120]})") from None
    if seq:
        scores[..., :seq], indices[..., :seq] = topk(q, k, seq)
    return scores, indices
