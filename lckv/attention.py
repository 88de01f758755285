"""The policy-driven attention engine behind the ``"lckv"`` transformers backend.

Keys arrive as :class:`~lckv.cache.Segment` parts (sink, offloaded, recent when an
:class:`~lckv.cache.LckvCache` is used; one part otherwise). Each part is attended exactly with
:func:`~lckv.reference.attention_with_lse` under a boolean mask made of causality, key padding and the policy's
:meth:`~lckv.policies.Policy.allowed`, and the partial states merge by log-sum-exp. Queries are
processed in chunks so that no score block exceeds :data:`SCORE_BLOCK_ELEMENTS` elements.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lckv.backends import resolve_backend
from lckv.cache import Segment
from lckv.ops.dense_attention import attention_with_lse_unchecked
from lckv.ops.merge_states import merge_states_unchecked
from lckv.ops.sparse_attention import sparse_attention_unchecked
from lckv.policies import Policy
from lckv.policies.selection import SelectionPolicy
from lckv.reference.attention import dense_attention_unchecked

__all__ = ["KeyPaddingMask", "attend_segments", "attend_with_selection", "attend_chunk_with_selection",
           "SCORE_BLOCK_ELEMENTS"]

#: upper bound on batch * q_heads * q_chunk * n_keys of one score block (fp32: 128 MiB).
SCORE_BLOCK_ELEMENTS = 1 << 25


@dataclass
class KeyPaddingMask:
    """Causal attention with key padding, without a materialised 4D mask.

    ``padding`` ``[batch, kv_length]`` bool, True for real tokens; column ``j`` is slot ``j``.
    Produced by the ``"lckv"`` mask function for the causal pattern, consumed only by the engine.
    """

    padding: torch.Tensor


def _segment_mask(policy: Policy, q_pos, seg: Segment, attention_mask, q_rows: slice):
    """bool mask broadcastable to [batch, q_heads, q_chunk, seg_len], or an additive float mask."""
    k_pos = torch.arange(seg.start, seg.start + seg.length, device=q_pos.device)
    allowed = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # causal, bottom-right aligned by positions
    extra = policy.allowed(q_pos, k_pos)
    if extra is not None:
        allowed = allowed & extra
    mask = allowed[None, None]
    if isinstance(attention_mask, KeyPaddingMask):
        pad = attention_mask.padding[:, seg.start : seg.start + seg.length].to(q_pos.device)
        mask = mask & pad[:, None, None, :]
    elif isinstance(attention_mask, torch.Tensor):
        dense = attention_mask[:, :, q_rows, seg.start : seg.start + seg.length].to(q_pos.device)
        if dense.dtype == torch.bool:
            mask = mask & dense
        else:  # an additive float mask supplied by the caller
            return dense.float().masked_fill(~mask, float("-inf"))
    return mask


def attend_segments(query: torch.Tensor, segments: list[Segment], q_start: int, attention_mask,
                    policy: Policy, scale: float | None):
    """Attention of ``query`` ``[batch, q_heads, q_len, head_dim]`` at positions
    ``q_start .. q_start + q_len - 1`` over the given parts; returns ``(out, lse)`` with ``out``
    ``[batch, q_heads, q_len, head_dim]`` and ``lse`` ``[batch, q_heads, q_len]``.

    ``attention_mask`` is None (causal only), a :class:`KeyPaddingMask`, or a 4D mask whose columns
    are absolute positions. Queries that can attend to nothing get zero output and ``lse = -inf``.
    """
    batch, q_heads, q_len, head_dim = query.shape
    if type(policy).allowed is Policy.allowed and (attention_mask is None or isinstance(attention_mask, KeyPaddingMask)):
        fused = _attend_segments_fused(query, segments, q_start, attention_mask, scale)
        if fused is not None:
            return fused
    n_keys = max(1, sum(s.length for s in segments))
    chunk = max(1, SCORE_BLOCK_ELEMENTS // (batch * q_heads * n_keys))
    outs, lses = [], []
    for lo in range(0, q_len, chunk):
        hi = min(q_len, lo + chunk)
        q = query[:, :, lo:hi]
        q_pos = torch.arange(q_start + lo, q_start + hi, device=query.device)
        out = lse = None
        for seg in segments:
            if seg.start > q_start + hi - 1:  # entirely in the future of this chunk
                continue
            if not policy.in_reach(seg.start, seg.start + seg.length - 1, q_start + lo, q_start + hi - 1):
                continue
            mask = _segment_mask(policy, q_pos, seg, attention_mask, slice(lo, hi))
            k, v = seg.k.to(query.device, non_blocking=True), seg.v.to(query.device, non_blocking=True)
            part_out, part_lse = dense_attention_unchecked(q, k, v, mask=mask, scale=scale)
            if out is None:
                out, lse = part_out, part_lse
            else:
                out, lse = merge_states_unchecked(out, lse, part_out, part_lse)
        if out is None:  # no key at or before these positions
            out = torch.zeros_like(q)
            lse = torch.full((batch, q_heads, hi - lo), float("-inf"), device=query.device)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _attend_segments_fused(query, segments: list[Segment], q_start: int, attention_mask, scale):
    """:func:`attend_segments` for causal attention with at most key padding, one fused kernel call
    per part (:func:`lckv.ops.dense_attention.attention_with_lse_unchecked`, no score blocks); None
    when a part is neither wholly before the queries nor ending with them (the masked path serves it)."""
    q_len = query.shape[2]
    q_end = q_start + q_len  # one past the last query position
    parts = []
    for seg in segments:
        seg_end = seg.start + seg.length
        if seg.start >= q_end or seg.length == 0:
            continue  # wholly in the future, or empty
        if seg_end - 1 <= q_start:
            parts.append((seg, False))  # every query sees every key of this part
        elif seg_end == q_end:
            parts.append((seg, True))  # bottom-right aligned: the part ends with the queries
        else:
            return None
    if not parts:
        batch, q_heads, _, _ = query.shape
        return torch.zeros_like(query), torch.full((batch, q_heads, q_len), float("-inf"), device=query.device)
    # several parts of a 16-bit model merge in fp32 and round once, as one softmax would
    dtype = torch.float32 if len(parts) > 1 else query.dtype
    q = query.to(dtype)
    out = lse = None
    for seg, causal in parts:
        seg_end = seg.start + seg.length
        padding = None if attention_mask is None else attention_mask.padding[:, seg.start:seg_end].to(query.device)
        k, v = seg.k.to(query.device, dtype, non_blocking=True), seg.v.to(query.device, dtype, non_blocking=True)
        part = attention_with_lse_unchecked(q, k, v, causal, padding, scale)
        out, lse = part if out is None else merge_states_unchecked(out, lse, *part)
    return out.to(query.dtype), lse


def attend_with_selection(query: torch.Tensor, layer, attention_mask, policy: SelectionPolicy, scale: float,
                          return_indices: bool = False):
    """One decode step (``q_len == 1``) of a :class:`SelectionPolicy` on an LckvCache layer.

    The resident sink and window are attended exactly; of the offloaded store only the rows the
    policy selects per kv head are read (sparse attention), plus the policy's estimate of the rest
    when it has one; the parts merge by LSE. Returns ``(out, lse)`` like :func:`attend_segments`,
    and with ``return_indices`` also the attended store rows ``[batch, kv_heads, n]`` (-1 = none;
    None when the whole store or none of it was attended).

    No backward: the sparse kernels have none, so a step under autograd raises NotImplementedError
    instead of returning an output whose gradient misses the selected rows.
    """
    if torch.is_grad_enabled() and query.requires_grad:
        raise NotImplementedError(
            f"{type(policy).__name__}: a decode step (one query) on an LckvCache has no backward; run it under "
            "torch.no_grad(), or teacher force two or more tokens as one chunk with prefill='retrieval' (the chunk "
            "path is differentiable; training/retrolm.py's stage 2)")
    store = layer.store
    n_sink, n_recent = layer.sink_k.shape[2], layer.recent_k.shape[2]
    q_start = layer.total - 1
    n_select = policy.budget_tokens(layer.total) - n_sink - n_recent
    unmasked = attention_mask is None and type(policy).allowed is Policy.allowed and query.shape[2] == 1
    view = None  # what the policy's hooks see, made once per step when a hook runs
    if unmasked and layer.store_padding is None and 0 < n_select < store.length:
        view = layer.view()
        fused = policy.fused_step(layer.selection_state(), view, query[:, :, 0], n_select, scale)
        if fused is not None:  # the whole step in one call (e.g. lckv/decode_step.h)
            out, lse, indices = fused
            out, lse = out.to(query.dtype).unsqueeze(2), lse.unsqueeze(2)
            return (out, lse, indices) if return_indices else (out, lse)
    if unmasked:
        # no padding and no policy mask: the one decode query attends every resident key
        out, lse = dense_attention_unchecked(query, torch.cat([layer.sink_k, layer.recent_k], 2),
                                             torch.cat([layer.sink_v, layer.recent_v], 2), scale=scale)
    else:
        out, lse = attend_segments(query, layer.resident_segments(), q_start, attention_mask, policy, scale)
    if n_select <= 0:
        return (out, lse, None) if return_indices else (out, lse)
    if n_select >= store.length:  # the budget covers the whole store: exact
        part = attend_segments(query, [Segment(store.keys, store.values, n_sink)], q_start, attention_mask, policy, scale)
        merged = merge_states_unchecked(out, lse, *part)
        return (*merged, None) if return_indices else merged
    state = layer.selection_state()
    view = view if view is not None else layer.view()
    q = query[:, :, 0].to(store.keys.device)
    indices = policy.select(state, view, q, n_select, scale)
    indices = _drop_pad_rows(indices, view.padding)
    mixed = store.keys.dtype != q.dtype and q.dtype == torch.float32  # a 16-bit host_dtype store, fp32 model
    if not mixed:
        sel_out, sel_lse = sparse_attention_unchecked(q.to(store.keys.dtype), store.keys, store.values, indices, scale)
    elif resolve_backend("sparse_attention_with_lse", q.device) == "cpu":
        # the C++ kernel reads 16-bit rows in place under an fp32 query: the same numbers as an
        # fp32 store holding the rounded rows (exact conversion, same arithmetic)
        sel_out, sel_lse = sparse_attention_unchecked(q, store.keys, store.values, indices, scale)
    else:  # the other backends take one dtype: gather the rows in fp32, the query stays fp32
        sel_out, sel_lse = _attend_selected_rows(q[:, :, None, None], store.keys, store.values, indices[:, :, None],
                                                 (indices >= 0)[:, :, None], scale)
        sel_out, sel_lse = sel_out[:, :, 0, 0], sel_lse[:, :, 0, 0]
    extra = policy.estimate(state, view, q, indices, scale)
    if extra is not None:
        sel_out, sel_lse = merge_states_unchecked(sel_out, sel_lse, *extra)
    sel_out, sel_lse = sel_out.to(query.device).unsqueeze(2), sel_lse.to(query.device).unsqueeze(2)
    merged = merge_states_unchecked(out, lse, sel_out.to(out.dtype), sel_lse)
    return (*merged, indices) if return_indices else merged


def attend_chunk_with_selection(query: torch.Tensor, layer, attention_mask, policy: SelectionPolicy, scale: float):
    """A prefill chunk (``q_len >= 1`` new tokens, already appended to ``layer``) of a
    :class:`SelectionPolicy` with ``prefill="retrieval"`` (see :mod:`lckv.policies.selection`).

    The resident sink and recent tokens (the window and the chunk itself) are attended exactly
    under the causal mask; of the offloaded store, each block of ``policy.prefill_block`` queries
    attends the ``policy.prefill_select`` rows per kv head that ``policy.select_blocks`` picks for
    the block's mean query (every store row precedes the chunk, so no causal mask is needed there);
    with the policy's estimate of the rows a block does not attend (``policy.estimate_blocks``,
    per query), the parts merge by LSE. The prompt's last ``policy.prefill_exact_tail`` positions
    attend the whole store exactly instead (the states the first generated token reads; which
    queries those are: :func:`_exact_queries`). A store of at most ``prefill_select`` rows is
    attended whole, which makes the chunk exact. Returns ``(out, lse)`` like :func:`attend_segments`.
    """
    store = layer.store
    q_len = query.shape[2]
    q_start = layer.total - q_len
    n_sink = layer.sink_k.shape[2]
    resident, keys, values = layer.resident_segments(), store.keys, store.values
    if torch.is_grad_enabled() and query.requires_grad:
        # a training forward (e.g. training/retrolm.py's stage 2): the cache writes its buffers in
        # place after this call (the chunk spills), so autograd gets copies of what it reads
        resident = [Segment(seg.k.clone(), seg.v.clone(), seg.start) for seg in resident]
        keys, values = keys.clone(), values.clone()
    out, lse = attend_segments(query, resident, q_start, attention_mask, policy, scale)
    n_select = policy.prefill_select
    if n_select >= store.length:
        part = attend_segments(query, [Segment(keys, values, n_sink)], q_start, attention_mask, policy, scale)
        return merge_states_unchecked(out, lse, *part)
    state = layer.selection_state()
    lo, hi = _exact_queries(layer.prompt_end, q_start, q_len, policy.prefill_exact_tail)
    if hi > lo:  # the prompt's last positions attend the whole store exactly
        exact_mask = attention_mask[:, :, lo:hi] if isinstance(attention_mask, torch.Tensor) else attention_mask
        exact = attend_segments(query[:, :, lo:hi], [Segment(keys, values, n_sink)], q_start + lo, exact_mask,
                                policy, scale)
        if hi - lo == q_len:
            return merge_states_unchecked(out, lse, *exact)
    view = layer.view()
    batch, q_heads, _, head_dim = query.shape
    block = policy.prefill_block
    if hi == q_len:  # the exact queries end the call: the others come before them
        q_len = lo
    query = query[:, :, :q_len]  # the queries that attend selected rows (and the exact ones amid them)
    m = -(-q_len // block)
    q = query.to(keys.device)
    means = torch.stack([q[:, :, j * block:(j + 1) * block].float().mean(dim=2) for j in range(m)], dim=2)
    indices = _drop_pad_rows(policy.select_blocks(state, view, means, n_select, scale, queries=q), view.padding)
    valid = indices >= 0  # [batch, kv_heads, m, n]
    padded = torch.nn.functional.pad(q, (0, 0, 0, m * block - q_len)) if m * block != q_len else q
    blocks = padded.reshape(batch, q_heads, m, block, head_dim)
    sel_out, sel_lse = _attend_selected_rows(blocks, keys, values, indices, valid, scale)
    rest = policy.estimate_blocks(state, view, blocks, indices, scale)
    if rest is not None:  # the rows the blocks do not attend, estimated per query
        sel_out, sel_lse = merge_states_unchecked(sel_out, sel_lse, *rest)
    sel_out = sel_out.reshape(batch, q_heads, m * block, head_dim)[:, :, :q_len].to(query.device, out.dtype)
    sel_lse = sel_lse.reshape(batch, q_heads, m * block)[:, :, :q_len].to(query.device)
    if hi > lo:
        sel_out = torch.cat([sel_out[:, :, :lo], exact[0].to(out.dtype), sel_out[:, :, hi:]], dim=2)
        sel_lse = torch.cat([sel_lse[:, :, :lo], exact[1], sel_lse[:, :, hi:]], dim=2)
    return merge_states_unchecked(out, lse, sel_out, sel_lse)


def _exact_queries(prompt_end: int | None, q_start: int, q_len: int, tail: int) -> tuple[int, int]:
    """The queries ``[lo, hi)`` of a prefill call (positions ``q_start .. q_start + q_len - 1``)
    that attend the whole store exactly under ``prefill_exact_tail = tail``: where the cache knows
    where the prompt ends (``prompt_end``, :attr:`lckv.cache.LckvCache.prompt_end`), those of the
    prompt's last ``tail`` positions -- none in the calls of a long prompt that end earlier (the
    exact part costs O(tail x context) once) or come after it (teacher-forced tokens attend as
    decoding would); otherwise the call's own last ``tail`` queries (any call might end the prompt)."""
    if tail <= 0:
        return 0, 0
    if prompt_end is None:
        return max(0, q_len - tail), q_len
    lo, hi = max(0, prompt_end - tail - q_start), min(q_len, prompt_end - q_start)
    return (lo, hi) if lo < hi else (0, 0)


