"""Captures the post-RoPE queries and keys a model computes on a text, per layer and head.

Used to build real evaluation data for the vector indexes and the selection policies: decode
queries and keys come from different distributions, which is what the attention-aware index
exploits. Exact causal prefill costs O(T^2) (64K tokens of stories260K take minutes on 2 cores),
so long captures may use a sink + local-window prefill (each chunk attends the first ``sink``
tokens and the last ``window`` tokens only, linear cost); :attr:`CapturedQK.prefill` says which.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lckv.research.data import hotpotqa_paragraphs
from lckv.integrations.hf import disable, enable
from lckv.policies import FullPolicy, StreamingPolicy

__all__ = ["CapturedQK", "capture_qk", "hotpotqa_token_ids"]


@dataclass
class CapturedQK:
    """Per-layer post-RoPE queries ``q[layer]`` ``[q_heads, T, head_dim]`` and keys ``k[layer]``
    ``[kv_heads, T, head_dim]`` (float32, CPU); ``prefill`` describes how they were computed."""

    q: dict[int, torch.Tensor]
    k: dict[int, torch.Tensor]
    prefill: str

    @property
    def num_tokens(self) -> int:
        return next(iter(self.k.values())).shape[1]


def capture_qk(model, input_ids: torch.Tensor, layers=None, window: int | None = None, sink: int = 4,
               chunk_size: int = 1024) -> CapturedQK:
    """Runs ``input_ids`` (``[T]`` or ``[1, T]``) through ``model`` in chunks and records Q and K.

    ``window=None`` attends every earlier token exactly (policy ``full``); an int uses a sink +
    local-window prefill (policy ``streaming``). ``layers`` selects layer indices (default all).
    The model's lckv binding, if any, is restored afterwards.
    """
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [T] or [1, T] with T >= 1, got {tuple(input_ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    config = model.config
    layers = list(range(config.num_hidden_layers)) if layers is None else sorted(set(layers))
    if not layers or layers[0] < 0 or layers[-1] >= config.num_hidden_layers:
        raise ValueError(f"layers must be indices in [0, {config.num_hidden_layers}), got {layers}")
    total = ids.shape[1]
    if window is None:
        policy, prefill = FullPolicy(sink=sink, window=chunk_size), "exact causal prefill"
    else:
        policy = StreamingPolicy(sink=sink, window=window)
        prefill = f"sink+local-window prefill (sink={sink}, window={window}, chunk={chunk_size})"
    previous = getattr(model, "lckv_binding", None)
    binding = enable(model, policy)
    head_dim = binding.head_dim
    q = {i: torch.empty(config.num_attention_heads, total, head_dim) for i in layers}
    k = {i: torch.empty(config.num_key_value_heads, total, head_dim) for i in layers}
    filled = dict.fromkeys(layers, 0)

    def observe(module, query, new_keys, new_values):
        i = module.layer_idx
        if i in filled:
            n = query.shape[2]
            q[i][:, filled[i]:filled[i] + n] = query[0].float().cpu()
            k[i][:, filled[i]:filled[i] + n] = new_keys[0].float().cpu()
            filled[i] += n

    binding.observers.append(observe)
    try:
        cache = binding.new_cache()
        with torch.no_grad():
            for lo in range(0, total, chunk_size):
                model.model(ids[:, lo:lo + chunk_size], past_key_values=cache, use_cache=True)
    finally:
        if previous is not None:
            enable(model, previous.policy)
        else:
            disable(model)
    return CapturedQK(q, k, prefill)


def hotpotqa_token_ids(tokenizer, num_tokens: int, path: str | Path | None = None, seed: int = 0) -> torch.Tensor:
    """``num_tokens`` token ids of real HotpotQA context text (BOS first when the tokenizer has one).

    Paragraphs ("title: sentences") of the rows are joined in a seeded random order; when the
    rows run out, another shuffled pass over the same paragraphs continues the text.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    paragraphs = hotpotqa_paragraphs(path)
    rng = random.Random(seed)
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []  # Qwen has no BOS
    while len(ids) < num_tokens:
        rng.shuffle(paragraphs)
        for paragraph in paragraphs:
            ids.extend(tokenizer.encode(paragraph, add_special_tokens=False))
            if len(ids) >= num_tokens:
                break
    return torch.tensor(ids[:num_tokens])
