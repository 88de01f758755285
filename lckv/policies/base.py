"""Selection policies: small dataclasses that say which keys each query attends to.

A policy never touches tensors it does not need. The cache (:mod:`lckv.cache`) keeps the
*resident* part of every layer (the first ``sink`` tokens and the last ``window`` tokens) on the
compute device and moves older tokens to a host-memory store when ``keeps_offloaded`` is true
(otherwise they are evicted). At attention time the engine (:mod:`lckv.attention`) attends each
part exactly and merges the partial states by log-sum-exp; :meth:`Policy.allowed` restricts which
(query, key) position pairs take part, on top of causality and padding.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

__all__ = ["Policy", "PolicyConfigError", "register_policy", "get_policy", "available_policies", "resolve_policy"]

_REGISTRY: dict[str, type["Policy"]] = {}


#: accepted ``Policy.host_dtype`` values (None: the model's dtype)
HOST_DTYPES = (None, "float32", "bfloat16", "float16")

#: setting annotation -> the types a value of it may have (a bool is not an int; an int is a float)
_SETTING_TYPES = {"int": (int,), "bool": (bool,), "float": (int, float), "str": (str,), "dict": (dict,)}
_SETTING_NAMES = {"int": "an int", "bool": "a bool", "float": "a number", "str": "a str", "dict": "a dict"}


class PolicyConfigError(ValueError):
    """A policy name or setting is invalid."""


@dataclass
class Policy:
    """Base of all policies.

    Attributes
    ----------
    sink : number of first tokens always resident and always attended (attention sinks).
    window : number of most recent tokens (the current one included) always resident and attended.
    host_dtype : dtype of the offloaded K/V in host memory: None keeps the model's; ``"bfloat16"``
        or ``"float16"`` halve an fp32 model's host KV (attention reads the rows back in the
        compute dtype; the rounding is that of a 16-bit KV cache).
    max_host_bytes : host memory a cache may hold, in bytes (None: no limit): its offloaded K/V
        buffers (spare capacity included), selection state (indexes, estimate) and recorded
        queries (:meth:`lckv.cache.LckvCache.host_bytes`). A store growth that would pass it raises
        :class:`lckv.cache.HostMemoryLimitError` before allocating, and the model call that needed
        it changes nothing. Checked when a store grows (the index and estimate growing between
        store growths are counted at the next one); a growth near the limit takes only the rows it
        needs instead of doubling.
    """

    sink: int = 4
    window: int = 1024
    host_dtype: str | None = None
    max_host_bytes: int | None = None

    name: ClassVar[str] = ""
    #: keep tokens that leave the window in the host-memory store (False: evict them).
    keeps_offloaded: ClassVar[bool] = True
    #: whether the cache remakes the selection state by replaying ``build`` and ``on_offload``
    #: (:class:`lckv.cache.SelectionLog`). False for a policy whose hooks read what a replay cannot
    #: supply (the block policy's ``on_offload`` reads the recent queries): the log then keeps the
    #: state itself, a dataclass of tensors that the hooks replace, never write in place, remade
    #: from its fields by ``state_type``.
    replays_state: ClassVar[bool] = True
    state_type: ClassVar[type | None] = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            types = _SETTING_TYPES.get(f.type, ()) if f.init else ()
            if types and ((isinstance(value, bool) and bool not in types) or not isinstance(value, types)):
                raise PolicyConfigError(f"{type(self).__name__}.{f.name} must be {_SETTING_NAMES[f.type]}, "
                                        f"got {value!r}")
        if self.sink < 0:
            raise PolicyConfigError(f"{type(self).__name__}.sink must be >= 0, got {self.sink}")
        limit = self.max_host_bytes
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise PolicyConfigError(f"{type(self).__name__}.max_host_bytes must be None (no limit) or an int >= 1 "
                                    f"(bytes), got {limit!r}")
        if self.host_dtype not in HOST_DTYPES:
            raise PolicyConfigError(f"{type(self).__name__}.host_dtype must be one of {HOST_DTYPES}, "
                                    f"got {self.host_dtype!r}")
        if self.window < 1:
            raise PolicyConfigError(
                f"{type(self).__name__}.window must be >= 1 (the current token is always attended), got {self.window}")

    def resident_window(self, context_len: int) -> int:
        """Recent tokens (the current one included) kept resident at ``context_len`` tokens."""
        return self.window

    def attach(self, model) -> None:
        """Called by :func:`lckv.enable` with the model before it is bound: a policy with
        model-specific parts (RetroLM's bookmark projections) makes them here. No-op by default."""

    def recorded_queries(self) -> tuple[int, int] | None:
        """``(sample_capacity, recent_capacity)`` of prefill queries the cache should keep for
        this policy (see :class:`lckv.cache.QueryRecorder`), or None."""
        return None

    def build(self, view):
        """Selection state of a layer (selection policies only: see :class:`~lckv.policies.SelectionPolicy`)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no selection state")

    def on_offload(self, state, view, first_row: int, n_rows: int) -> None:
        """Offloaded rows arrived after :meth:`build` (selection policies only)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no selection state")

    def in_reach(self, k_first: int, k_last: int, q_first: int, q_last: int) -> bool:
        """False when no query in positions ``[q_first, q_last]`` may attend any key in
        ``[k_first, k_last]`` (the engine then skips that part without building its mask)."""
        return True

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        """Which keys each query may attend, besides causality and padding.

        ``q_pos`` ``[q_len]`` and ``k_pos`` ``[n_keys]`` are absolute positions (cache slots);
        returns a bool ``[q_len, n_keys]`` (True = attend) or None when every key is allowed.
        """
        return None


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator adding a policy to the registry under ``cls.name``."""
    if not cls.name:
        raise PolicyConfigError(f"{cls.__name__} needs a non-empty class attribute `name`")
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def get_policy(name: str, **settings) -> Policy:
    """Builds a registered policy by name, e.g. ``get_policy("streaming", sink=4, window=256)``."""
    if name not in _REGISTRY:
        raise PolicyConfigError(f"unknown policy {name!r}; available: {', '.join(available_policies())}")
    cls = _REGISTRY[name]
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise PolicyConfigError(f"policy {name!r} has no setting(s) {unknown}; settings: {sorted(known)}")
    return cls(**settings)


def resolve_policy(policy, **settings) -> Policy:
    """A policy instance from an instance (settings must be empty) or a registered name."""
    if isinstance(policy, Policy):
        if settings:
            raise PolicyConfigError("pass settings either in the policy instance or as keywords with a policy name, not both")
        policy.validate()
        return policy
    if isinstance(policy, str):
        return get_policy(policy, **settings)
    raise PolicyConfigError(f"policy must be a registered name or a lckv.policies.Policy, got {type(policy).__name__}")
