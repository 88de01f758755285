"""Public k-means op (the C++ k-means every lckv index uses, lckv/kmeans.h), with a backend choice
(``cpu``: float32 CPU points; ``reference``: :func:`lckv.reference.kmeans.kmeans`, any device)."""
from __future__ import annotations

import torch

from lckv._extension import compiled
from lckv.checks import check_kmeans_inputs
from lckv.ops._common import choose_backend
from lckv.reference.kmeans import kmeans as reference_kmeans

__all__ = ["kmeans"]


def kmeans(points, init, iterations: int, backend: str = "auto"):
    """Lloyd's k-means of ``points [heads, n, dim]`` from the points at positions ``init
    [n_clusters]``; returns ``(centroids [heads, n_clusters, dim] float32, assign [heads, n] int64)``.
    See :func:`lckv.reference.kmeans.kmeans`. The ``cpu`` kernel checks its inputs (shapes, NaN,
    distinct in-range positions) and runs the heads in parallel; the ``reference`` backend is given
    the same checks first (ValueError/TypeError naming the argument).

    >>> pts = torch.randn(2, 500, 16)
    >>> centroids, assign = kmeans(pts, torch.randperm(500)[:32], iterations=8)   # [2, 32, 16], [2, 500]
    """
    check_kmeans_inputs(points, init, iterations, values_too=False)
    name = choose_backend("kmeans", points.device, backend, points.dtype == torch.float32, "points must be float32")
    if name == "reference":
        check_kmeans_inputs(points, init, iterations)
        return reference_kmeans(points, init, iterations)
    return compiled("kmeans").kmeans(points.contiguous(), init, iterations)
