"""The lckv KV cache: a resident part on the compute device and an offloaded part in host memory.

Per layer, the first ``sink`` tokens and the most recent tokens (``window - 1`` from earlier steps
plus the tokens of the current step) stay *resident* on the device the model runs on. Tokens that
leave the window *spill*: into a host-memory :class:`HostKVStore` when the policy keeps them
(``policy.keeps_offloaded``), otherwise they are evicted. Positions are cache slots: slot ``i``
holds the ``i``-th token fed to the model (pad slots included), so each part is a contiguous range
of positions and needs no position array.

:class:`LckvCache` is a transformers ``Cache``: pass it to ``generate(past_key_values=...)`` or let
:func:`lckv.enable` make ``generate`` create one. The attention function reaches a layer through
the cache the model's attention module was called with (:mod:`lckv.integrations.hf` records it
with a forward pre-hook) and ``cache.layers[module.layer_idx]``.

The cache depends on its policy only through :class:`lckv.layer_view.CachePolicy`, and shows each
layer to the policy's hooks as a :class:`lckv.layer_view.LayerView` (:meth:`LckvCacheLayer.view`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lckv.layer_view import CachePolicy, LayerView
from lckv.memory import empty_host

__all__ = ["HostKVStore", "LckvCacheLayer", "LckvCache", "Segment"]


@dataclass
class Segment:
    """A contiguous run of cached positions ``[start, start + k.shape[2])`` of one layer."""

    k: torch.Tensor  # [batch, kv_heads, n, head_dim]
    v: torch.Tensor
    start: int

    @property
    def length(self) -> int:
        return self.k.shape[2]


class HostKVStore:
    """Append-only K/V store in host memory, ``[batch, kv_heads, capacity, head_dim]`` per tensor.

    Capacity doubles when full (amortised O(1) appends). Pinned when CUDA is available, so copies
    to the device can be asynchronous.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, capacity: int = 256):
        self.length = 0  # number of stored tokens
        self._shape = (batch, kv_heads, head_dim)
        self._dtype = dtype
        self._k = self._alloc(capacity)
        self._v = self._alloc(capacity)

    def _alloc(self, capacity: int) -> torch.Tensor:
        batch, kv_heads, head_dim = self._shape
        if torch.cuda.is_available():  # pinned, for asynchronous copies to the device
            return torch.empty(batch, kv_heads, capacity, head_dim, dtype=self._dtype).pin_memory()
        return empty_host((batch, kv_heads, capacity, head_dim), self._dtype)  # huge pages when large

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        if self.length + n > self.capacity:
            new_cap = max(2 * self.capacity, self.length + n)
            for name in ("_k", "_v"):
                grown = self._alloc(new_cap)
                grown[:, :, : self.length] = getattr(self, name)[:, :, : self.length]
                setattr(self, name, grown)
        self._k[:, :, self.length : self.length + n].copy_(k, non_blocking=True)
        self._v[:, :, self.length : self.length + n].copy_(v, non_blocking=True)
        self.length += n

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :, : self.length]

    def nbytes(self) -> int:
        """Bytes of the stored tokens (not of the spare capacity)."""
        return 2 * self.keys.numel() * self.keys.element_size()

    def select_batch(self, index: torch.Tensor) -> None:
        self._k = self._k[index.cpu()].contiguous()
        self._v = self._v[index.cpu()].contiguous()
        self._shape = (self._k.shape[0],) + self._shape[1:]


class QueryRecorder:
    """Keeps a uniform sample of the queries seen during prefill, plus the most recent ones.

    ``sample`` holds at most ``2 * capacity`` queries at a stride that doubles whenever it
    overflows (so it spans the whole prompt); ``recent`` holds the last ``recent_capacity``.
    Queries are ``[batch, q_heads, n, head_dim]``, stored on the host.
    """

    def __init__(self, capacity: int, recent_capacity: int):
        self.capacity, self.recent_capacity = capacity, recent_capacity
        self.stride, self.seen = 1, 0
        self.sample = self.recent = None

    def add(self, query: torch.Tensor, sample: bool = True) -> None:
        n = query.shape[2]
        first, self.seen = self.seen, self.seen + n
        if not ((self.capacity and sample) or self.recent_capacity):
            return  # nothing kept (a decode step once the selection state exists): no copy, no ops
        q = query.detach().to("cpu")
        if self.capacity and sample:
            take = (torch.arange(first, first + n) % self.stride) == 0
            picked = q[:, :, take]
            self.sample = picked if self.sample is None else torch.cat([self.sample, picked], dim=2)
            while self.sample.shape[2] > 2 * self.capacity:
                self.sample, self.stride = self.sample[:, :, ::2], self.stride * 2
        if self.recent_capacity:
            self.recent = q if self.recent is None else torch.cat([self.recent, q], dim=2)
            self.recent = self.recent[:, :, -self.recent_capacity:]

    def select_batch(self, index: torch.Tensor) -> None:
        index = index.cpu()
        self.sample = None if self.sample is None else self.sample[index]
        self.recent = None if self.recent is None else self.recent[index]


