"""transformers integration: the ``"lckv"`` attention backend and :func:`enable`.

Two transformers extension points are used, the way their users use them:

* ``AttentionInterface.register("lckv", lckv_attention_forward)`` — the attention function;
* ``AttentionMaskInterface.register("lckv", lckv_mask)`` — without it, padding masks would arrive
  as None. For the plain causal pattern it returns a compact :class:`~lckv.attention.KeyPaddingMask`
  (or None without padding) instead of a ``[batch, 1, q_len, kv_len]`` tensor, so long contexts
  never materialise a quadratic mask; other patterns fall back to transformers' ``sdpa_mask``.

Routing (transformers' attention functions receive no cache): :func:`enable` binds an
:class:`LckvBinding` to every attention module (``module.lckv_binding``) and registers a forward
pre-hook on it (``register_forward_pre_hook(with_kwargs=True)``) that records the
``past_key_values`` the module is called with, per thread (:meth:`LckvBinding.cache_in_use`). The
attention function takes layer ``module.layer_idx`` of that cache. With an
:class:`~lckv.cache.LckvCache`, the engine attends sink, offloaded and recent parts and merges
them; with any other cache, or none (training), it applies the policy as a mask over the keys it
is given: same outputs, no offloading.

Transactions: :func:`enable` also wraps the model's ``forward`` (an instance attribute, removed
by :func:`disable`) so that each call with an :class:`~lckv.cache.LckvCache` runs inside
:meth:`LckvCache.transaction <lckv.cache.LckvCache.transaction>`: a call that raises leaves the
cache as it was, and a second thread entering the cache during the call gets
:class:`~lckv.cache.ConcurrentCacheUseError`.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import threading
import types
import weakref
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, prepare_padding_mask, sdpa_mask

from lckv import memory
from lckv.attention import KeyPaddingMask, attend_chunk_with_selection, attend_segments, attend_with_selection
from lckv.cache import LckvCache, LckvCacheLayer, Segment
from lckv.ops import sink_window_attention_with_lse
from lckv.reference.window import sink_window_mask
from lckv.policies import FullPolicy, Policy, StreamingPolicy, resolve_policy
from lckv.policies.selection import SelectionPolicy

__all__ = ["ATTENTION_NAME", "register", "enable", "disable", "new_cache", "LckvBinding", "ModelNotSupportedError",
           "lckv_attention_forward", "lckv_mask", "sliding_window_policy"]

ATTENTION_NAME = "lckv"


class ModelNotSupportedError(ValueError):
    """The model does not have the Llama/Qwen2-style structure the backend needs."""


@dataclass
class LckvBinding:
    """What :func:`enable` attached to a model: the policy and the model's attention geometry."""

    policy: Policy
    num_layers: int
    num_kv_heads: int
    head_dim: int
    previous_attn_implementation: str | None = None
    #: layer index -> the policy of a sliding-window layer (exact attention over its window, which
    #: is all it keeps); every other layer follows ``policy``.
    sliding_layers: dict = field(default_factory=dict)
    #: callables ``fn(module, query, new_keys, new_values)`` invoked by the attention function with
    #: the post-RoPE queries ``[B, Hq, q_len, D]`` and the keys and values of the same tokens
    #: ``[B, Hkv, q_len, D]``.
    observers: list = field(default_factory=list)
    #: per thread: the cache the attention module now running was called with
    _route: threading.local = field(default_factory=threading.local, repr=False)
    #: the forward pre-hooks of the attention modules (removed by :func:`disable`)
    _hooks: list = field(default_factory=list, repr=False)
    #: a weak reference to the model (set by :func:`enable`), for caches to save themselves
    model_ref: object = field(default=None, repr=False)

    def cache_in_use(self):
        """The ``past_key_values`` of the attention call now running in this thread (None: none)."""
        return getattr(self._route, "cache", None)

    def layer_in_use(self, layer_idx: int) -> LckvCacheLayer | None:
        """Layer ``layer_idx`` of the LckvCache in use, or None when the call has another cache or none."""
        cache = self.cache_in_use()
        if not isinstance(cache, LckvCache):
            return None
        if not 0 <= layer_idx < len(cache.layers):
            raise ValueError(f"an LckvCache of {len(cache.layers)} layers reached layer {layer_idx}; create the cache "
                             "with lckv.new_cache(model) for this model")
        return cache.layers[layer_idx]

    def new_cache(self) -> LckvCache:
        cache = LckvCache(self.policy, self.num_layers, self.sliding_layers)
        cache.model_ref = self.model_ref
        return cache

    def policy_for(self, layer_idx: int) -> Policy:
        return self.sliding_layers.get(layer_idx, self.policy)

    def fingerprint(self, model) -> dict:
        """What identifies the model a saved cache belongs to (:mod:`lckv.persist`): its class, the
        attention geometry, and the sha256 of every layer's key projection weights (what made the keys)."""
        digest = hashlib.sha256()
        for module in _attention_modules(model):
            digest.update(module.k_proj.weight.detach().cpu().contiguous().view(torch.uint8).numpy())
        return {"class": type(model).__name__, "num_layers": self.num_layers, "kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "k_proj_sha256": digest.hexdigest()}


def sliding_window_policy(window: int) -> StreamingPolicy:
    """The policy of a sliding-window layer: each query attends its last ``window`` tokens
    (transformers' pattern ``kv > q - window``), nothing older is kept."""
    return StreamingPolicy(sink=0, window=window)


def _sliding_layers(config, num_layers: int) -> dict:
    """Layer index -> window policy for the config's sliding-window layers (``layer_types``, or a
    ``sliding_window`` that applies to every layer as in Mistral)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ModelNotSupportedError(f"layer types {unknown} are not supported (full_attention and "
                                         "sliding_attention are)")
        sliding = [i for i, t in enumerate(types[:num_layers]) if t == "sliding_attention"]
    elif window is not None and getattr(config, "use_sliding_window", True):
        sliding = list(range(num_layers))
    else:
        sliding = []
    if sliding and not (isinstance(window, int) and window >= 1):
        raise ModelNotSupportedError(f"sliding-window layers {sliding} need config.sliding_window >= 1, got {window!r}")
    return {i: sliding_window_policy(window) for i in sliding}


_lock = threading.Lock()
_default_policy: Policy = FullPolicy()


def register(default_policy: Policy | str | None = None, **settings) -> None:
    """Registers ``"lckv"`` with transformers' attention and mask interfaces (idempotent).

    ``default_policy`` serves models loaded with ``attn_implementation="lckv"`` that were never
    passed to :func:`enable` (e.g. an RL actor built by a trainer); it defaults to ``full``.
    """
    global _default_policy
    with _lock:
        if default_policy is not None:
            _default_policy = resolve_policy(default_policy, **settings)
        elif settings:
            raise ValueError("settings given without a default_policy name")
        AttentionInterface.register(ATTENTION_NAME, lckv_attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, lckv_mask)


def lckv_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
              mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask function of the ``"lckv"`` backend (see the module docstring)."""
    # causal, or transformers' plain sliding-window pattern (it passes the window as local_size;
    # the layer's window policy applies it): only the key padding is needed
    plain_sliding = kwargs.get("local_size") is not None and not kwargs.get("use_vmap", False)
    if (mask_function is causal_mask_function or plain_sliding) and kv_offset == 0:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None:
            return None
        padding = padding[:, :kv_length].bool()
        return None if bool(padding.all()) else KeyPaddingMask(padding)
    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, **kwargs)


