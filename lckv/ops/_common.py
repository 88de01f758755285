"""Helpers shared by the public ops: light input checks and Triton launch utilities.

The hot ops do not scan the whole K/V cache for NaN (at a million tokens that pass would cost far
more than the op): they check q, the indices and the shapes up front, and check the *result* for
non-finite values afterwards, which catches NaN/inf in every row the op actually read.
"""
from __future__ import annotations

import torch

from lckv.checks import _check_gqa, check_finite, check_same_device, check_tensor


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_sparse_args(q, k, v, indices):
    """Shapes, dtypes, devices, GQA and index range of sparse attention; q must be finite."""
    check_tensor(q, "q", 3, "[batch, q_heads, head_dim]")
    check_tensor(k, "k", 4, "[batch, kv_heads, seq, head_dim]")
    check_tensor(v, "v", 4, "[batch, kv_heads, seq, head_dim]")
    check_tensor(indices, "indices", 3, "[batch, kv_heads, n_selected]", dtypes=(torch.int64,))
    check_same_device({"q": q, "k": k, "v": v, "indices": indices})
    batch, q_heads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must have one dtype, got k {k.dtype} and v {v.dtype}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must have batch {batch} and head_dim {head_dim} like q, got k {tuple(k.shape)}")
    _check_gqa(q_heads, k.shape[1])
    if indices.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"indices must have shape [batch={batch}, kv_heads={k.shape[1]}, n_selected], got {tuple(indices.shape)}")
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= k.shape[2]:
            raise ValueError(f"indices must lie in [-1, seq={k.shape[2]}) (-1 = no key), got values in [{lo}, {hi}]")
    check_finite(q, "q")


def check_attention_args(q, k, v):
    """Shapes, dtypes, devices and GQA of dense-layout attention; q must be finite."""
    check_tensor(q, "q", 4, "[batch, q_heads, q_len, head_dim]")
    check_tensor(k, "k", 4, "[batch, kv_heads, kv_len, head_dim]")
    check_tensor(v, "v", 4, "[batch, kv_heads, kv_len, head_dim]")
    check_same_device({"q": q, "k": k, "v": v})
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have batch {q.shape[0]} and head_dim {q.shape[3]} like q, got k {tuple(k.shape)}")
    _check_gqa(q.shape[1], k.shape[1])
    check_finite(q, "q")


def check_result(out, lse, read: str):
    """Raises if the op produced NaN/inf: the rows it read from ``read`` were not finite."""
    bad_lse = torch.isnan(lse) | (lse == float("inf"))
    if bool(bad_lse.any()) or not bool(torch.isfinite(out).all()):
        raise ValueError(f"{read} contains NaN or inf in the rows this op read")
    return out, lse


def default_scale(head_dim: int, scale) -> float:
    return 1.0 / head_dim ** 0.5 if scale is None else float(scale)