class LckvCacheLayer(DynamicLayer):
    """One layer of :class:`LckvCache`: sink + recent window resident, older tokens offloaded."""

    def __init__(self, policy: CachePolicy, layer_idx: int):
        super().__init__()
        self.policy = policy
        self.layer_idx = layer_idx
        self.total = 0  # tokens seen (cache slots used), offloaded and evicted included
        self.evicted = 0  # tokens dropped because the policy keeps no offloaded store
        self.store: HostKVStore | None = None
        self.sink_k = self.sink_v = self.recent_k = self.recent_v = None
        #: prefill queries, for policies whose selection structures are built from them
        self.queries = QueryRecorder(*policy.recorded_queries()) if policy.recorded_queries() else None
        #: the policy's selection state (index, page bounds, ...), built at the first decode step
        self.selection = None
        #: key padding of the offloaded rows [batch, rows] (None: no padding seen)
        self.store_padding: torch.Tensor | None = None
        #: scratch shared by the layers of one cache (LayerView.shared); LckvCache sets one dict for all
        self.shared: dict = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states[:, :, :0]
        self.sink_k, self.sink_v = empty.clone(), empty.clone()
        self.recent_k, self.recent_v = empty.clone(), empty.clone()
        self.keys, self.values = self.recent_k, self.recent_v  # DynamicLayer bookkeeping
        batch, kv_heads, _, head_dim = key_states.shape
        if self.policy.keeps_offloaded:
            host_dtype = getattr(self.policy, "host_dtype", None)
            self.store = HostKVStore(batch, kv_heads, head_dim,
                                     getattr(torch, host_dtype) if host_dtype else key_states.dtype)
        self.is_initialized = True

    # --- the update path -------------------------------------------------------------------
    def _spill(self, n_new: int) -> None:
        """Before ``n_new`` tokens arrive: moves all but the last ``resident_window - 1`` recent
        tokens out of the resident part (the policy's window at the coming context length)."""
        if self.recent_k.shape[2] == 0:
            return
        keep = self.policy.resident_window(self.total + n_new) - 1
        overflow = self.recent_k.shape[2] - keep
        if overflow <= 0:
            return
        if self.store is not None:
            first_row = self.store.length
            self.store.append(self.recent_k[:, :, :overflow], self.recent_v[:, :, :overflow])
            if self.selection is not None:
                self.policy.on_offload(self.selection, self.view(), first_row, overflow)
        else:
            self.evicted += overflow
        # views: update() concatenates the new tokens onto them, which makes the copy anyway
        self.recent_k = self.recent_k[:, :, overflow:]
        self.recent_v = self.recent_v[:, :, overflow:]

    def settle(self) -> None:
        """Spills now what the next token's arrival would spill (all but the last
        ``resident_window - 1`` recent tokens), after a prefill chunk was attended: the chunk's
        rows then join the store and the policy's index at the chunk, and the first decode step
        offloads one row, not a whole chunk."""
        if self.is_initialized:
            self._spill(1)
            self.keys, self.values = self.recent_k, self.recent_v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Appends the new tokens and returns the resident K/V ``[batch, kv_heads, n, head_dim]``
        (sink then recent)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif (key_states.shape[0], key_states.shape[1], key_states.shape[3]) != (
                self.sink_k.shape[0], self.sink_k.shape[1], self.sink_k.shape[3]):
            raise ValueError(
                f"layer {self.layer_idx}: new keys of shape {tuple(key_states.shape)} do not match the cached "
                f"[batch={self.sink_k.shape[0]}, kv_heads={self.sink_k.shape[1]}, *, head_dim={self.sink_k.shape[3]}]")
        n_new = key_states.shape[2]
        self._spill(n_new)
        room = max(0, self.policy.sink - self.sink_k.shape[2])
        to_sink = min(room, n_new)
        if to_sink:
            self.sink_k = torch.cat([self.sink_k, key_states[:, :, :to_sink]], dim=2)
            self.sink_v = torch.cat([self.sink_v, value_states[:, :, :to_sink]], dim=2)
        if to_sink < n_new:
            self.recent_k = torch.cat([self.recent_k, key_states[:, :, to_sink:]], dim=2)
            self.recent_v = torch.cat([self.recent_v, value_states[:, :, to_sink:]], dim=2)
        self.total += n_new
        self.keys, self.values = self.recent_k, self.recent_v
        return torch.cat([self.sink_k, self.recent_k], dim=2), torch.cat([self.sink_v, self.recent_v], dim=2)

    def segments(self) -> list[Segment]:
        """The cached parts in position order: sink, offloaded (host memory), recent."""
        parts = []
        n_sink = self.sink_k.shape[2]
        if n_sink:
            parts.append(Segment(self.sink_k, self.sink_v, 0))
        if self.store is not None and self.store.length:
            parts.append(Segment(self.store.keys, self.store.values, n_sink))
        n_recent = self.recent_k.shape[2]
        if n_recent:
            parts.append(Segment(self.recent_k, self.recent_v, self.total - n_recent))
        return parts

    def resident_length(self) -> int:
        """Tokens resident now (sink + recent): the length of the K/V that :meth:`update` returned."""
        return self.sink_k.shape[2] + self.recent_k.shape[2] if self.is_initialized else 0

    def resident_segments(self) -> list[Segment]:
        """The resident parts (sink, recent) in position order, empty parts left out."""
        return [seg for seg in (Segment(self.sink_k, self.sink_v, 0),
                                Segment(self.recent_k, self.recent_v, self.total - self.recent_k.shape[2]))
                if seg.length]

    def view(self) -> LayerView:
        """What the policy's hooks see of this layer (:class:`lckv.layer_view.LayerView`)."""
        store = self.store
        empty = self.sink_k[:, :, :0].cpu()
        return LayerView(
            keys=store.keys if store is not None else empty, values=store.values if store is not None else empty,
            padding=self.store_padding, first_position=self.sink_k.shape[2], context_len=self.total,
            resident_keys=torch.cat([self.sink_k, self.recent_k], dim=2),
            resident_values=torch.cat([self.sink_v, self.recent_v], dim=2), n_sink=self.sink_k.shape[2],
            query_sample=None if self.queries is None else self.queries.sample,
            recent_queries=None if self.queries is None else self.queries.recent,
            layer_idx=self.layer_idx, shared=self.shared)

    def kept_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every kept token's keys and values ``[batch, kv_heads, n, head_dim]`` in slot order, on the
        compute device (a copy: sink, offloaded and recent parts concatenated)."""
        parts = self.segments()
        return (torch.cat([p.k.to(self.device) for p in parts], dim=2),
                torch.cat([p.v.to(self.device) for p in parts], dim=2))

    def resident_is_contiguous(self) -> bool:
        """True while the resident tokens (sink then recent) are every slot so far, in order."""
        return self.evicted == 0 and (self.store is None or self.store.length == 0)

    def set_padding(self, padding: torch.Tensor | None) -> None:
        """Key padding of all slots so far (``[batch, total]`` bool, None when there is none);
        called by the attention function before attending."""
        if padding is not None and self.store is not None:
            self.store_padding = padding[:, self.sink_k.shape[2]: self.sink_k.shape[2] + self.store.length]

    def record_queries(self, query: torch.Tensor) -> None:
        """Called by the attention function after attending: prefill queries feed the sample and
        the recent queries; once the selection state exists, only the recent queries."""
        if self.queries is not None:
            self.queries.add(query, sample=self.selection is None)

    def selection_state(self):
        """The policy's selection state, built from the offloaded store on first use."""
        if self.selection is None:
            self.selection = self.policy.build(self.view())
        return self.selection

    # --- transformers Cache protocol -------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.total

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask covers every slot, offloaded ones included; the attention function picks the
        # columns of each part.
        return self.total + query_length, 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "LckvCache cannot be cropped (tokens may already be offloaded or evicted); assisted and "
            "contrastive decoding, which crop the cache, are not supported")

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.sink_k, self.sink_v = fn(self.sink_k), fn(self.sink_v)
        self.recent_k, self.recent_v = fn(self.recent_k), fn(self.recent_v)
        self.keys, self.values = self.recent_k, self.recent_v

    def batch_repeat_interleave(self, repeats: int) -> None:
        index = torch.arange(self.sink_k.shape[0]).repeat_interleave(repeats) if self.is_initialized else None
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))
        if self.store is not None:
            self.store.select_batch(index)
        if self.queries is not None and index is not None:
            self.queries.select_batch(index)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])
        if self.store is not None:
            self.store.select_batch(indices)
        if self.queries is not None:
            self.queries.select_batch(indices)
        if self.selection is not None:
            raise NotImplementedError("reordering the batch after a selection state was built is not supported")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def reset(self) -> None:
        shared = self.shared  # the cache's dict: every layer keeps pointing at the same one
        self.__init__(self.policy, self.layer_idx)
        shared.clear()
        self.shared = shared

    # --- accounting --------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.recent_k, self.recent_v))

    def offloaded_bytes(self) -> int:
        return self.store.nbytes() if self.store is not None else 0


