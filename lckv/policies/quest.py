"""Quest: query-aware page selection by per-page key bounds (Tang et al., 2024)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lckv.policies.base import PolicyConfigError, register_policy
from lckv.policies.group_rank import group_sum
from lckv.policies.selection import SelectionPolicy, rows_of_best_units

__all__ = ["QuestPolicy"]


@dataclass
class _QuestState:
    page_min: torch.Tensor  # [batch, kv_heads, pages, head_dim]
    page_max: torch.Tensor


@register_policy
@dataclass
class QuestPolicy(SelectionPolicy):
    """Offloaded keys are cut into pages of ``page_size`` rows; each page keeps the channel-wise
    min and max of its keys, and ``sum_d max(q_d min_d, q_d max_d)`` upper-bounds every logit in
    the page. Each step attends the pages with the highest bound of the group's summed query until
    ``budget - sink - window`` rows are taken (the last page cut to the budget). The trailing
    partial page is a page like the others.
    """

    page_size: int = 16

    name = "quest"

    def validate(self) -> None:
        super().validate()
        if self.page_size < 1:
            raise PolicyConfigError(f"QuestPolicy.page_size must be >= 1, got {self.page_size}")

    def build(self, view):
        from lckv.ops import page_key_bounds

        page_min, page_max = page_key_bounds(view.keys, self.page_size)
        return _QuestState(page_min, page_max)

    def on_offload(self, state, view, first_row, n_rows):
        from lckv.ops import page_key_bounds

        first_page = first_row // self.page_size
        keys = view.keys[:, :, first_page * self.page_size:]
        new_min, new_max = page_key_bounds(keys, self.page_size)
        state.page_min = torch.cat([state.page_min[:, :, :first_page], new_min], dim=2)
        state.page_max = torch.cat([state.page_max[:, :, :first_page], new_max], dim=2)

    def select(self, state, view, q, n_select, scale=None):
        from lckv.ops import quest_page_scores

        # the bound of the group's summed logit: the page bound of the summed query
        q_sum = group_sum(q, state.page_min.shape[1]).to(state.page_min.dtype)
        scores = quest_page_scores(q_sum, state.page_min, state.page_max)  # [batch, kv_heads, pages]
        return rows_of_best_units(scores, self.page_size, n_select, view.length)
