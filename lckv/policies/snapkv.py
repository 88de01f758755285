"""SnapKV: keep the prompt keys the last prompt queries attend to most (Li et al., 2024)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lckv.policies.base import PolicyConfigError, register_policy
from lckv.policies.selection import SelectionPolicy

__all__ = ["SnapKVPolicy"]


@dataclass
class _SnapState:
    score: torch.Tensor  # [batch, kv_heads, rows] importance of each offloaded row


@register_policy
@dataclass
class SnapKVPolicy(SelectionPolicy):
    """At the end of prefill, the last ``observation`` prompt queries vote for the offloaded keys:
    each key's softmax weight (normalised over the whole prompt), summed over those queries and the
    group's heads, then smoothed by a 1-D ``pooling`` (``"max"``, ``"avg"`` or ``"none"``) of width
    ``kernel``. Each step attends the top ``budget - sink - window`` rows by that vote; rows that
    spill during decoding rank above every prompt row (recent tokens are kept first), as in SnapKV,
    which compresses the prompt only. The selection is static: it does not depend on the decode
    query.
    """

    observation: int = 32
    pooling: str = "max"
    kernel: int = 7

    name = "snapkv"

    def validate(self) -> None:
        super().validate()
        if self.observation < 1:
            raise PolicyConfigError(f"SnapKVPolicy.observation must be >= 1, got {self.observation}")
        if self.pooling not in ("max", "avg", "none"):
            raise PolicyConfigError(f"SnapKVPolicy.pooling must be 'max', 'avg' or 'none', got {self.pooling!r}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise PolicyConfigError(f"SnapKVPolicy.kernel must be odd and >= 1, got {self.kernel}")
        if self.prefill != "exact":
            raise PolicyConfigError("SnapKVPolicy.prefill must be 'exact': its selection is voted by the last "
                                    f"prompt queries, which a prefill in progress does not have (got {self.prefill!r})")

    def recorded_queries(self):
        return (0, self.observation)

    def build(self, view):
        obs = view.recent_queries
        if obs is None:
            raise RuntimeError("SnapKV needs the prefill queries: prefill through this LckvCache first")
        batch, q_heads, n_obs, head_dim = obs.shape
        kv_heads = view.keys.shape[1]
        group = q_heads // kv_heads
        scale = head_dim ** -0.5
        q = obs.float().reshape(batch, kv_heads, group * n_obs, head_dim)
        # logits over every key (resident and offloaded) so the softmax is normalised over the prompt
        parts = [view.resident_keys.to("cpu").float(), view.keys.float()]
        lse = torch.logsumexp(torch.cat([q @ k.transpose(-1, -2) for k in parts], dim=-1) * scale, dim=-1)
        weights = torch.exp((q @ view.keys.float().transpose(-1, -2)) * scale - lse.unsqueeze(-1))
        vote = weights.sum(dim=2)  # [batch, kv_heads, rows]
        if self.pooling != "none" and vote.shape[-1] > 1:
            pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
            flat = vote.reshape(batch * kv_heads, 1, -1)
            vote = pool(flat, self.kernel, stride=1, padding=self.kernel // 2).reshape(batch, kv_heads, -1)
        return _SnapState(vote)

    def on_offload(self, state, view, first_row, n_rows):
        batch, kv_heads, _ = state.score.shape
        new = torch.full((batch, kv_heads, n_rows), float("inf"))
        state.score = torch.cat([state.score, new], dim=-1)

    def select(self, state, view, q, n_select, scale=None):
        k = min(n_select, state.score.shape[-1])
        return state.score.topk(k, dim=-1).indices.sort(dim=-1).values