class LckvCache(Cache):
    """A transformers ``Cache`` of :class:`LckvCacheLayer`, one per decoder layer.

    Usually created by ``generate`` once :func:`lckv.enable` ran; build one yourself with
    ``lckv.new_cache(model)`` to keep it across calls or to read its :meth:`memory_report`.
    """

    def __init__(self, policy: CachePolicy, num_layers: int, layer_policies: dict[int, CachePolicy] | None = None):
        """``layer_policies`` overrides ``policy`` for some layers (e.g. the sliding-window layers of
        a model that mixes them with global ones: those keep only their window)."""
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layer_policies = layer_policies or {}
        bad = sorted(i for i in layer_policies if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"layer_policies names layers {bad} outside 0..{num_layers - 1}")
        self.policy = policy
        #: set when an attention module bound by lckv.enable was called with this cache
        self.routed = False
        super().__init__(layers=[LckvCacheLayer(layer_policies.get(i, policy), i) for i in range(num_layers)])
        self.shared: dict = {}
        for layer in self.layers:
            layer.shared = self.shared

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx {layer_idx} out of range for a cache of {len(self.layers)} layers "
                             "(was this cache made for another model?)")
        layer = self.layers[layer_idx]
        if not self.routed and (layer.evicted or (layer.store is not None and layer.store.length)):
            raise RuntimeError(
                "this LckvCache holds offloaded or evicted tokens but its model's attention never reached lckv (it "
                "would attend the resident keys only); call lckv.enable(model, ...) before using the cache")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @classmethod
    def from_cache(cls, cache: "LckvCache", policy: CachePolicy) -> "LckvCache":
        """A new cache holding the same tokens as ``cache``, laid out for ``policy``.

        The source must have kept every token (no evictions). The result is what prefilling the
        same tokens under ``policy`` with an exact prefill would give: first ``sink`` tokens
        resident, last ``resident_window - 1`` resident (the next decode step's), the rest offloaded (or evicted), and the source's
        recorded prefill queries. Used to compare policies on one exact prefill.
        """
        out = cls(policy, len(cache.layers))
        for src, dst in zip(cache.layers, out.layers):
            if not src.is_initialized:
                continue
            if src.evicted:
                raise ValueError("from_cache needs a source cache that evicted nothing (e.g. policy 'full')")
            keys, values = src.kept_keys_values()
            dst.lazy_initialization(keys, values)
            total = keys.shape[2]
            n_sink = min(policy.sink, total)
            n_recent = min(policy.resident_window(total + 1) - 1, total - n_sink)
            dst.sink_k, dst.sink_v = keys[:, :, :n_sink].clone(), values[:, :, :n_sink].clone()
            dst.recent_k = keys[:, :, total - n_recent:].clone()
            dst.recent_v = values[:, :, total - n_recent:].clone()
            dst.keys, dst.values = dst.recent_k, dst.recent_v
            middle = slice(n_sink, total - n_recent)
            if dst.store is not None:
                dst.store.append(keys[:, :, middle], values[:, :, middle])
            else:
                dst.evicted = total - n_sink - n_recent
            if src.store_padding is not None:
                raise NotImplementedError("from_cache does not carry key padding yet; use a batch without padding")
            dst.total = total
            if dst.queries is not None and src.queries is not None:
                dst.queries = copy.deepcopy(src.queries)
        return out

    def memory_report(self) -> dict:
        """Bytes held resident (compute device) and offloaded (host), and token counts."""
        return {
            "tokens": self.get_seq_length(),
            "resident_bytes": sum(layer.resident_bytes() for layer in self.layers),
            "offloaded_bytes": sum(layer.offloaded_bytes() for layer in self.layers),
            "evicted_tokens_per_layer": self.layers[0].evicted if self.layers else 0,
        }
