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

Reliability:

* **Transactions.** A model call is one :meth:`LckvCache.transaction` (the model bound by
  :func:`lckv.enable` opens it): the call only appends tokens, replacing tensors rather than
  writing them, and the tokens leaving the window spill when the call has succeeded (its commit:
  :meth:`LckvCacheLayer.settle` for every layer), so a call that raises -- bad input, an index
  error, an interrupt, layer ``k`` failing after layers ``< k`` appended -- is undone by putting
  back what each layer held. Between calls every layer is settled (``window - 1`` recent tokens).
  A policy's selection state cannot be undone (its indexes only grow); the rare call that changed
  it before failing (a chunk that shrinks the window, or a commit that failed part-way) is undone
  by remaking the state from the layer's :class:`SelectionLog`.
* **One thread.** A cache serves one thread at a time: entering it (a model call, :meth:`LckvCache.update`,
  ``save``) while another thread is inside raises :class:`ConcurrentCacheUseError` and changes nothing.
* **Host memory limit.** With ``max_host_bytes`` (a policy setting, copied to
  :attr:`LckvCache.max_host_bytes`), a store growth that would take the host bytes in use (every
  layer's store buffers, selection state and recorded queries, :meth:`LckvCache.host_bytes`) past
  the limit raises :class:`HostMemoryLimitError` before allocating.
* **Save and load.** :meth:`LckvCache.save` and :func:`lckv.persist.load_cache` (see there).
"""
from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass, field, fields

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lckv.layer_view import CachePolicy, LayerView
from lckv.memory import empty_host

__all__ = ["HostKVStore", "LckvCacheLayer", "LckvCache", "Segment", "SelectionLog", "HostMemoryLimitError",
           "ConcurrentCacheUseError"]


class HostMemoryLimitError(MemoryError):
    """Growing the host store would take the cache's host memory past ``max_host_bytes``."""

    def __init__(self, limit: int, in_use: int, requested: int):
        self.limit, self.in_use, self.requested = limit, in_use, requested
        super().__init__(
            f"max_host_bytes={limit}: the host KV store needs {requested} more bytes and {in_use} are in use "
            f"(stores, selection state, recorded queries), {in_use + requested} > {limit}; raise max_host_bytes "
            "(the policy setting, or LckvCache.max_host_bytes), shorten the context, or use a 16-bit host_dtype")


class ConcurrentCacheUseError(RuntimeError):
    """A thread entered an :class:`LckvCache` while another thread was inside it."""


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
    to the device can be asynchronous. With a ``budget`` (:class:`HostBudget`), a growth that does
    not fit raises :class:`HostMemoryLimitError` before allocating; near the limit the store grows
    only to the rows it needs.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, capacity: int = 256,
                 budget: "HostBudget | None" = None):
        self.length = 0  # number of stored tokens
        self._shape = (batch, kv_heads, head_dim)
        self._dtype = dtype
        self.budget = budget
        self._k, self._v = self._alloc(capacity)

    def _bytes(self, capacity: int) -> int:
        """Bytes of the K and V buffers at ``capacity`` rows."""
        batch, kv_heads, head_dim = self._shape
        return 2 * batch * kv_heads * capacity * head_dim * self._dtype.itemsize

    def _alloc(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New K and V buffers of ``capacity`` rows (the budget checked first)."""
        if self.budget is not None:
            self.budget.reserve(self._bytes(capacity))
        batch, kv_heads, head_dim = self._shape
        shape = (batch, kv_heads, capacity, head_dim)
        if torch.cuda.is_available():  # pinned, for asynchronous copies to the device
            return tuple(torch.empty(shape, dtype=self._dtype).pin_memory() for _ in range(2))
        return empty_host(shape, self._dtype), empty_host(shape, self._dtype)  # huge pages when large

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        if self.length + n > self.capacity:
            need = self.length + n
            grown = max(2 * self.capacity, need)
            if self.budget is not None and not self.budget.allows(self._bytes(grown)):
                grown = need
            new_k, new_v = self._alloc(grown)
            new_k[:, :, : self.length] = self.keys
            new_v[:, :, : self.length] = self.values
            self._k, self._v = new_k, new_v
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

    def allocated_bytes(self) -> int:
        """Bytes of the K and V buffers, spare capacity included."""
        return self._bytes(self.capacity)

    def select_batch(self, index: torch.Tensor) -> None:
        self._k = self._k[index.cpu()].contiguous()
        self._v = self._v[index.cpu()].contiguous()
        self._shape = (self._k.shape[0],) + self._shape[1:]


class HostBudget:
    """The host-memory limit of one cache: ``limit()`` bytes (None: none) against ``in_use()``."""

    def __init__(self, limit, in_use):
        self.limit, self.in_use = limit, in_use

    def allows(self, nbytes: int) -> bool:
        limit = self.limit()
        return limit is None or self.in_use() + nbytes <= limit

    def reserve(self, nbytes: int) -> None:
        """Raises :class:`HostMemoryLimitError` unless ``nbytes`` more fit (the caller then allocates;
        an empty buffer always fits)."""
        limit = self.limit()
        if limit is not None and nbytes:
            in_use = self.in_use()
            if in_use + nbytes > limit:
                raise HostMemoryLimitError(limit, in_use, nbytes)


def reachable_bytes(obj, seen: set, device: str | None = "cpu", skip=()) -> int:
    """Bytes of the tensors on ``device`` (None: any device) and indexes (``memory_bytes()``)
    reachable from ``obj`` through lists, tuples, dicts and attributes (those of ``obj`` named in
    ``skip`` not followed); a storage is counted once (``seen``: (device type, storage pointer))."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (obj.device.type, storage.data_ptr())
        if (device is not None and obj.device.type != device) or key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if hasattr(obj, "memory_bytes"):
        return obj.memory_bytes()
    if isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = [value for name, value in vars(obj).items() if name not in skip]
    else:
        return 0
    return sum(reachable_bytes(x, seen, device) for x in items)


class QueryRecorder:
    """Keeps a uniform sample of the queries seen during prefill, plus the most recent ones.

    ``sample`` holds at most ``2 * capacity`` queries at a stride that doubles whenever it
    overflows (so it spans the whole prompt; its storage holds at most twice its rows);
    ``recent`` holds the last ``recent_capacity``, in a storage of exactly those rows.
    Queries are ``[batch, q_heads, n, head_dim]``, stored on the host. Fields are replaced, never
    written in place, so a shallow copy is a snapshot.
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
            # a copy of exactly the kept rows: a view would keep the whole call's queries alive
            tail = q[:, :, -self.recent_capacity:]
            recent = tail if self.recent is None else torch.cat([self.recent, tail], dim=2)
            self.recent = recent[:, :, -self.recent_capacity:].clone()

    def select_batch(self, index: torch.Tensor) -> None:
        index = index.cpu()
        self.sample = None if self.sample is None else self.sample[index]
        self.recent = None if self.recent is None else self.recent[index]


@dataclass
class SelectionLog:
    """What a layer's selection state was made from, to make it again
    (:meth:`LckvCacheLayer.replay_selection`, used by rollbacks and by :mod:`lckv.persist`).

    The store is append-only and a slot's padding never changes, so the state is a function of
    the store's rows and of this log: ``build``, the view the state was built from (its offloaded
    rows as a count, its small parts as references) and the global RNG state it saw; ``offloads``,
    the row counts of every :meth:`~lckv.layer_view.CachePolicy.on_offload` since, in order, as
    runs ``(n_rows, repeat, rng)`` (``rng``: the RNG state an offload of several rows saw, None for
    single rows, whose hooks draw no random numbers; equal states are one tensor). For a policy
    that does not replay (``replays_state`` False) it holds ``state``, the state itself instead.
    """

    build: dict | None = None
    offloads: list = field(default_factory=list)
    state: object = None
    _last_rng: torch.Tensor | None = field(default=None, repr=False)

    def rng_state(self) -> torch.Tensor:
        """The global RNG state now: the tensor last recorded while it has not changed (no random
        numbers drawn between a prefill's chunks: they share one)."""
        rng = torch.random.get_rng_state()
        if self._last_rng is None or not torch.equal(rng, self._last_rng):
            self._last_rng = rng
        return self._last_rng

    def record_build(self, view: LayerView, rng: torch.Tensor) -> None:
        self.build = dict(rows=view.length, context_len=view.context_len, resident_keys=view.resident_keys,
                          resident_values=view.resident_values, query_sample=view.query_sample,
                          recent_queries=view.recent_queries, rng=rng)

    def record_offload(self, n_rows: int) -> None:
        rng = self.rng_state() if n_rows > 1 else None
        last = self.offloads[-1] if self.offloads else None
        if last is not None and rng is None and last[0] == n_rows and last[2] is None:
            self.offloads[-1] = (n_rows, last[1] + 1, None)
        else:
            self.offloads.append((n_rows, 1, rng))

    def mark(self) -> tuple:
        """The log's extent now, for :meth:`changed_since` and :meth:`truncate` (entries are tuples:
        never changed in place; a kept state is replaced, never changed)."""
        return self.build, len(self.offloads), self.offloads[-1] if self.offloads else None, self.state

    def changed_since(self, mark: tuple) -> bool:
        build, n, last, state = mark
        return (self.build is not build or len(self.offloads) != n or (n > 0 and self.offloads[-1] is not last)
                or self.state is not state)

    def truncate(self, mark: tuple) -> None:
        self.build, n, last, self.state = mark
        del self.offloads[n:]
        if last is not None:
            self.offloads[-1] = last


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
        #: how the selection state was made (to make it again), or the state itself
        self.log = SelectionLog()
        #: the log replays the policy's hooks (else it keeps the state itself: Policy.replays_state)
        self.replays = getattr(policy, "replays_state", True)
        #: key padding of the slots from ``policy.sink`` on (offloaded rows first) [batch, n] (None: no padding seen)
        self.store_padding: torch.Tensor | None = None
        #: scratch shared by the layers of one cache (LayerView.shared); LckvCache sets one dict for all
        self.shared: dict = {}
        #: the host-memory limit of the cache (LckvCache sets one for all layers)
        self.host_budget: HostBudget | None = None
        #: the slot count at which the prompt being fed ends (:attr:`LckvCache.prompt_end`; None: unknown)
        self.prompt_end: int | None = None

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
                                     getattr(torch, host_dtype) if host_dtype else key_states.dtype,
                                     capacity=0, budget=self.host_budget)
        self.is_initialized = True

    # --- the update path -------------------------------------------------------------------
    def _move_out(self, n_new: int) -> tuple[int, int] | None:
        """Before ``n_new`` tokens arrive: moves all but the last ``resident_window - 1`` recent
        tokens out of the resident part (the policy's window at the coming context length), into
        the store (evicted without one). Returns the stored rows ``(first_row, n_rows)``, if any;
        :meth:`_notify` tells the policy. Raises :class:`HostMemoryLimitError` having changed nothing."""
        if self.recent_k.shape[2] == 0:
            return None
        keep = self.policy.resident_window(self.total + n_new) - 1
        overflow = self.recent_k.shape[2] - keep
        if overflow <= 0:
            return None
        moved = None
        if self.store is not None:
            moved = (self.store.length, overflow)
            self.store.append(self.recent_k[:, :, :overflow], self.recent_v[:, :, :overflow])
        else:
            self.evicted += overflow
        # views: update() concatenates the new tokens onto them, which makes the copy anyway
        self.recent_k = self.recent_k[:, :, overflow:]
        self.recent_v = self.recent_v[:, :, overflow:]
        self.keys, self.values = self.recent_k, self.recent_v
        return moved

    def _notify(self, moved: tuple[int, int] | None) -> None:
        """Offloaded rows ``moved`` join the selection state (logged first: a hook that fails part-way
        has still changed the state)."""
        if moved is None or self.selection is None:
            return
        if self.replays:
            self.log.record_offload(moved[1])
            self.policy.on_offload(self.selection, self.view(), *moved)
        else:  # the hook changes a copy: the state a snapshot or the log holds stays as it was
            state = copy.copy(self.selection)
            self.policy.on_offload(state, self.view(), *moved)
            self.selection = self.log.state = state

    def settle(self) -> None:
        """Spills now what the next token's arrival would spill (all but the last
        ``resident_window - 1`` recent tokens). A model call's commit settles every layer, so the
        call's tokens join the store and the policy's index when it succeeded, and the next
        decode step offloads nothing."""
        if self.is_initialized:
            self._notify(self._move_out(1))

    def _check_new_kv(self, key_states, value_states) -> None:
        """Raises, naming the argument, unless both are floating tensors ``[batch, kv_heads, n,
        head_dim]`` of one shape, dtype and device, matching the cached ones."""
        where = f"layer {self.layer_idx}"
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                got = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"{where}: {name} must be a floating-point tensor [batch, kv_heads, n, head_dim], "
                                f"got {got}")
            if t.dim() != 4:
                raise ValueError(f"{where}: {name} must have shape [batch, kv_heads, n, head_dim], got "
                                 f"{tuple(t.shape)}")
        if value_states.shape != key_states.shape:
            raise ValueError(f"{where}: value_states must have the shape of key_states {tuple(key_states.shape)}, got "
                             f"{tuple(value_states.shape)}")
        if (value_states.dtype, value_states.device) != (key_states.dtype, key_states.device):
            raise TypeError(f"{where}: value_states must have the dtype and device of key_states ({key_states.dtype}, "
                            f"{key_states.device}), got ({value_states.dtype}, {value_states.device})")
        if not self.is_initialized:
            return
        if (key_states.dtype, key_states.device) != (self.dtype, self.device):
            raise TypeError(f"{where}: key_states must have the cached dtype and device ({self.dtype}, {self.device}), "
                            f"got ({key_states.dtype}, {key_states.device})")
        cached = (self.sink_k.shape[0], self.sink_k.shape[1], self.sink_k.shape[3])
        if (key_states.shape[0], key_states.shape[1], key_states.shape[3]) != cached:
            raise ValueError(f"{where}: key_states of shape {tuple(key_states.shape)} do not match the cached "
                             f"[batch={cached[0]}, kv_heads={cached[1]}, *, head_dim={cached[2]}]")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Appends the new tokens and returns the resident K/V ``[batch, kv_heads, n, head_dim]``
        (sink then recent). Raises ``ValueError``, having changed nothing, for keys or values of
        another shape than the cached ones or holding NaN/inf (they would poison every later step), and
        ``TypeError`` for non-tensors or another dtype or device than the cached ones."""
        self._check_new_kv(key_states, value_states)
        finite = torch.stack([torch.isfinite(key_states).all(), torch.isfinite(value_states).all()]).tolist()  # one sync
        for name, ok in zip(("key_states", "value_states"), finite):
            if not ok:
                raise ValueError(f"layer {self.layer_idx}: the new {name} hold NaN or inf; expected finite values "
                                 "(check the model's inputs)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[2]
        self._notify(self._move_out(n_new))  # after a commit: only where the window shrinks as the context grows
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

    def view(self, rows: int | None = None, **fields) -> LayerView:
        """What the policy's hooks see of this layer (:class:`lckv.layer_view.LayerView`); ``rows``:
        the first ``rows`` offloaded rows only, ``fields``: other view fields (a replay's)."""
        store = self.store
        empty = self.sink_k[:, :, :0].cpu()
        rows = (store.length if store is not None else 0) if rows is None else rows
        padding = None if self.store_padding is None else self.store_padding[:, :rows]
        return LayerView(**{
            "keys": store.keys[:, :, :rows] if store is not None else empty,
            "values": store.values[:, :, :rows] if store is not None else empty,
            "padding": padding, "first_position": self.sink_k.shape[2], "context_len": self.total,
            "resident_keys": torch.cat([self.sink_k, self.recent_k], dim=2),
            "resident_values": torch.cat([self.sink_v, self.recent_v], dim=2), "n_sink": self.sink_k.shape[2],
            "query_sample": None if self.queries is None else self.queries.sample,
            "recent_queries": None if self.queries is None else self.queries.recent,
            "layer_idx": self.layer_idx, "shared": self.shared, **fields})

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
            # from the first offloaded slot on, rows that spill later included
            self.store_padding = padding[:, self.policy.sink:]

    def record_queries(self, query: torch.Tensor) -> None:
        """Called by the attention function after attending: prefill queries feed the sample and
        the recent queries; once the selection state exists, only the recent queries."""
        if self.queries is not None:
            self.queries.add(query, sample=self.selection is None)

    def selection_state(self):
        """The policy's selection state, built from the offloaded store on first use."""
        if self.selection is None:
            view = self.view()
            if not self.replays:
                self.selection = self.log.state = self.policy.build(view)
                return self.selection
            rng = self.log.rng_state()
            self.selection = self.policy.build(view)
            self.log.record_build(view, rng)
        return self.selection

    def replay_selection(self) -> None:
        """Remakes the selection state from :attr:`log` and the store: the build over its rows, then
        every offload, each with the rows and RNG state it saw (deterministic hooks give the same
        state). Layers of a cache replay in order (:meth:`LckvCache.replay_selections`)."""
        build = self.log.build
        self.selection = None
        if not self.replays:
            self.selection = self.log.state
            return
        if build is None:
            return
        fields = {name: build[name] for name in ("context_len", "resident_keys", "resident_values", "query_sample",
                                                 "recent_queries")}
        with torch.random.fork_rng(devices=[]):
            torch.random.set_rng_state(build["rng"])
            state = self.policy.build(self.view(build["rows"], **fields))
            row = build["rows"]
            for n_rows, repeat, rng in self.log.offloads:
                if rng is not None:
                    torch.random.set_rng_state(rng)
                for _ in range(repeat):
                    self.policy.on_offload(state, self.view(row + n_rows), row, n_rows)
                    row += n_rows
        self.selection = state

    # --- transactions and persistence (LckvCache.transaction, lckv.persist) ---------------------
    def snapshot(self) -> tuple:
        """What :meth:`restore` puts back: every attribute (the update path replaces tensors, never
        writes them), the store's extent and buffers, the recorded queries and the log's extent."""
        attrs = dict(vars(self))
        attrs["queries"] = copy.copy(self.queries)
        store = self.store
        return attrs, None if store is None else (store.length, store._k, store._v), self.log.mark()

    def restore(self, snapshot: tuple) -> bool:
        """Puts back :meth:`snapshot`; True when the selection state changed since (then
        :meth:`replay_selection` must remake it)."""
        attrs, store, mark = snapshot
        changed = attrs["selection"] is not None and self.log.changed_since(mark)
        vars(self).clear()
        vars(self).update(attrs)
        if store is not None:
            self.store.length, self.store._k, self.store._v = store
        self.log.truncate(mark)
        return changed

    def export_state(self) -> dict | None:
        """This layer as plain data and CPU tensors (what :mod:`lckv.persist` saves; the selection
        state as its log); None before the first token."""
        if not self.is_initialized:
            return None
        store = self.store
        return {"total": self.total, "evicted": self.evicted,
                "resident": [t.cpu() for t in (self.sink_k, self.sink_v, self.recent_k, self.recent_v)],
                "store": None if store is None else [store.keys.clone(), store.values.clone()],
                "store_padding": None if self.store_padding is None else self.store_padding.cpu(),
                "queries": None if self.queries is None else dict(vars(self.queries)),
                "log": {"build": None if self.log.build is None else {
                            name: value.cpu() if isinstance(value, torch.Tensor) else value
                            for name, value in self.log.build.items()},
                        "offloads": list(self.log.offloads),
                        "state": None if self.log.state is None else {
                            f.name: getattr(self.log.state, f.name).cpu() for f in fields(self.log.state)}}}

    def import_state(self, state: dict, device: torch.device) -> None:
        """Restores :meth:`export_state`'s data on a fresh layer, resident tensors on ``device``; the
        selection state is remade by :meth:`replay_selection` (its store rows must be here first)."""
        sink_k, sink_v, recent_k, recent_v = (t.to(device) for t in state["resident"])
        self.lazy_initialization(sink_k, sink_v)
        self.sink_k, self.sink_v, self.recent_k, self.recent_v = sink_k, sink_v, recent_k, recent_v
        self.keys, self.values = recent_k, recent_v
        if state["store"] is not None:
            self.store.append(*state["store"])
        self.total, self.evicted = state["total"], state["evicted"]
        self.store_padding = None if state["store_padding"] is None else state["store_padding"].to(device)
        if state["queries"] is not None:
            vars(self.queries).update(state["queries"])
        build, kept = state["log"]["build"], state["log"].get("state")
        self.log = SelectionLog(None if build is None else {
            name: value.to(device) if name in ("resident_keys", "resident_values") else value
            for name, value in build.items()}, list(state["log"]["offloads"]),
            None if kept is None else self.policy.state_type(**kept))

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
        shared, budget = self.shared, self.host_budget  # the cache's: every layer keeps pointing at the same
        self.__init__(self.policy, self.layer_idx)
        shared.clear()
        self.shared, self.host_budget = shared, budget

    # --- accounting --------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.recent_k, self.recent_v))

    def offloaded_bytes(self) -> int:
        return self.store.nbytes() if self.store is not None else 0

    def host_bytes(self, seen: set) -> int:
        """Host memory held: store buffers (spare capacity included), selection state, recorded
        queries and log (CPU tensors and indexes; storages in ``seen`` are not counted again)."""
        store = 0 if self.store is None else self.store.allocated_bytes()
        return store + reachable_bytes([self.selection, self.queries, self.log], seen)


class LckvCache(Cache):
    """A transformers ``Cache`` of :class:`LckvCacheLayer`, one per decoder layer.

    Usually created by ``generate`` once :func:`lckv.enable` ran; build one yourself with
    ``lckv.new_cache(model)`` to keep it across calls, to read its :meth:`memory_report`, or to
    :meth:`save` it. See the module docstring for transactions, the one-thread contract and the
    host-memory limit.
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
        #: host bytes this cache may hold (None: no limit); from the policy's ``max_host_bytes``
        self.max_host_bytes: int | None = getattr(policy, "max_host_bytes", None)
        #: the model the cache was made for (a weak reference, set by lckv.new_cache), for save()
        self.model_ref = None
        super().__init__(layers=[LckvCacheLayer(layer_policies.get(i, policy), i) for i in range(num_layers)])
        self.shared: dict = {}
        budget = HostBudget(lambda: self.max_host_bytes, self.host_bytes)
        for layer in self.layers:
            layer.shared, layer.host_budget = self.shared, budget
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread inside the cache
        self._depth = 0  # how deeply that thread is inside (a model call, then update)

    @contextlib.contextmanager
    def exclusive(self):
        """Marks the calling thread as inside the cache; yields True for the outermost entry.
        Raises :class:`ConcurrentCacheUseError` when another thread is inside."""
        me = threading.get_ident()
        with self._lock:
            if self._owner not in (None, me):
                raise ConcurrentCacheUseError(
                    f"this LckvCache is in use by thread {self._owner} and thread {me} entered it; a cache serves "
                    "one thread at a time: give each thread its own (lckv.new_cache(model))")
            self._owner, self._depth = me, self._depth + 1
        try:
            yield self._depth == 1
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None

    @contextlib.contextmanager
    def transaction(self):
        """One model call (the model bound by :func:`lckv.enable` opens it around each call): on
        success every layer is settled (its commit); on any exception, ``KeyboardInterrupt``
        included, every layer is put back as the call found it and the exception goes on.
        Nested transactions of the same thread join the outer one."""
        with self.exclusive() as outermost:
            if not outermost:
                yield
                return
            snapshot = [layer.snapshot() for layer in self.layers], {k: list(v) for k, v in self.shared.items()}
            try:
                yield
                self._commit()
            except BaseException:
                self._restore(snapshot)
                raise

    def _commit(self) -> None:
        """Settles every layer: all stores first (a :class:`HostMemoryLimitError` there is undone
        cheaply), then the policy hooks, in layer order."""
        moved = [layer._move_out(1) if layer.is_initialized else None for layer in self.layers]
        for layer, rows in zip(self.layers, moved):
            layer._notify(rows)

    def _restore(self, snapshot) -> None:
        layers, shared = snapshot
        changed = [layer.restore(saved) for layer, saved in zip(self.layers, layers)]
        if any(changed):
            self.replay_selections()
        self.shared.clear()
        self.shared.update(shared)

    def replay_selections(self) -> None:
        """Remakes every layer's selection state from its log, in layer order (a policy may pass
        data from one layer's hooks to the next through ``shared``, as RetroLM's bookmarks do)."""
        saved = dict(self.shared)
        self.shared.clear()
        try:
            for layer in self.layers:
                layer.replay_selection()
        finally:
            self.shared.clear()
            self.shared.update(saved)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"layer_idx must be an int, got {type(layer_idx).__name__}")
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer_idx {layer_idx} out of range for a cache of {len(self.layers)} layers "
                             "(was this cache made for another model?)")
        layer = self.layers[layer_idx]
        if not self.routed and (layer.evicted or (layer.store is not None and layer.store.length)):
            raise RuntimeError(
                "this LckvCache holds offloaded or evicted tokens but its model's attention never reached lckv (it "
                "would attend the resident keys only); call lckv.enable(model, ...) before using the cache")
        with self.exclusive():
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def prompt_end(self) -> int | None:
        """Where the prompt now being fed ends, as the number of slots the cache will hold after its
        last token (None: unknown). A policy whose prefill treats the prompt's last positions apart
        (``prefill_exact_tail`` of :class:`~lckv.policies.selection.SelectionPolicy`) reads it:
        ``generate`` sets it before the prefill (:func:`lckv.enable`); set it yourself before
        feeding a prompt in several forward calls (a later prompt on the same cache needs its own:
        positions past the announced end are not a prompt's last, and attend as decoding would)."""
        return self.layers[0].prompt_end

    @prompt_end.setter
    def prompt_end(self, value: int | None) -> None:
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"prompt_end must be an int or None, got {type(value).__name__}")
            held = self.get_seq_length()
            if value <= held:
                raise ValueError(f"prompt_end must be past the {held} slots the cache holds (the prompt's last token "
                                 f"is still to come), got {value}")
        for layer in self.layers:
            layer.prompt_end = value

    def host_bytes(self) -> int:
        """Host memory this cache holds (what ``max_host_bytes`` limits): every layer's store
        buffers (spare capacity included), selection state (indexes, estimate) and recorded queries."""
        seen: set = set()
        return sum(layer.host_bytes(seen) for layer in self.layers)

    def save(self, path, model=None) -> None:
        """Writes the cache to ``path`` (:func:`lckv.persist.save_cache`); ``model`` defaults to the
        one :func:`lckv.new_cache` made it for."""
        from lckv.persist import save_cache

        save_cache(self, path, model)

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
