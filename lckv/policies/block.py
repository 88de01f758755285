"""InfLLM-style block retrieval: blocks of offloaded keys scored by representative keys."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lckv.policies.base import PolicyConfigError, register_policy
from lckv.policies.group_rank import group_sum
from lckv.policies.selection import SelectionPolicy, rows_of_best_units

__all__ = ["BlockPolicy"]


@dataclass
class _BlockState:
    reps: torch.Tensor  # [batch, kv_heads, blocks, representatives, head_dim]
    rep_valid: torch.Tensor  # [batch, kv_heads, blocks, representatives] bool


@register_policy
@dataclass
class BlockPolicy(SelectionPolicy):
    """Offloaded keys form blocks of ``block_size`` rows (the trailing block may be partial). Each
    block keeps ``representatives`` keys: those the most recent queries (the last ``observation``
    queries seen when the block was formed: prompt queries at build time, decode queries later)
    attend to most, as InfLLM does with its local-window queries. A step scores each block by the
    group's summed query against its representatives (the sum over representatives, InfLLM's
    relevance) and attends the best blocks until ``budget - sink - window`` rows are taken (the
    last block cut to the budget).
    """

    block_size: int = 32
    representatives: int = 4
    observation: int = 32

    name = "block"
    # on_offload reads the recent queries of its time, which a replay cannot supply
    replays_state = False
    state_type = _BlockState

    def validate(self) -> None:
        super().validate()
        for field_name in ("block_size", "representatives", "observation"):
            if getattr(self, field_name) < 1:
                raise PolicyConfigError(f"BlockPolicy.{field_name} must be >= 1, got {getattr(self, field_name)}")
        if self.representatives > self.block_size:
            raise PolicyConfigError(
                f"BlockPolicy.representatives ({self.representatives}) must not exceed block_size ({self.block_size})")

    def recorded_queries(self):
        return (0, self.observation)

    def _representatives(self, view, first_block: int):
        keys = view.keys[:, :, first_block * self.block_size:].float()
        batch, kv_heads, rows, head_dim = keys.shape
        blocks = -(-rows // self.block_size)
        pad = blocks * self.block_size - rows
        padded = torch.cat([keys, keys.new_zeros(batch, kv_heads, pad, head_dim)], dim=2)
        padded = padded.reshape(batch, kv_heads, blocks, self.block_size, head_dim)
        valid = torch.arange(blocks * self.block_size).reshape(blocks, self.block_size) < rows
        recent = view.recent_queries
        if recent is None:
            raise RuntimeError("BlockPolicy needs the prefill queries: prefill through this LckvCache first")
        q = group_sum(recent.float().sum(dim=2), kv_heads)  # summed over recent positions and the group
        relevance = torch.einsum("bhd,bhnsd->bhns", q, padded).masked_fill(~valid, float("-inf"))
        top = relevance.topk(self.representatives, dim=-1).indices  # [b, h, blocks, r]
        reps = torch.gather(padded, 3, top.unsqueeze(-1).expand(-1, -1, -1, -1, head_dim))
        rep_valid = torch.gather(valid.expand(batch, kv_heads, -1, -1), 3, top)
        return reps, rep_valid

    def build(self, view):
        return _BlockState(*self._representatives(view, 0))

    def on_offload(self, state, view, first_row, n_rows):
        first_block = first_row // self.block_size
        reps, valid = self._representatives(view, first_block)
        state.reps = torch.cat([state.reps[:, :, :first_block], reps], dim=2)
        state.rep_valid = torch.cat([state.rep_valid[:, :, :first_block], valid], dim=2)

    def select(self, state, view, q, n_select, scale=None):
        q_sum = group_sum(q, state.reps.shape[1])
        scores = torch.einsum("bhd,bhnrd->bhnr", q_sum, state.reps.float())
        scores = scores.masked_fill(~state.rep_valid, 0.0).sum(dim=-1)
        return rows_of_best_units(scores, self.block_size, n_select, view.length)
