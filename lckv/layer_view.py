"""The contract between the cache and the policies, in both directions.

:class:`LayerView` is everything a selection policy sees of one cache layer at a decode step (or
when its selection state is built): the offloaded keys and values with their padding, the resident
sink + window, the recorded prefill queries and the positions. Policies read nothing else of the
cache, so the cache can change its layout without touching them.

:class:`CachePolicy` is everything the cache (:mod:`lckv.cache`) needs of a policy: how many tokens
stay resident, whether spilled tokens are kept, which prefill queries to record, and the two hooks
that build and update the selection state. :class:`lckv.policies.Policy` implements it; the cache
never imports the policies package.

Positions are cache slots: slot ``i`` holds the ``i``-th token fed to the model (pad slots
included). The resident part is slots ``[0, n_sink)`` and the last ``n_recent`` slots; offloaded
row ``r`` is slot ``first_position + r`` (with ``first_position == n_sink``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["LayerView", "CachePolicy"]


@dataclass(frozen=True)
class LayerView:
    """One layer of an :class:`~lckv.cache.LckvCache` as a selection policy sees it.

    Attributes
    ----------
    keys, values : ``[batch, kv_heads, n, head_dim]`` the offloaded rows in slot order (host memory,
        the cache's dtype); views, never to be written.
    padding : ``[batch, n]`` bool, True for real tokens, or None when the batch has no padding.
    first_position : the slot of offloaded row 0 (the number of sink tokens).
    context_len : slots so far, the current token included.
    resident_keys, resident_values : ``[batch, kv_heads, n_sink + n_recent, head_dim]`` the sink
        then the recent window, on the compute device.
    n_sink : how many of the resident rows are the sink (the rest are the last slots).
    query_sample : ``[batch, q_heads, m, head_dim]`` a uniform sample of the prefill queries, or
        None (kept when the policy's ``recorded_queries()`` asks for a sample).
    recent_queries : ``[batch, q_heads, r, head_dim]`` the last prefill queries, or None.
    layer_idx : the layer's index in its cache.
    shared : a dict shared by every layer of one cache (a fresh one per cache), for policies whose
        layers depend on each other within a forward pass (RetroLM's bookmarks run through the
        layers in order); policies key their entries by their own name.
    """

    keys: torch.Tensor
    values: torch.Tensor
    padding: torch.Tensor | None
    first_position: int
    context_len: int
    resident_keys: torch.Tensor
    resident_values: torch.Tensor
    n_sink: int
    query_sample: torch.Tensor | None = None
    recent_queries: torch.Tensor | None = None
    layer_idx: int = 0
    shared: dict | None = None

    @property
    def length(self) -> int:
        """Offloaded rows."""
        return self.keys.shape[2]

    def valid_rows(self, first_row: int, n_rows: int) -> torch.Tensor:
        """``[batch, n_rows]`` bool (CPU): which offloaded rows ``[first_row, first_row + n_rows)``
        are real tokens (all of them without padding)."""
        batch = self.keys.shape[0]
        if self.padding is None:
            return torch.ones(batch, n_rows, dtype=torch.bool)
        pad = self.padding[:, first_row:first_row + n_rows].cpu()
        if pad.shape[1] < n_rows:  # rows spilled after the last padding update are real tokens
            pad = torch.cat([pad, torch.ones(batch, n_rows - pad.shape[1], dtype=torch.bool)], dim=1)
        return pad


@runtime_checkable
class CachePolicy(Protocol):
    """What :class:`~lckv.cache.LckvCache` needs of a policy (see the module docstring)."""

    sink: int
    keeps_offloaded: bool
    #: optional (default True): False makes the cache keep the selection state itself instead of
    #: replaying the hooks (:attr:`lckv.policies.Policy.replays_state`), with ``state_type``
    replays_state: bool
    #: host bytes a cache may hold, or None (LckvCache.max_host_bytes starts from it)
    max_host_bytes: int | None

    def resident_window(self, context_len: int) -> int:
        """Recent tokens (the current one included) kept resident at ``context_len`` tokens."""

    def recorded_queries(self) -> tuple[int, int] | None:
        """``(sample_capacity, recent_capacity)`` of prefill queries to record, or None."""

    def build(self, view: LayerView) -> Any:
        """The selection state of a layer, from its view (at the first decode step). Deterministic
        given the view and the global RNG state: the cache remakes a state by replaying
        :meth:`build` and :meth:`on_offload` (:class:`lckv.cache.SelectionLog`)."""

    def on_offload(self, state: Any, view: LayerView, first_row: int, n_rows: int) -> None:
        """Offloaded rows ``[first_row, first_row + n_rows)`` arrived after :meth:`build` (the view's
        last rows). Reads only the view's offloaded rows, padding, positions, ``layer_idx`` and
        ``shared``: a replay passes the resident part and ``context_len`` of the replay's time."""
