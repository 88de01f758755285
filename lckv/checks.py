"""Argument checks shared by the reference ops and the public ops.

Every failure raises :class:`ValueError` or :class:`TypeError` naming the argument and what was
expected, before any work is done.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: the dtypes the torch references of the retrieval ops compute in (the C++ kernels take FLOAT_DTYPES)
ANY_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)


def check_tensor(t, name: str, ndim: int | None = None, layout: str = "", dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {tuple(t.shape)}")


def check_data(t: torch.Tensor, name: str):
    """A check that reads values needs them: a meta tensor has shapes only."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shapes only, no data): lckv ops compute on tensors with data")


def check_finite(t: torch.Tensor, name: str):
    check_data(t, name)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_scale(scale, optional: bool = True):
    """``scale``: a finite real number (or a one-element tensor); None too when ``optional`` (the
    default ``1/sqrt(head_dim)``)."""
    if scale is None and optional:
        return
    real = isinstance(scale, numbers.Real) or (isinstance(scale, torch.Tensor) and scale.numel() == 1)
    if isinstance(scale, bool) or not real:
        raise TypeError(f"scale must be a finite real number{' or None' if optional else ''}, "
                        f"got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {float(scale)!r}")


def check_int(value, name: str, minimum: int | None = None):
    """``value`` an int (not a bool), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


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
            fits = torch.broadcast_shapes(mask.shape, target) == target  # to the target, not beyond it
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {target}")


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
    check_data(indices, "indices")
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
        check_data(t, name)
        if t.numel() and bool((torch.isnan(t) | (t == float("inf"))).any()):
            raise ValueError(f"{name} contains NaN or +inf (-inf, an empty part, is allowed)")
    check_finite(out_a, "out_a")
    check_finite(out_b, "out_b")


def check_cluster_state(centroids, counts, value_sums):
    """The estimate's clusters: ``centroids``/``value_sums`` ``[batch, kv_heads, clusters,
    head_dim]`` and ``counts`` ``[batch, kv_heads, clusters]``, float32 (the C++ kernels' rule)."""
    check_tensor(centroids, "centroids", 4, "[batch, kv_heads, clusters, head_dim]", dtypes=(torch.float32,))
    check_tensor(counts, "counts", 3, "[batch, kv_heads, clusters]", dtypes=(torch.float32,))
    check_tensor(value_sums, "value_sums", 4, "[batch, kv_heads, clusters, head_dim]", dtypes=(torch.float32,))
    if counts.shape != centroids.shape[:3]:
        raise ValueError(f"counts must have shape {tuple(centroids.shape[:3])}, got {tuple(counts.shape)}")
    if value_sums.shape != centroids.shape:
        raise ValueError(f"value_sums must have shape {tuple(centroids.shape)}, got {tuple(value_sums.shape)}")


def check_group_query(q, batch: int, kv_heads: int, head_dim: int):
    """``q [batch, kv_heads * group, head_dim]`` (one decode query per head)."""
    if q.shape[0] != batch or q.shape[2] != head_dim or kv_heads == 0 or q.shape[1] % kv_heads:
        raise ValueError(f"q must have shape [{batch}, kv_heads * group, {head_dim}] with kv_heads = {kv_heads}, "
                         f"got {tuple(q.shape)}")


def check_row_ids(ids, name: str, rows: int):
    """int64 row ids in ``[-1, rows)`` (-1 = none)."""
    check_data(ids, name)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= rows):
        raise ValueError(f"{name} must be row ids in [0, {rows}) or -1, got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")


