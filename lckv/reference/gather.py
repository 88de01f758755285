"""Pure PyTorch oracle of the offload path's gather: the selected rows of a (host) K/V store, as
one dense block on the device that attends them."""
from __future__ import annotations

import torch

from lckv.checks import check_data, check_tensor

__all__ = ["gather_rows"]


def check_gather_inputs(src, indices):
    check_tensor(src, "src", 4, "[batch, heads, seq, head_dim]")
    check_tensor(indices, "indices", 3, "[batch, heads, n]", dtypes=(torch.int64,))
    if indices.shape[:2] != src.shape[:2]:
        raise ValueError(f"indices must have batch and heads {tuple(src.shape[:2])} like src, got {tuple(indices.shape)}")
    check_data(indices, "indices")
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < -1 or high >= src.shape[2]:
            raise ValueError(f"indices must lie in [-1, seq = {src.shape[2]}) (-1: no row), got values in [{low}, {high}]")


def gather_rows(src, indices):
    """``dst[b, h, j] = src[b, h, indices[b, h, j]]``, zeros where ``indices[b, h, j] == -1``.

    Parameters
    ----------
    src : ``[batch, heads, seq, head_dim]`` float rows, on any device (the offloaded store: host
        memory, pinned for the CUDA kernel).
    indices : ``[batch, heads, n]`` int64 in ``[-1, seq)``; its device is the result's.

    Returns
    -------
    dst : ``[batch, heads, n, head_dim]``, ``src``'s dtype, on ``indices``' device.
    """
    check_gather_inputs(src, indices)
    if src.shape[2] == 0:  # an empty store: every index is -1
        return torch.zeros(*indices.shape, src.shape[3], dtype=src.dtype, device=indices.device)
    rows = src.to(indices.device)
    index = indices.clamp(min=0).unsqueeze(-1).expand(-1, -1, -1, src.shape[3])
    out = torch.gather(rows, 2, index)
    return out.masked_fill((indices < 0).unsqueeze(-1), 0)