def lckv_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers attention function: ``query`` ``[B, Hq, q_len, D]``, ``key``/``value``
    ``[B, Hkv, kv_len, D]``; returns ``(out [B, q_len, Hq, D], None)``."""
    if dropout:
        raise NotImplementedError(f"lckv attention does not implement attention dropout (got dropout={dropout})")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(f"lckv attention does not implement logit soft-capping (softcap={kwargs['softcap']})")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise NotImplementedError("lckv attention serves causal decoder attention only")
    binding: LckvBinding | None = getattr(module, "lckv_binding", None)
    policy = binding.policy_for(module.layer_idx) if binding is not None else _default_policy
    window = kwargs.get("sliding_window")
    if window is not None and binding is None:
        policy = sliding_window_policy(window)
    elif window is not None and not (isinstance(policy, StreamingPolicy) and policy.sink == 0 and policy.window == window):
        raise ValueError(f"layer {module.layer_idx} attends a sliding window of {window} tokens but lckv.enable bound "
                         f"it to {policy}; the model's config.layer_types/sliding_window disagree with its modules")
    layer = binding.layer_in_use(module.layer_idx) if binding is not None else None
    q_len = query.shape[2]
    if layer is not None and (layer.policy is not policy or layer.resident_length() != key.shape[2]):
        raise ValueError(
            f"an LckvCache made for another model or policy reached layer {module.layer_idx}; create the "
            "cache with lckv.new_cache(model) for this model")
    if binding is not None:
        for observe in binding.observers:
            observe(module, query, key[:, :, key.shape[2] - q_len:], value[:, :, value.shape[2] - q_len:])
    if _sink_window_fast_path(policy, attention_mask, query):
        # `key` holds sink then a contiguous recent run (or every key without a cache): index
        # distances equal position distances, so the fused sink+window op is exact here.
        if q_len == 1:
            out, _ = sink_window_attention_with_lse(query, key, value, policy.sink, policy.window, scaling)
        else:  # prefill chunks: torch's fused CPU/GPU attention with the sink+window mask
            mask = _band_mask(q_len, key.shape[2], policy.sink, policy.window, query.device)
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                                   enable_gqa=True)
        if layer is not None:
            layer.record_queries(query)
        return out.transpose(1, 2).contiguous(), None
    if layer is None:
        out, _ = attend_segments(query, [Segment(key, value, 0)], key.shape[2] - q_len, attention_mask, policy, scaling)
        return out.transpose(1, 2).contiguous(), None
    padding = attention_mask.padding if isinstance(attention_mask, KeyPaddingMask) else None
    if isinstance(attention_mask, torch.Tensor) and isinstance(policy, SelectionPolicy):
        raise NotImplementedError("selection policies take causal masks with key padding only, not custom 4D masks")
    layer.set_padding(padding)
    selecting = isinstance(policy, SelectionPolicy) and layer.store is not None and layer.store.length
    if selecting and q_len == 1:
        out, _ = attend_with_selection(query, layer, attention_mask, policy, scaling)
    elif selecting and policy.prefill == "retrieval":
        out, _ = attend_chunk_with_selection(query, layer, attention_mask, policy, scaling)
    else:
        # nothing offloaded or evicted yet: the resident keys (sink then recent) are slots 0.. in order
        parts = [Segment(key, value, 0)] if layer.resident_is_contiguous() else layer.segments()
        out, _ = attend_segments(query, parts, layer.total - q_len, attention_mask, policy, scaling)
    layer.record_queries(query)
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=8)
def _band_mask(q_len: int, kv_len: int, sink: int, window: int, device: torch.device) -> torch.Tensor:
    """The sink+window mask of a prefill chunk; chunks of one prefill share their shape."""
    return sink_window_mask(q_len, kv_len, sink, window, device=device)


def _sink_window_fast_path(policy: Policy, attention_mask, query: torch.Tensor) -> bool:
    """Streaming-style policies without padding, outside autograd, use the fused op."""
    return (isinstance(policy, StreamingPolicy) and attention_mask is None
            and not (torch.is_grad_enabled() and query.requires_grad))


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    mods = [m for m in model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups") and hasattr(m, "q_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def _binding_for(model, policy: Policy) -> tuple[LckvBinding, list[torch.nn.Module]]:
    config = getattr(model, "config", None)
    needed = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size")
    if config is None or any(getattr(config, name, None) is None for name in needed):
        raise ModelNotSupportedError(
            f"{type(model).__name__} is not a supported model: expected a transformers Llama/Qwen2-style decoder "
            f"whose config has {', '.join(needed)}")
    modules = _attention_modules(model)
    if len(modules) != config.num_hidden_layers or [m.layer_idx for m in modules] != list(range(len(modules))):
        raise ModelNotSupportedError(
            f"{type(model).__name__}: expected {config.num_hidden_layers} attention modules with layer_idx 0.. and "
            f"q_proj/num_key_value_groups (Llama/Qwen2-style), found {len(modules)}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    binding = LckvBinding(policy, config.num_hidden_layers, config.num_key_value_heads, head_dim,
                          sliding_layers=_sliding_layers(config, config.num_hidden_layers))
    return binding, modules


def enable(model, policy: Policy | str = "full", **settings) -> LckvBinding:
    """Makes ``model`` attend through lckv with ``policy``; returns the binding.

    ``policy`` is a registered name with keyword settings (``enable(model, "streaming", sink=4,
    window=256)``) or a policy instance from :mod:`lckv.policies`. Afterwards ``model.generate``
    creates an :class:`~lckv.cache.LckvCache` when no cache is passed (resident sink + window,
    older tokens offloaded to host memory or evicted, as the policy says); forward calls without
    a cache apply the policy as a mask. Calling ``enable`` again replaces the policy.

    Prefill (selection policies): ``prefill="exact"`` (default) attends every earlier token, so a
    long prompt costs O(n^2); ``prefill="retrieval"`` makes a prompt fed in chunks
    (``generate(..., prefill_chunk_size=4096)``) linear: each chunk attends sink, window and itself
    exactly plus the offloaded rows the policy retrieves for it, and the prompt's last
    ``prefill_exact_tail`` positions attend everything (:mod:`lckv.policies.selection`).
    ``generate`` tells the cache where the prompt ends (:attr:`LckvCache.prompt_end`).

    Each call of ``model`` with an LckvCache is a transaction of that cache (the module
    docstring). Every policy takes ``max_host_bytes`` (default None: no limit): a cache whose host
    memory (offloaded K/V buffers, indexes, estimate, recorded queries) would grow past it raises
    :class:`~lckv.cache.HostMemoryLimitError` before allocating, and the call changes nothing.

    Raises :class:`~lckv.policies.PolicyConfigError` for unknown policies or bad settings and
    :class:`ModelNotSupportedError` for models without Llama/Qwen2-style attention modules.
    """
    policy = resolve_policy(policy, **settings)
    binding, modules = _binding_for(model, policy)
    policy.attach(model)
    register()
    previous = getattr(model, "lckv_binding", None)
    binding.previous_attn_implementation = (
        previous.previous_attn_implementation if previous is not None else model.config._attn_implementation)
    if previous is not None:
        _remove_hooks(previous)
    for m in modules:
        m.lckv_binding = binding
        binding._hooks.append(m.register_forward_pre_hook(_cache_recorder(binding, m), with_kwargs=True))
    binding.model_ref = weakref.ref(model)
    model.lckv_binding = binding
    model.set_attn_implementation(ATTENTION_NAME)
    if previous is None:
        _install_default_cache(model)
        _install_transactions(model)
    return binding


def disable(model) -> None:
    """Undoes :func:`enable`: restores the previous attention implementation and default cache.
    On a model that was never enabled (or already disabled) it does nothing."""
    binding = getattr(model, "lckv_binding", None)
    if binding is None:
        return
    _remove_hooks(binding)
    for m in _attention_modules(model):
        del m.lckv_binding
    del model.lckv_binding
    del model._prepare_cache_for_generation  # drop the instance overrides, back to the class methods
    vars(model).pop("_prefill", None)
    forward = vars(model).get("forward")
    if hasattr(forward, "lckv_previous"):  # ours: put back what was there (nothing, or e.g. accelerate's hook)
        if forward.lckv_previous is None:
            del model.forward
        else:
            model.forward = forward.lckv_previous
    model.set_attn_implementation(binding.previous_attn_implementation or "sdpa")


def _cache_argument(forward):
    """A function ``(args, kwargs) -> the past_key_values of a call of forward`` (by keyword, or
    by position in ``forward``'s signature)."""
    params = list(inspect.signature(forward).parameters)
    position = params.index("past_key_values") if "past_key_values" in params else None

    def cache_of(args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None and position is not None and len(args) > position:
            cache = args[position]
        return cache

    return cache_of


def _cache_recorder(binding: LckvBinding, module: torch.nn.Module):
    """The forward pre-hook that records which cache ``module`` is called with (see the module
    docstring)."""
    cache_of = _cache_argument(module.forward)

    def record(mod, args, kwargs):
        cache = cache_of(args, kwargs)
        binding._route.cache = cache
        if isinstance(cache, LckvCache):
            cache.routed = True

    return record


def _install_transactions(model) -> None:
    """Wraps ``model.forward`` (instance-level) so that a call with an LckvCache is one
    :meth:`~lckv.cache.LckvCache.transaction` of it; ``inspect.signature`` still sees the original."""
    inner = model.forward
    cache_of = _cache_argument(inner)

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        cache = cache_of(args, kwargs)
        if not isinstance(cache, LckvCache):
            return inner(*args, **kwargs)
        tokens, marker = cache.get_seq_length(), _growth_marker(cache)
        with cache.transaction():
            out = inner(*args, **kwargs)
        # the call's snapshot is gone: what it replaced (old store buffers, a chunk's resident K/V),
        # a selection build's scratch and the call's activations are free
        if memory.RELEASE_AFTER_CALLS and (cache.get_seq_length() > tokens + 1 or _growth_marker(cache) != marker):
            memory.release_free_memory()
        return out

    forward.lckv_previous = vars(model).get("forward")  # an instance-level forward, or None
    model.forward = forward


def _growth_marker(cache: LckvCache) -> tuple[int, int]:
    """What changes when a call frees large buffers without adding tokens: the rows the host stores
    have room for (a store grew: its old buffers are free) and the layers with a selection state
    (a build: its scratch is free)."""
    layers = [layer for layer in cache.layers if isinstance(layer, LckvCacheLayer)]
    return (sum(layer.store.capacity for layer in layers if layer.store is not None),
            sum(layer.selection is not None for layer in layers))


def _remove_hooks(binding: LckvBinding) -> None:
    for handle in binding._hooks:
        handle.remove()
    binding._hooks.clear()


def new_cache(model) -> LckvCache:
    """A fresh :class:`~lckv.cache.LckvCache` for a model that :func:`enable` was called on."""
    binding = getattr(model, "lckv_binding", None)
    if binding is None:
        raise ValueError(f"call lckv.enable(model, policy) before creating a cache for {type(model).__name__}")
    return binding.new_cache()


def _install_default_cache(model) -> None:
    """Makes ``generate`` create an LckvCache when the caller passes none, and tell it where the
    prompt ends (instance-level)."""
    original = type(model)._prepare_cache_for_generation

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        wants_default = (model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False
                         and generation_config.cache_implementation is None)
        if wants_default and getattr(self, "lckv_binding", None) is not None:
            model_kwargs["past_key_values"] = self.lckv_binding.new_cache()
            return
        return original(self, generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
    if hasattr(type(model), "_prefill"):
        model._prefill = types.MethodType(_announcing_prefill(type(model)._prefill), model)


def _announcing_prefill(original):
    """``GenerationMixin._prefill`` that first tells an LckvCache where the prompt ends
    (:attr:`LckvCache.prompt_end`): the attention mask's length (``generate`` makes one for the
    whole sequence), or the prompt's on an empty cache; unknown otherwise."""
    def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        cache = model_kwargs.get("past_key_values")
        if isinstance(cache, LckvCache):
            mask, held = model_kwargs.get("attention_mask"), cache.get_seq_length()
            end = mask.shape[-1] if isinstance(mask, torch.Tensor) else (input_ids.shape[-1] if held == 0 else None)
            cache.prompt_end = end if end is not None and end > held else None
        return original(self, input_ids, generation_config, model_kwargs, *args, **kwargs)

    return _prefill