def check_estimate_inputs(q, centroids, counts, value_sums, assign, values, indices, scale, values_too: bool = True):
    """Arguments of :func:`lckv.ops.centroid_estimate`; ``values_too=False`` checks types, shapes,
    devices, q and scale only (the C++ kernel checks the ids itself, with the same errors)."""
    check_tensor(q, "q", 3, "[batch, q_heads, head_dim]", dtypes=ANY_FLOAT_DTYPES)
    check_cluster_state(centroids, counts, value_sums)
    check_tensor(assign, "assign", 3, "[batch, kv_heads, rows]", dtypes=(torch.int64,))
    check_tensor(values, "values", 4, "[batch, kv_heads, rows, head_dim]", dtypes=ANY_FLOAT_DTYPES)
    check_tensor(indices, "indices", 3, "[batch, kv_heads, n]", dtypes=(torch.int64,))
    check_same_device({"q": q, "centroids": centroids, "counts": counts, "value_sums": value_sums, "assign": assign,
                       "values": values, "indices": indices})
    batch, kv_heads, _, head_dim = centroids.shape
    check_group_query(q, batch, kv_heads, head_dim)
    if values.shape[:2] != (batch, kv_heads) or values.shape[3] != head_dim:
        raise ValueError(f"values must have shape [{batch}, {kv_heads}, rows, {head_dim}], got {tuple(values.shape)}")
    rows = values.shape[2]
    if assign.shape != (batch, kv_heads, rows):
        raise ValueError(f"assign must have shape [{batch}, {kv_heads}, {rows}] (one cluster per offloaded row), "
                         f"got {tuple(assign.shape)}")
    if indices.shape[:2] != (batch, kv_heads):
        raise ValueError(f"indices must have shape [{batch}, {kv_heads}, n], got {tuple(indices.shape)}")
    check_scale(scale, optional=False)
    check_finite(q, "q")
    if values_too:
        check_row_ids(indices, "indices", rows)
        retrieved = assign.gather(2, indices.clamp(min=0))[indices >= 0] if rows else assign.new_empty(0)
        clusters = centroids.shape[2]
        if retrieved.numel() and (int(retrieved.min()) < 0 or int(retrieved.max()) >= clusters):
            raise ValueError(f"assign must hold cluster ids in [0, {clusters}) for the retrieved rows, got values in "
                             f"[{int(retrieved.min())}, {int(retrieved.max())}]")


def check_estimate_add_inputs(keys, values, valid, centroids, half_norms, counts, value_sums, values_too: bool = True):
    """Arguments of :func:`lckv.ops.estimate_add_rows` (checked before anything changes);
    ``values_too`` as in :func:`check_estimate_inputs` (here: the keys' NaN/inf scan)."""
    check_tensor(keys, "keys", 4, "[batch, kv_heads, n, head_dim]", dtypes=ANY_FLOAT_DTYPES)
    check_tensor(values, "values", 4, "[batch, kv_heads, n, head_dim]", dtypes=ANY_FLOAT_DTYPES)
    if values.shape != keys.shape:
        raise ValueError(f"values must have the shape of keys {tuple(keys.shape)}, got {tuple(values.shape)}")
    check_cluster_state(centroids, counts, value_sums)
    check_tensor(half_norms, "half_norms", 3, "[batch, kv_heads, clusters]", dtypes=(torch.float32,))
    named = {"keys": keys, "values": values, "centroids": centroids, "half_norms": half_norms, "counts": counts,
             "value_sums": value_sums}
    batch, kv_heads, n, head_dim = keys.shape
    if valid is not None:
        check_tensor(valid, "valid", 2, "[batch, n]", dtypes=(torch.bool,))
        if valid.shape != (batch, n):
            raise ValueError(f"valid must have shape [{batch}, {n}], got {tuple(valid.shape)}")
        named["valid"] = valid
    check_same_device(named)
    if centroids.shape[:2] != (batch, kv_heads) or centroids.shape[3] != head_dim:
        raise ValueError(f"centroids must have shape [{batch}, {kv_heads}, clusters, {head_dim}] (the keys' batch, "
                         f"kv heads and head_dim), got {tuple(centroids.shape)}")
    if centroids.shape[2] == 0:
        raise ValueError(f"centroids must hold at least one cluster, got shape {tuple(centroids.shape)}")
    if half_norms.shape != counts.shape:
        raise ValueError(f"half_norms must have shape {tuple(counts.shape)}, got {tuple(half_norms.shape)}")
    if values_too:
        check_finite(keys, "keys")


