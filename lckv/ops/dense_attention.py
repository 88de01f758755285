"""Dense attention with log-sum-exp: the exact path of every policy (prefill, and ``full``).

The ``torch`` backend runs torch's fused CPU flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``), which streams the keys in blocks and returns
the log-sum-exp beside the output, so no ``[q_len, kv_len]`` score block is ever materialised and
the partial states still merge exactly by LSE. It reads GQA-shaped K/V (``kv_heads`` dividing
``q_heads``) and strided views directly, as long as the last dim has stride 1 (it ignores that
stride: a tensor whose last dim is not contiguous is copied first). What the kernel does not do,
this launcher does:

* causality is bottom-right aligned (the queries are the last ``q_len`` key positions): the keys
  before the queries are attended unmasked and the last ``q_len`` keys with the kernel's
  (top-left) causal flag, then the two states merge by LSE (in fp32 for 16-bit inputs, rounded
  once); with ``kv_len < q_len`` the first ``q_len - kv_len`` rows attend nothing;
* a row that attends to nothing gets ``out = 0`` and ``lse = -inf`` (the kernel reports lse 0,
  and divides by zero when ``kv_len == 0``; with ``q_len == 0`` it dies of SIGFPE, so neither
  reaches it);
* masks: only key-padding masks are taken (bool ``[batch, kv_len]``, True = attend); other masks
  go to the reference backend.

The ``reference`` backend (:func:`lckv.reference.attention_with_lse`) serves every device.
"""
from __future__ import annotations

import torch

from lckv.backends import resolve_backend
from lckv.checks import check_attention_inputs, check_key_padding, check_scale
from lckv.reference.attention import dense_attention_unchecked, merge_states_unchecked, with_key_padding

__all__ = ["attention_with_lse", "attention_with_lse_unchecked", "fused_attention_serves"]

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def attention_with_lse(q, k, v, causal: bool = False, mask=None, scale=None, key_padding=None,
                       backend: str = "auto"):
    """Dense attention returning ``(out, lse)``; the contract of
    :func:`lckv.reference.attention_with_lse`, plus ``key_padding``.

    ``key_padding`` ``[batch, kv_len]`` bool (True = real key) masks padded keys without a 4D mask;
    it may be combined with ``causal``. A general ``mask`` is served by the reference backend only
    (``backend="auto"`` picks it then). Shapes: ``q`` ``[batch, q_heads, q_len, head_dim]``, ``k``/``v``
    ``[batch, kv_heads, kv_len, head_dim]``; returns ``out`` like ``q`` and ``lse``
    ``[batch, q_heads, q_len]`` float32 (``-inf`` and ``out = 0`` for rows with no key).

    >>> q = torch.randn(1, 4, 3, 16); k = torch.randn(1, 2, 5, 16); v = torch.randn(1, 2, 5, 16)
    >>> out, lse = attention_with_lse(q, k, v, causal=True)
    """
    check_attention_inputs(q, k, v, mask)
    check_scale(scale)
    if key_padding is not None:
        check_key_padding(key_padding, q, k)
    if mask is not None:
        if backend == "auto":
            backend = "reference"
        if backend != "reference":
            raise ValueError(f"backend {backend!r} takes key_padding, not a general mask; use backend='reference'")
    chosen = resolve_backend("attention_with_lse", q.device, backend)
    if chosen == "torch" and fused_attention_serves(q, k, v):
        return _fused(q, k, v, causal, key_padding, scale)
    if chosen == "torch" and backend == "torch":
        raise ValueError(f"backend 'torch' needs q, k, v of one dtype in {_FUSED_DTYPES} on the CPU and no autograd, "
                         f"got {q.dtype}/{k.dtype}/{v.dtype}")
    return dense_attention_unchecked(q, k, v, causal, with_key_padding(mask, key_padding), scale)


def attention_with_lse_unchecked(q, k, v, causal: bool = False, key_padding=None, scale=None):
    """:func:`attention_with_lse` for validated inputs, best backend (the engine's exact path)."""
    if fused_attention_serves(q, k, v):
        return _fused(q, k, v, causal, key_padding, scale)
    return dense_attention_unchecked(q, k, v, causal, with_key_padding(None, key_padding), scale)


def fused_attention_serves(q, k, v) -> bool:
    """Whether torch's fused CPU kernel can take these tensors."""
    return (q.device.type == "cpu" and k.device.type == "cpu" and v.device.type == "cpu"
            and q.dtype in _FUSED_DTYPES and q.dtype == k.dtype == v.dtype and q.shape[-1] > 0
            # the kernel's lse has no gradient: training takes the reference
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def _kernel(q, k, v, causal: bool, key_padding, scale):
    """One call of torch's kernel (``causal`` only with ``q_len == kv_len``); rows with no allowed
    key -> (0, -inf)."""
    batch, q_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    if kv_len == 0 or q_len == 0:  # the kernel divides by zero on either (SIGFPE on q_len 0)
        return q.new_zeros(q.shape), q.new_full((batch, q_heads, q_len), float("-inf"), dtype=torch.float32)
    # the kernel reads the last dim as contiguous whatever its stride: other layouts give garbage
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = None
    if key_padding is not None:
        mask = torch.zeros(batch, 1, 1, kv_len, dtype=q.dtype, device=q.device)
        mask.masked_fill_(~key_padding[:, None, None, :], float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    if key_padding is not None:  # rows whose every allowed key is padding attend nothing
        if causal:  # row i sees keys 0..i
            empty = key_padding.cumsum(dim=1) == 0  # [batch, q_len]
        else:
            empty = (~key_padding.any(dim=1, keepdim=True)).expand(batch, q_len)
        if bool(empty.any()):
            empty = empty[:, None, :]
            out = out.masked_fill(empty.unsqueeze(-1), 0.0)
            lse = lse.masked_fill(empty, float("-inf"))
    return out, lse


def _fused(q, k, v, causal: bool, key_padding, scale):
    batch, q_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    if not causal or q_len == 0 or q_len == kv_len:
        return _kernel(q, k, v, causal, key_padding, scale)
    if q.dtype != torch.float32:  # two parts: merge unrounded fp32 states, round once
        out, lse = _fused(q.float(), k.float(), v.float(), causal, key_padding, scale)
        return out.to(q.dtype), lse
    if kv_len < q_len:  # the first q_len - kv_len queries precede every key
        lead = q_len - kv_len
        out_tail, lse_tail = _kernel(q[:, :, lead:], k, v, True, key_padding, scale)
        out = torch.cat([q.new_zeros(batch, q_heads, lead, q.shape[-1]), out_tail], dim=2)
        lse = torch.cat([lse_tail.new_full((batch, q_heads, lead), float("-inf")), lse_tail], dim=2)
        return out, lse
    prefix = kv_len - q_len
    pad_tail = None if key_padding is None else key_padding[:, prefix:]
    out, lse = _kernel(q, k[:, :, prefix:], v[:, :, prefix:], True, pad_tail, scale)
    if prefix:  # keys before the first query: every query sees them
        pad_head = None if key_padding is None else key_padding[:, :prefix]
        head = _kernel(q, k[:, :, :prefix], v[:, :, :prefix], False, pad_head, scale)
        out, lse = merge_states_unchecked(out, lse, *head)
    return out, lse
