"""IVF (cluster) search over keys in device memory (:func:`lckv.reference.ivf_topk_scores`).
``cuda``: the centroids' best ``nprobe`` lists by the flat top-k scan, then csrc/cuda/topk_scan.cu's
list scan (one block per query head, probed list and tile of 128 positions), then ``torch.topk``
over the candidates."""
from __future__ import annotations

import torch

from lckv import reference
from lckv._extension import compiled
from lckv.backends import resolve_backend
from lckv.reference.ivf import check_ivf_inputs, ivf_layout

__all__ = ["ivf_topk_scores", "ivf_layout"]


def ivf_topk_scores(q, centroids, list_keys, list_offsets, list_rows, nprobe: int, top_k: int,
                    backend: str = "auto"):
    """Same contract as :func:`lckv.reference.ivf_topk_scores` (ties may come in another order).
    Lay the keys out with :func:`ivf_layout`."""
    device = q.device if isinstance(q, torch.Tensor) else "cpu"
    name = resolve_backend("ivf_topk_scores", device, backend)
    if name == "reference":
        return reference.ivf_topk_scores(q, centroids, list_keys, list_offsets, list_rows, nprobe, top_k)
    check_ivf_inputs(q, centroids, list_keys, list_offsets, list_rows, nprobe, top_k)
    from lckv.ops.scoring import flat_topk_scores

    probes = flat_topk_scores(q, centroids, nprobe, backend="cuda")[1]
    longest = int(list_offsets.diff(dim=-1).max()) if list_offsets.shape[-1] > 1 else 0
    return compiled("ivf_topk_scores_cuda").ivf_topk_scores_cuda(q.float(), list_keys, list_offsets, list_rows, probes,
                                                                 longest, top_k)
