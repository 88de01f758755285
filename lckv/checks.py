"""Argument checks shared by the reference ops and the public ops.

Every failure raises :class:`ValueError` or :class:`TypeError` naming the argument and what was
expected, before any work is done.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t, name: str, ndim: int | None = None, layout: str = "", dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {tuple(t.shape)}")


def check_finite(t: torch.Tensor, name: str):
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_same_device(named: dict):
    devices = {name: t.device for name, t in named.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"all tensors must be on one device, got {devices}")


def check_attention_inputs(q, k, v, mask=None, scan_kv: bool = True):
    """Dense-layout attention arguments. ``scan_kv=False`` skips the NaN/inf scan of k and v
    (the fast ops check their result instead: a full scan would cost more than the op)."""
    check_tensor(q, "q", 4, "[batch, q_heads, q_len, head_dim]")
    check_tensor(k, "k", 4, "[batch, kv_heads, kv_len, head_dim]")
    check_tensor(v, "v", 4, "[batch, kv_heads, kv_len, head_dim]")
    check_same_device({"q": q, "k": k, "v": v})
    batch, q_heads, _, head_dim = q.shape
    _check_kv_like_q(q, k, v, batch, head_dim)
    _check_gqa(q_heads, k.shape[1])
    for name, t in (("q", q), ("k", k), ("v", v)) if scan_kv else (("q", q),):
        check_finite(t, name)
    if mask is not None:
        check_tensor(mask, "mask", None, dtypes=None)
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be bool (True = attend) or floating (additive), got {mask.dtype}")
        target = (batch, q_heads, q.shape[2], k.shape[2])
        try:
            torch.broadcast_shapes(mask.shape, target)
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {target}") from None


def check_key_padding(key_padding, q, k):
    """``key_padding`` bool ``[batch, kv_len]`` on q's device."""
    if not isinstance(key_padding, torch.Tensor) or key_padding.dtype != torch.bool:
        raise TypeError(f"key_padding must be a bool tensor [batch, kv_len], got "
                        f"{getattr(key_padding, 'dtype', type(key_padding).__name__)}")
    if tuple(key_padding.shape) != (q.shape[0], k.shape[2]):
        raise ValueError(f"key_padding must have shape [batch={q.shape[0]}, kv_len={k.shape[2]}], "
                         f"got {tuple(key_padding.shape)}")
    if key_padding.device != q.device:
        raise ValueError(f"key_padding must be on q's device ({q.device}), got {key_padding.device}")


def check_sparse_inputs(q, k, v, indices, scan_kv: bool = True, values: bool = True):
    """Sparse-attention arguments; ``scan_kv`` as in :func:`check_attention_inputs`. ``values=False``
    checks types, shapes and devices only, for a kernel that itself checks the index range and
    q's finiteness with the same errors (the C++ op does, in one pass over the data)."""
    check_tensor(q, "q", 3, "[batch, q_heads, head_dim]")
    check_tensor(k, "k", 4, "[batch, kv_heads, seq, head_dim]")
    check_tensor(v, "v", 4, "[batch, kv_heads, seq, head_dim]")
    check_tensor(indices, "indices", 3, "[batch, kv_heads, n_selected]", dtypes=(torch.int64,))
    check_same_device({"q": q, "k": k, "v": v, "indices": indices})
    batch, q_heads, head_dim = q.shape
    _check_kv_like_q(q, k, v, batch, head_dim)
    _check_gqa(q_heads, k.shape[1])
    if indices.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"indices must have shape [batch={batch}, kv_heads={k.shape[1]}, n_selected], got {tuple(indices.shape)}")
    if not values:
        return
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= k.shape[2]:
            raise ValueError(f"indices must lie in [-1, seq={k.shape[2]}) (-1 = no key), got values in [{lo}, {hi}]")
    for name, t in (("q", q), ("k", k), ("v", v)) if scan_kv else (("q", q),):
        check_finite(t, name)


def check_states(out_a, lse_a, out_b, lse_b):
    check_tensor(out_a, "out_a")
    check_tensor(out_b, "out_b")
    check_tensor(lse_a, "lse_a")
    check_tensor(lse_b, "lse_b")
    check_same_device({"out_a": out_a, "lse_a": lse_a, "out_b": out_b, "lse_b": lse_b})
    if out_a.dim() < 1 or out_a.shape != out_b.shape:
        raise ValueError(f"out_a and out_b must share one shape [..., head_dim], got {tuple(out_a.shape)} and {tuple(out_b.shape)}")
    lead = out_a.shape[:-1]
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != lead:
            raise ValueError(f"{name} must have shape {tuple(lead)} (out's shape without head_dim), got {tuple(t.shape)}")
        if t.numel() and bool((torch.isnan(t) | (t == float("inf"))).any()):
            raise ValueError(f"{name} contains NaN or +inf (-inf, an empty part, is allowed)")
    check_finite(out_a, "out_a")
    check_finite(out_b, "out_b")


def _check_kv_like_q(q, k, v, batch: int, head_dim: int):
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must have one dtype, got k {k.dtype} and v {v.dtype}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must have batch {batch} and head_dim {head_dim} like q, got k {tuple(k.shape)}")


def _check_gqa(q_heads: int, kv_heads: int):
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
