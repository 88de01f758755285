"""Attention analysis: how much attention each prompt token receives at prefill.

:func:`received_attention` runs one prefill of any transformers decoder (Llama/Qwen2 style, e.g.
stories260K from :func:`lckv.research.llama2c.load`) through lckv's own attention backend with the
``full`` policy (exact attention), and an observer (:attr:`lckv.integrations.hf.LckvBinding.observers`)
that receives each layer's post-RoPE queries and keys and accumulates the softmax's column sums,
query chunk by query chunk, so a prompt of length ``L`` never materialises more than
``[batch, q_heads, query_chunk, L]`` scores at once:

    received[b, j] = mean over layers and query heads of  sum over query positions i of  P[b, h, i, j]

Each row of ``P`` sums to 1, so ``received[b].sum()`` equals the number of (unpadded) query
positions. :func:`span_sums` adds it up per token span, e.g. per ``[DOC i]`` block.
:func:`encode_segments` tokenises a prompt piece by piece so those spans are known exactly.

A model that :func:`lckv.enable` already bound keeps its binding (the observer joins it for the
call); any other model is bound to ``full`` for the call and restored afterwards, even if the
forward raises.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from lckv.integrations.hf import disable, enable

__all__ = ["received_attention", "encode_segments", "span_sums"]


def _column_sums(query: torch.Tensor, key: torch.Tensor, keep: torch.Tensor | None, scaling: float,
                 query_chunk: int) -> torch.Tensor:
    """Softmax column sums of causal attention ``[batch, kv_len]`` (summed over queries and heads):
    ``query [B, Hq, L, D]`` and ``key [B, Hkv, L, D]`` of the same tokens, ``keep [B, L]`` or None."""
    batch, q_heads, q_len, _ = query.shape
    k = key.float().repeat_interleave(q_heads // key.shape[1], dim=1)
    sums = torch.zeros(batch, q_len, dtype=torch.float32, device=query.device)
    key_pos = torch.arange(q_len, device=query.device)
    for start in range(0, q_len, query_chunk):
        end = min(start + query_chunk, q_len)  # keys after the chunk's last query are masked for every row
        scores = torch.matmul(query[:, :, start:end].float(), k[:, :, :end].transpose(-1, -2)).mul_(scaling)
        allowed = (key_pos[None, :end] <= torch.arange(start, end, device=query.device)[:, None])[None, None]
        if keep is not None:
            allowed = allowed & keep[:, None, None, :end]
        probs = torch.softmax(scores.masked_fill_(~allowed, float("-inf")), dim=-1)
        if keep is not None:  # fully masked rows (padded queries) give NaN: they count as 0
            probs = probs.nan_to_num_(0.0) * keep[:, None, start:end, None]
        sums[:, :end] += probs.sum(dim=(1, 2))
    return sums


@torch.no_grad()
def received_attention(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       query_chunk: int = 128) -> torch.Tensor:
    """Attention each key token receives during prefill of ``input_ids``.

    Args:
        model: a transformers causal LM whose attention modules :func:`lckv.enable` accepts
            (Llama, Qwen2, Mistral, ...).
        input_ids: ``[batch, seq]`` (or ``[seq]``) token ids.
        attention_mask: optional ``[batch, seq]`` 1/0 padding mask; padded positions neither
            receive nor give attention.
        query_chunk: queries per chunk; peak score memory is ``batch*q_heads*query_chunk*seq`` fp32.

    Returns:
        ``[batch, seq]`` float32 (``[seq]`` for 1-D input): per key token, attention summed over
        query positions, averaged over heads and layers.

    >>> from lckv.research.llama2c import load                      # doctest: +SKIP
    >>> model, tok = load("stories260K.bin", "tok512.bin")        # doctest: +SKIP
    >>> received_attention(model, torch.tensor(tok.encode("Once upon a time"))).shape  # doctest: +SKIP
    torch.Size([5])
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64/int32 torch.Tensor, got {type(input_ids).__name__}"
                        + (f" of dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else ""))
    squeeze = input_ids.dim() == 1
    if squeeze:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [batch, seq] with seq >= 1, got {tuple(input_ids.shape)}")
    keep = None
    if attention_mask is not None:
        attention_mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        keep = None if bool(attention_mask.bool().all()) else attention_mask.bool()
    if not isinstance(query_chunk, int) or query_chunk < 1:
        raise ValueError(f"query_chunk must be a positive int, got {query_chunk!r}")
    per_layer: dict[int, torch.Tensor] = {}

    def observe(module, query, keys, values):
        if module.layer_idx in per_layer:
            raise RuntimeError(f"layer {module.layer_idx} was observed twice in one prefill")
        scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        per_layer[module.layer_idx] = _column_sums(query, keys, keep, scaling, query_chunk) / query.shape[1]

    binding = getattr(model, "lckv_binding", None)
    bound_here = binding is None
    if bound_here:
        binding = enable(model, "full")
    binding.observers.append(observe)
    try:
        getattr(model, "base_model", model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        binding.observers.remove(observe)
        if bound_here:
            disable(model)
    if len(per_layer) != binding.num_layers:
        raise RuntimeError(f"observed {len(per_layer)} of {binding.num_layers} attention layers")
    received = torch.stack([per_layer[i] for i in sorted(per_layer)]).mean(dim=0)
    return received[0] if squeeze else received


def encode_segments(tokenizer, segments: Sequence[str], bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the concatenated segments and each segment's ``[start, end)`` token span.

    Each segment is encoded on its own without special tokens (so spans are exact); the
    tokenizer's BOS id is prepended when ``bos`` and the tokenizer has one.
    """
    ids: list[int] = []
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos and bos_id is not None:
        ids.append(int(bos_id))
    spans = []
    for seg in segments:
        if not isinstance(seg, str):
            raise TypeError(f"segments must be strings, got {type(seg).__name__}")
        piece = tokenizer(seg, add_special_tokens=False)["input_ids"] if callable(tokenizer) else tokenizer.encode(seg)
        spans.append((len(ids), len(ids) + len(piece)))
        ids.extend(int(t) for t in piece)
    return ids, spans


def span_sums(received: torch.Tensor, spans: Sequence[tuple[int, int]]) -> list[float]:
    """Sum of ``received [seq]`` over each ``[start, end)`` span."""
    if received.dim() != 1:
        raise ValueError(f"received must have shape [seq], got {tuple(received.shape)}")
    n = received.shape[0]
    out = []
    for start, end in spans:
        if not 0 <= start <= end <= n:
            raise ValueError(f"span ({start}, {end}) is outside [0, {n}]")
        out.append(float(received[start:end].sum()))
    return out
