"""RetroLM: pages of the offloaded store ranked by bookmark tokens (see :mod:`lckv.retrolm`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lckv.policies.base import PolicyConfigError, register_policy
from lckv.policies.selection import SelectionPolicy, rows_of_best_units

__all__ = ["RetroLMPolicy"]

_KEY = "retrolm"


@dataclass
class _RetroState:
    page_keys: torch.Tensor  # [batch, kv_heads, pages, head_dim] bookmark keys (before RoPE), complete pages


@register_policy
@dataclass
class RetroLMPolicy(SelectionPolicy):
    """Offloaded rows form pages of ``page_size`` rows (row ``r`` in page ``r // page_size``; row 0
    is the first token after the sink). Each complete page gets a bookmark that runs through the
    layers with the bookmark projections (:class:`lckv.retrolm.Bookmarks`: trained ones from the
    file ``bookmarks``, else the untrained ones initialised from the model's own projections),
    attending its own page; its key at each layer is that layer's page key. At each step the
    current page's bookmark (over the last ``page_size`` resident tokens, the current one
    included, never the sink, at the next position) gives the query; the pages with the highest score (summed
    over the kv head's query group) are attended until ``budget - sink - window`` rows are taken,
    the last page cut to the budget. The trailing page still filling ranks below every complete
    page (taken only when the budget covers all of them, so a covering budget is exact).

    The bookmarks are the model's: :func:`lckv.enable` attaches them (:meth:`attach`). Pages are
    scored when they leave the window (or when the state is built over a prefilled store), in layer
    order within the forward pass: layer ``l``'s bookmarks feed layer ``l + 1``'s. With
    ``prefill="retrieval"`` each block of ``prefill_block`` prefill queries attends the
    ``prefill_select`` rows of the pages its own bookmark (over the ``page_size`` tokens up to the
    block's last query) ranks best (:meth:`select_blocks`). Batches with padding are not supported.
    """

    page_size: int = 128
    bookmarks: str | None = None

    name = "retrolm"
    _module: object = field(default=None, init=False, repr=False, compare=False)
    _owner: int | None = field(default=None, init=False, repr=False, compare=False)

    def validate(self) -> None:
        super().validate()
        if self.page_size < 1:
            raise PolicyConfigError(f"RetroLMPolicy.page_size must be >= 1, got {self.page_size}")
        if self.bookmarks is not None and not isinstance(self.bookmarks, str):
            raise PolicyConfigError(f"RetroLMPolicy.bookmarks must be a file path or None, got {self.bookmarks!r}")

    def attach(self, model) -> None:
        from lckv.retrolm import Bookmarks, load_bookmarks

        if self._module is not None and self._owner == id(model):
            return
        module = load_bookmarks(self.bookmarks, model) if self.bookmarks else Bookmarks(model)
        module.requires_grad_(False)
        self._module, self._owner = module, id(model)

    def _bookmarks(self):
        if self._module is None:
            raise RuntimeError("RetroLMPolicy has no bookmarks: pass it to lckv.enable(model, policy) first")
        return self._module

    @staticmethod
    def _carry(view, kind: str, tag, batch: int, n: int, module) -> torch.Tensor:
        """The bookmarks' input at this layer: the embedding at layer 0, else the oldest entry the
        previous layer left under ``(kind, layer)`` (a layer may leave several in one forward
        pass: pages spill before and after a prefill chunk is attended), which must carry ``tag``."""
        if view.layer_idx == 0:
            return module.start(batch, n)
        queue = (view.shared if view.shared is not None else {}).get((_KEY, kind, view.layer_idx))
        entry = queue.pop(0) if queue else None
        if entry is None or entry[0] != tag:
            raise RuntimeError(
                f"retrolm: layer {view.layer_idx} found no bookmarks from layer {view.layer_idx - 1} for {kind} {tag} "
                "(layers must run in order within one forward pass on one LckvCache)")
        return entry[1]

    @staticmethod
    def _leave(view, kind: str, tag, h: torch.Tensor, module) -> None:
        if view.layer_idx + 1 < module.num_layers and view.shared is not None:
            view.shared.setdefault((_KEY, kind, view.layer_idx + 1), []).append((tag, h))

    def _check_padding(self, view) -> None:
        if view.padding is not None and not bool(view.padding.all()):
            raise NotImplementedError("the retrolm policy does not support batches with padding yet")

    def _extend(self, state: _RetroState, view) -> None:
        """Bookmark keys of the pages completed since the last call."""
        module = self._bookmarks()
        self._check_padding(view)
        w = self.page_size
        first, last = state.page_keys.shape[2], view.length // w
        if last <= first:
            return
        batch, kv_heads, _, head_dim = view.keys.shape
        n = last - first
        h = self._carry(view, "pages", (first, last), batch, n, module)
        rows = slice(first * w, last * w)
        device = h.device
        page_k = view.keys[:, :, rows].to(device).reshape(batch, kv_heads, n, w, head_dim)
        page_v = view.values[:, :, rows].to(device).reshape(batch, kv_heads, n, w, head_dim)
        positions = view.first_position + (torch.arange(first, last) + 1) * w
        with torch.no_grad():
            _, k, h = module.step(view.layer_idx, h, page_k, page_v, None, positions)
        self._leave(view, "pages", (first, last), h, module)
        state.page_keys = torch.cat([state.page_keys, k.transpose(1, 2).float().to(state.page_keys.device)], dim=2)

    def build(self, view):
        batch, kv_heads, _, head_dim = view.keys.shape
        state = _RetroState(torch.zeros(batch, kv_heads, 0, head_dim))
        self._extend(state, view)
        return state

    def on_offload(self, state, view, first_row, n_rows):
        self._extend(state, view)

    def _bookmark_queries(self, view, ends: list[int], kind: str) -> torch.Tensor:
        """Bookmark queries ``[batch, len(ends), q_heads, head_dim]`` (before RoPE) of the pages
        ending at resident rows ``ends`` (exclusive): each over the ``page_size`` resident tokens
        before its end (fewer where the recent part is shorter; never the sink), placed one
        position after its last token."""
        module = self._bookmarks()
        keys, values = view.resident_keys, view.resident_values
        resident = keys.shape[2]
        w = self.page_size
        offsets = torch.arange(-w, 0)
        rows = torch.tensor(ends)[:, None] + offsets  # [n, w]
        valid = rows >= view.n_sink
        rows = rows.clamp(min=0, max=resident - 1).to(keys.device)
        page_k = keys[:, :, rows]  # [batch, kv_heads, n, w, head_dim]
        page_v = values[:, :, rows]
        first_slot = view.context_len - (resident - view.n_sink)  # the slot of resident row n_sink
        positions = torch.tensor([first_slot + end - view.n_sink for end in ends])
        tag = (view.context_len, tuple(ends))
        h = self._carry(view, kind, tag, keys.shape[0], len(ends), module)
        mask = valid[None].expand(keys.shape[0], -1, -1).to(keys.device)
        with torch.no_grad():
            q, _, h = module.step(view.layer_idx, h.to(keys.device), page_k, page_v, mask, positions)
        self._leave(view, kind, tag, h, module)
        return q

    def select_blocks(self, state, view, q, n_select, scale=None, queries=None):
        """A retrieval prefill's blocks: each block's own page (the ``page_size`` tokens up to its
        last query) gives its bookmark query; every store row precedes the chunk."""
        from lckv.retrolm import page_scores

        if queries is None:
            raise ValueError("RetroLMPolicy.select_blocks needs the chunk's queries (their count and positions)")
        module = self._bookmarks()
        q_len, m = queries.shape[2], q.shape[2]
        resident = view.resident_keys.shape[2]
        ends = [resident - q_len + min((j + 1) * self.prefill_block, q_len) for j in range(m)]
        bookmark_q = self._bookmark_queries(view, ends, "blocks")
        picks = []
        for j in range(m):
            scores = page_scores(bookmark_q[:, j], state.page_keys.to(bookmark_q.device), module.scaling)
            rows = self._best_rows(scores, n_select, view.length)
            picks.append(torch.nn.functional.pad(rows, (0, n_select - rows.shape[-1]), value=-1))
        return torch.stack(picks, dim=2)

    def _best_rows(self, scores, n_select, n_rows):
        """Rows of the best pages; among equal scores the more recent page first (at layer 0
        every bookmark key is the same: the bookmarks have read nothing yet)."""
        pages = scores.shape[-1]
        order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
        scores = torch.empty_like(scores).scatter_(
            -1, pages - 1 - order, torch.arange(pages, 0, -1, dtype=scores.dtype).expand_as(scores).contiguous())
        if n_rows > pages * self.page_size:  # the page still filling: below every complete page
            scores = torch.cat([scores, scores.new_full((*scores.shape[:2], 1), float("-inf"))], dim=-1)
        return rows_of_best_units(scores, self.page_size, n_select, n_rows)

    def select(self, state, view, q, n_select, scale=None):
        from lckv.retrolm import page_scores

        query = self._bookmark_queries(view, [view.resident_keys.shape[2]], "query")[:, 0]
        scores = page_scores(query, state.page_keys.to(query.device), self._bookmarks().scaling)
        return self._best_rows(scores, n_select, view.length)
