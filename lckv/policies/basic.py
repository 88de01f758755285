"""The exact baseline (``full``) and StreamingLLM (``streaming``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lckv.policies.base import Policy, register_policy

__all__ = ["FullPolicy", "StreamingPolicy"]


@register_policy
@dataclass
class FullPolicy(Policy):
    """Exact attention over every token. Tokens leaving the window are offloaded to host memory
    and still attended exactly, so outputs equal dense attention (the reference for all others)."""

    name = "full"
    keeps_offloaded = True


@register_policy
@dataclass
class StreamingPolicy(Policy):
    """StreamingLLM: each query at position ``p`` attends the sink slots ``[0, sink)`` and the
    window ``(p - window, p]``; tokens leaving the window are evicted.

    Positions are cache slots: with left padding, pad slots count towards the sink (and are masked),
    so a padded row has fewer real sink tokens.
    """

    name = "streaming"
    keeps_offloaded = False

    def in_reach(self, k_first: int, k_last: int, q_first: int, q_last: int) -> bool:
        return k_first < self.sink or k_last > q_first - self.window

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        q = q_pos.unsqueeze(1)
        k = k_pos.unsqueeze(0)
        return (k < self.sink) | (k > q - self.window)