def _drop_pad_rows(indices: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """``indices`` ``[batch, kv_heads, ...]`` of store rows with the pad rows (``padding``
    ``[batch, rows]`` False) replaced by -1, so that no pad slot is attended."""
    if padding is None:
        return indices
    flat = indices.flatten(2)
    real = torch.gather(padding.to(indices.device)[:, None, :].expand(-1, flat.shape[1], -1), 2, flat.clamp(min=0))
    return indices.masked_fill(~real.view_as(indices), -1)


def _attend_selected_rows(blocks: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                          valid: torch.Tensor, scale: float):
    """Blocks of queries ``[batch, q_heads, m, block, D]`` over the store rows ``indices``
    ``[batch, kv_heads, m, n]`` of their block (``valid`` False: not attended), in fp32 whatever
    the store's dtype; returns ``(out [batch, q_heads, m, block, D], lse [batch, q_heads, m, block])``.

    Each (batch row, block, kv head) is one item of a fused attention call
    (:func:`~lckv.ops.dense_attention.attention_with_lse_unchecked`, torch's flash kernel on the CPU)
    with its query group as heads and ``valid`` as key padding; blocks go in batches whose gathered
    rows stay within :data:`SCORE_BLOCK_ELEMENTS` scores."""
    batch, q_heads, m, block, head_dim = blocks.shape
    kv_heads, n = keys.shape[1], indices.shape[-1]
    group = q_heads // kv_heads
    per_batch = max(1, SCORE_BLOCK_ELEMENTS // max(1, batch * q_heads * block * n))
    grouped = blocks.float().reshape(batch, kv_heads, group, m, block, head_dim)
    outs, lses = [], []
    for lo in range(0, m, per_batch):
        hi = min(m, lo + per_batch)
        b = hi - lo
        flat = indices[:, :, lo:hi].clamp(min=0).flatten(2).unsqueeze(-1).expand(-1, -1, -1, head_dim)
        k_sel = torch.gather(keys, 2, flat).float().view(batch, kv_heads, b, n, head_dim)
        v_sel = torch.gather(values, 2, flat).float().view(batch, kv_heads, b, n, head_dim)
        items = batch * b * kv_heads  # one item per (batch row, block, kv head)
        q_items = grouped[:, :, :, lo:hi].permute(0, 3, 1, 2, 4, 5).reshape(items, group, block, head_dim)
        k_items = k_sel.transpose(1, 2).reshape(items, 1, n, head_dim)
        v_items = v_sel.transpose(1, 2).reshape(items, 1, n, head_dim)
        padding = valid[:, :, lo:hi].transpose(1, 2).reshape(items, n)
        out, lse = attention_with_lse_unchecked(q_items, k_items, v_items, False, padding, scale)
        outs.append(out.view(batch, b, kv_heads, group, block, head_dim).permute(0, 2, 3, 1, 4, 5)
                    .reshape(batch, q_heads, b, block, head_dim))
        lses.append(lse.view(batch, b, kv_heads, group, block).permute(0, 2, 3, 1, 4).reshape(batch, q_heads, b, block))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
