"""Reference of the one k-means of lckv (csrc/include/lckv/kmeans.h): Lloyd's algorithm in L2."""
from __future__ import annotations

import torch

__all__ = ["kmeans"]


def kmeans(points: torch.Tensor, init: torch.Tensor, iterations: int):
    """Lloyd's k-means of each head's ``points [heads, n, dim]`` from the points at positions
    ``init [n_clusters]`` (int64, distinct, the same in every head): ``iterations`` rounds of
    nearest-centroid assignment (L2, first centroid on ties) and centroid-to-mean moves (an empty
    cluster keeps its centroid), then a last assignment. Returns ``(centroids [heads, n_clusters,
    dim] float32, assign [heads, n] int64)``; ``iterations=0`` gives the initial points."""
    x = points.float()
    cent = x[:, init].clone()

    def nearest(c):
        return (x @ c.transpose(1, 2) - 0.5 * c.square().sum(-1)[:, None, :]).argmax(-1)

    for _ in range(iterations):
        assign = nearest(cent)
        sums = torch.zeros_like(cent).scatter_add_(1, assign[..., None].expand_as(x), x)
        counts = torch.zeros(cent.shape[:2]).scatter_add_(1, assign, torch.ones_like(x[..., 0]))
        cent = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], cent)
    return cent, nearest(cent)
