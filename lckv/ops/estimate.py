"""Public ops of the retrieval policy's estimate of the non-retrieved keys (contract and math in
:mod:`lckv.reference.estimate`): ``centroid_estimate`` and ``estimate_add_rows``, with a backend
choice (``cpu``: the C++ kernels of lckv/centroid_estimate.h, which check their inputs;
``reference``: torch ops, any device). Types, shapes, devices, ``q`` and ``scale`` are checked here
for both; the ids and the NaN/inf scans are the kernel's, and are checked here for the reference:
the same ValueError/TypeError naming the argument either way, before anything changes."""
from __future__ import annotations

import torch

from lckv._extension import compiled
from lckv.checks import check_estimate_add_inputs, check_estimate_inputs
from lckv.ops._common import choose_backend, last_dim_contiguous
from lckv.reference import estimate as ref

__all__ = ["centroid_estimate", "estimate_add_rows"]


def centroid_estimate(q, centroids, counts, value_sums, assign, values, indices, scale: float,
                      lse_only: bool = False, backend: str = "auto"):
    """``(out [B, Hq, D] in q's dtype, lse [B, Hq])`` of the rows not in ``indices`` (just ``lse``
    with ``lse_only``); see :func:`lckv.reference.estimate.centroid_estimate`. The ``cpu`` kernel
    takes float32 ``q`` and float32, float16 or bfloat16 ``values`` (any row strides, read in
    place); other dtypes go to ``reference``."""
    check_estimate_inputs(q, centroids, counts, value_sums, assign, values, indices, scale, values_too=False)
    for name, t in (("centroids", centroids), ("counts", counts)):  # a NaN would silently drop the estimate
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf; expected the finite cluster state of the offloaded keys")
    supported = q.dtype == torch.float32 and values.dtype in (torch.float32, torch.float16, torch.bfloat16)
    name = choose_backend("centroid_estimate", q.device, backend, supported,
                          "q must be float32 and values float32, float16 or bfloat16")
    if name == "reference":
        check_estimate_inputs(q, centroids, counts, value_sums, assign, values, indices, scale)
        return ref.centroid_estimate(q, centroids, counts, value_sums, assign, values, indices, scale, lse_only)
    out, lse = compiled("centroid_estimate").centroid_estimate(
        q.contiguous(), centroids.contiguous(), counts.contiguous(), value_sums.contiguous(),
        last_dim_contiguous(assign), last_dim_contiguous(values), indices.contiguous(), float(scale), lse_only)
    return lse if lse_only else (out, lse)


def estimate_add_rows(keys, values, valid, centroids, half_norms, counts, value_sums, backend: str = "auto"):
    """New offloaded rows join the estimate's clusters (in place); returns their clusters
    ``[B, H, n]`` int64. See :func:`lckv.reference.estimate.estimate_add_rows`. A refused call
    leaves ``counts`` and ``value_sums`` as they were."""
    check_estimate_add_inputs(keys, values, valid, centroids, half_norms, counts, value_sums, values_too=False)
    name = choose_backend("estimate_add_rows", keys.device, backend, keys.is_floating_point(), "keys must be float")
    if name == "reference":
        check_estimate_add_inputs(keys, values, valid, centroids, half_norms, counts, value_sums)
        return ref.estimate_add_rows(keys, values, valid, centroids, half_norms, counts, value_sums)
    return compiled("estimate_add").estimate_add(keys.float().contiguous(), values.float().contiguous(), valid,
                                                 centroids, half_norms, counts, value_sums)