def check_group_rank_inputs(q, keys, candidates, rest_lse, scale, n_select, values_too: bool = True):
    """Arguments of :func:`lckv.ops.rank_by_group_probability`; ``values_too`` as in
    :func:`check_estimate_inputs` (here: the candidates' range)."""
    check_tensor(q, "q", 3, "[batch, q_heads, head_dim]", dtypes=ANY_FLOAT_DTYPES)
    check_tensor(keys, "keys", 4, "[batch, kv_heads, rows, head_dim]", dtypes=ANY_FLOAT_DTYPES)
    named = {"q": q, "keys": keys}
    batch, kv_heads, rows, head_dim = keys.shape
    check_group_query(q, batch, kv_heads, head_dim)
    if candidates is not None:
        check_tensor(candidates, "candidates", 3, "[batch, kv_heads, n_candidates]", dtypes=(torch.int64,))
        if candidates.shape[:2] != (batch, kv_heads):
            raise ValueError(f"candidates must have shape [{batch}, {kv_heads}, n_candidates], got "
                             f"{tuple(candidates.shape)}")
        named["candidates"] = candidates
    if rest_lse is not None:
        check_tensor(rest_lse, "rest_lse", 2, "[batch, q_heads]", dtypes=ANY_FLOAT_DTYPES)
        if rest_lse.shape != q.shape[:2]:
            raise ValueError(f"rest_lse must have shape {tuple(q.shape[:2])}, got {tuple(rest_lse.shape)}")
        check_data(rest_lse, "rest_lse")
        if rest_lse.numel() and bool((torch.isnan(rest_lse) | (rest_lse == float("inf"))).any()):
            raise ValueError("rest_lse contains NaN or +inf (-inf, no mass outside the candidates, is allowed)")
        named["rest_lse"] = rest_lse
    check_same_device(named)
    check_scale(scale)
    check_int(n_select, "n_select", 1)
    check_finite(q, "q")
    if values_too and candidates is not None:
        check_row_ids(candidates, "candidates", rows)


def check_kmeans_inputs(points, init, iterations, values_too: bool = True):
    """Arguments of :func:`lckv.ops.kmeans`; ``values_too`` as in :func:`check_estimate_inputs`
    (here: the init positions and the points' NaN/inf scan)."""
    check_tensor(points, "points", 3, "[heads, n, dim]", dtypes=ANY_FLOAT_DTYPES)
    check_tensor(init, "init", 1, "[n_clusters]", dtypes=(torch.int64,))
    check_same_device({"points": points, "init": init})
    check_int(iterations, "iterations", 0)
    n = points.shape[1]
    if points.shape[2] == 0:
        raise ValueError(f"points must have dim >= 1 in its last dimension, got shape {tuple(points.shape)}")
    if not values_too:
        return
    check_data(init, "init")
    if not 1 <= init.numel() <= n:
        raise ValueError(f"init must hold between 1 and n = {n} point positions, got {init.numel()}")
    if int(init.min()) < 0 or int(init.max()) >= n:
        raise ValueError(f"init must hold point positions in [0, {n}), got values in [{int(init.min())}, "
                         f"{int(init.max())}]")
    if init.unique().numel() != init.numel():
        raise ValueError("init must hold distinct positions")
    check_finite(points, "points")


def _check_kv_like_q(q, k, v, batch: int, head_dim: int):
    if head_dim == 0:  # no default scale 1/sqrt(head_dim), and no attention to compute
        raise ValueError(f"q must have head_dim >= 1, got shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must have one dtype, got k {k.dtype} and v {v.dtype}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must have batch {batch} and head_dim {head_dim} like q, got k {tuple(k.shape)}")


def _check_gqa(q_heads: int, kv_heads: int):
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
