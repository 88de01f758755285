"""Base of the policies that attend a per-head selection of the offloaded keys at decode time.

Every decode step attends three disjoint parts and merges them by log-sum-exp: the resident sink
and window (exact), the rows of the offloaded store that the policy selects for each kv head
(sparse attention: only those rows are read), and optionally an estimate of the rest
(:meth:`SelectionPolicy.estimate`). The selection structures are built from the offloaded store
at the first step that selects (:meth:`build`) and kept current as tokens spill
(:meth:`on_offload`).

Prefill (``prefill``): ``"exact"`` (default) attends every earlier token, so the selection state is
built at the first decode step over the whole prompt. ``"retrieval"`` makes a prompt fed in chunks
(``model.generate(..., prefill_chunk_size=n)``, or forward calls of n tokens on one cache) linear in
its length: each chunk attends the sink, the resident window and itself exactly; of the offloaded
store, each block of ``prefill_block`` consecutive queries attends the ``prefill_select`` rows per
kv head that :meth:`select` picks for the block's mean query; the parts merge by LSE. The
selection state is then built at the first chunk that finds rows offloaded, and every later chunk
joins it as it spills (:meth:`on_offload`), so decoding starts with nothing left to build. A store
no larger than ``prefill_select`` is attended whole (the chunk is exact). The prompt's last
``prefill_exact_tail`` positions (the states the first generated token reads) attend the whole
store exactly, once per prompt: ``generate`` tells the cache where the prompt ends
(:attr:`lckv.cache.LckvCache.prompt_end`; set it yourself when feeding a prompt in forward
calls). Without that, the last ``prefill_exact_tail`` queries of every call are exact (any call
might end the prompt), which makes a prompt of ``n`` chunks pay the exact tail ``n`` times.

Budget: ``budget`` is the number of keys each query attends in total — sink + window + selected —
either a token count (int >= 1) or a fraction of the context (float in (0, 1]). A budget at least
the context length attends everything and reproduces ``full`` exactly.

The budget rule (:meth:`SelectionPolicy.split_budget`): at context length ``n`` the budget is
``B = budget`` (a count) or ``ceil(budget * n)`` (a fraction). The resident part takes at most half
of it: the window attended is ``w = min(window, max(1, B // 2 - sink))`` tokens, so at least
``B - sink - w >= B / 2 - 1`` keys are always selected and the budget is never overspent. Tokens
outside the shrunken window are offloaded like any other and can be selected; as ``n`` grows the
window grows back to ``window``. A budget below ``sink + 2`` (no room for the current token and
one selected key) raises :class:`BudgetTooSmallError` naming both numbers: at configuration time
for a count, at the first decode step that meets it for a fraction.

GQA: the query heads of a group share one selection per kv head. ``snapkv``, ``quest`` and
``block`` rank keys by the group's summed logits ``sum_h q_h . k``; ``retrieval`` by default ranks
them by the group's summed attention probabilities (:mod:`lckv.policies.group_rank`).

The hooks see a layer only through a :class:`lckv.layer_view.LayerView`: the offloaded keys and
values with their padding, the resident sink + window, the recorded prefill queries, positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lckv.layer_view import LayerView
from lckv.policies.base import Policy, PolicyConfigError

__all__ = ["SelectionPolicy", "BudgetTooSmallError", "PREFILL_MODES", "unique_rows"]

#: how a :class:`SelectionPolicy` prefills (see the module docstring)
PREFILL_MODES = ("exact", "retrieval")


class BudgetTooSmallError(PolicyConfigError):
    """The budget cannot hold the sink, the current token and one selected key."""


@dataclass
class SelectionPolicy(Policy):
    """Abstract: subclasses implement :meth:`build`, :meth:`on_offload` and :meth:`select`.

    Defaults follow RetroInfer's resident part (4 sink + 64 recent tokens) and a 5% budget.
    """

    window: int = 64
    budget: float = 0.05
    prefill: str = "exact"
    prefill_select: int = 2048
    prefill_block: int = 64
    prefill_exact_tail: int = 256
    keeps_offloaded: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
            raise PolicyConfigError(f"{type(self).__name__}.budget must be a token count or a fraction, got {b!r}")
        if isinstance(b, int) and b < 1:
            raise PolicyConfigError(f"{type(self).__name__}.budget must be >= 1 token, got {b}")
        if isinstance(b, float) and not 0.0 < b <= 1.0:
            raise PolicyConfigError(f"{type(self).__name__}.budget as a fraction must be in (0, 1], got {b}")
        if isinstance(b, int):
            self.split_budget(b)  # a count too small for sink + 2 fails now, not at decode time
        if self.prefill not in PREFILL_MODES:
            raise PolicyConfigError(f"{type(self).__name__}.prefill must be one of {PREFILL_MODES}, got {self.prefill!r}")
        for name in ("prefill_select", "prefill_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolicyConfigError(f"{type(self).__name__}.{name} must be an int >= 1, got {value!r}")
        if self.prefill_exact_tail < 0:  # an int (Policy.validate)
            raise PolicyConfigError(f"{type(self).__name__}.prefill_exact_tail must be an int >= 0, "
                                    f"got {self.prefill_exact_tail}")

    def budget_tokens(self, context_len: int) -> int:
        """Total keys a query may attend when the context holds ``context_len`` tokens."""
        if isinstance(self.budget, float):
            return max(1, math.ceil(self.budget * context_len))
        return self.budget

    def split_budget(self, context_len: int) -> tuple[int, int, int]:
        """``(sink, window, selected)`` keys per query at ``context_len`` tokens (the budget rule of
        the module docstring); raises :class:`BudgetTooSmallError` when ``budget < sink + 2``."""
        total = self.budget_tokens(context_len)
        if total < self.sink + 2:
            what = f"{self.budget}" if isinstance(self.budget, int) else f"{self.budget} of {context_len} tokens = {total}"
            raise BudgetTooSmallError(
                f"{type(self).__name__}: a budget of {what} keys cannot hold the sink ({self.sink}), the current "
                f"token and one selected key (at least {self.sink + 2}); raise the budget or lower the sink")
        window = min(self.window, max(1, total // 2 - self.sink))
        return self.sink, window, total - self.sink - window

    def resident_window(self, context_len: int) -> int:
        """The window the cache keeps resident at ``context_len`` tokens (see :meth:`split_budget`).
        A context no longer than the budget keeps the configured window (nothing to select yet)."""
        if self.budget_tokens(context_len) >= context_len:
            return self.window
        return self.split_budget(context_len)[1]

    # --- hooks: each sees the layer only through a LayerView (lckv.layer_view) ----------------
    def build(self, view: LayerView):
        """Selection state of a layer, from its offloaded rows (and recorded queries)."""
        raise NotImplementedError

    def on_offload(self, state, view: LayerView, first_row: int, n_rows: int) -> None:
        """Offloaded rows ``[first_row, first_row + n_rows)`` were appended after :meth:`build`."""
        raise NotImplementedError

    def select(self, state, view: LayerView, q: torch.Tensor, n_select: int, scale: float | None = None) -> torch.Tensor:
        """Offloaded rows to attend: ``q`` ``[batch, q_heads, head_dim]`` -> int64
        ``[batch, kv_heads, <= n_select]`` (-1 = none), with ``0 < n_select < view.length``.
        ``scale`` is the attention's softmax scale (None: ``head_dim ** -0.5``)."""
        raise NotImplementedError

    def select_blocks(self, state, view: LayerView, q: torch.Tensor, n_select: int,
                      scale: float | None = None, queries: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`select` for ``m`` queries at once (a retrieval prefill's block queries):
        ``q`` ``[batch, q_heads, m, head_dim]`` -> int64 ``[batch, kv_heads, m, n]`` (-1 =
        none), ``n >= n_select``. ``queries`` ``[batch, q_heads, q_len, head_dim]`` are the
        chunk's own queries the blocks average (a policy may add rows they pick; this default
        ignores them). The default calls :meth:`select` once per block; a policy with a batched
        search overrides it."""
        picks = []
        for j in range(q.shape[2]):
            rows = self.select(state, view, q[:, :, j], n_select, scale)
            picks.append(torch.nn.functional.pad(rows, (0, n_select - rows.shape[-1]), value=-1))
        return torch.stack(picks, dim=2)

    def fused_step(self, state, view: LayerView, q: torch.Tensor, n_select: int, scale: float | None):
        """Optional: the whole decode step of this policy in one call, ``(out [batch, q_heads,
        head_dim] float32, lse [batch, q_heads], indices [batch, kv_heads, n])`` for ``q`` ``[batch,
        q_heads, head_dim]`` over the resident rows and the ``n_select`` selected store rows (plus
        the estimate), equal to what :meth:`select`, sparse attention, :meth:`estimate` and the
        merges give. Called only without padding or policy masks and with ``0 < n_select < store
        rows``; None (the default) when the policy or the inputs have no fused form."""
        return None

    def estimate(self, state, view: LayerView, q: torch.Tensor, indices: torch.Tensor, scale: float):
        """Optional partial state ``(out, lse)`` ``[batch, q_heads, head_dim]``/``[batch, q_heads]``
        approximating the store rows *not* in ``indices``; None when the policy has no estimate."""
        return None

    def estimate_blocks(self, state, view: LayerView, q: torch.Tensor, indices: torch.Tensor, scale: float):
        """:meth:`estimate` for a retrieval prefill's blocks of queries ``[batch, q_heads, m,
        block, head_dim]`` sharing their rows ``indices`` ``[batch, kv_heads, m, n]``: ``(out
        [batch, q_heads, m, block, head_dim], lse [batch, q_heads, m, block])``, or None (the
        default) when the policy has no estimate."""
        return None


def rows_of_best_units(scores: torch.Tensor, unit: int, n_select: int, n_rows: int) -> torch.Tensor:
    """Rows of the best-scoring units (pages/blocks of ``unit`` rows, ``scores``
    ``[batch, kv_heads, units]``) until ``n_select`` rows are taken: ``ceil(n_select / unit)``
    units in score order, the last one cut to the budget. Returns ascending row ids
    ``[batch, kv_heads, <= n_select]``, -1 (last) where the units run out of rows."""
    n_units = min(scores.shape[-1], -(-n_select // unit))
    best = scores.topk(n_units, dim=-1).indices  # descending score
    rows = best.unsqueeze(-1) * unit + torch.arange(unit, device=scores.device)
    rows = rows.masked_fill(rows >= n_rows, -1).flatten(2)
    # valid rows first (stable: score order kept), then cut to the budget
    order = torch.sort((rows < 0).to(torch.int8), dim=-1, stable=True).indices
    rows = torch.gather(rows, -1, order)[..., :n_select]
    keyed = rows.masked_fill(rows < 0, n_rows).sort(dim=-1).values
    return keyed.masked_fill(keyed >= n_rows, -1)


def unique_rows(indices: torch.Tensor) -> torch.Tensor:
    """``indices`` (row ids, -1 = none) sorted along the last dim, every repeat of a row then
    replaced by -1: a union of selections that attends each row once."""
    rows = indices.sort(dim=-1).values
    repeat = torch.zeros_like(rows, dtype=torch.bool)
    repeat[..., 1:] = rows[..., 1:] == rows[..., :-1]
    return rows.masked_fill(repeat, -1)
