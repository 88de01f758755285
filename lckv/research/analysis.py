"""Attention analysis: how much attention each prompt token receives at prefill.

:func:`received_attention` runs one prefill of any transformers decoder (Llama/Qwen2 style, e.g.
stories260K from :func:`lckv.research.llama2c.load`) with a probe attention backend registered as
``"lckv_probe"``. The probe computes exact causal attention (fp32 accumulation), query chunk by
query chunk, so a prompt of length ``L`` never materialises more than
``[batch, q_heads, query_chunk, L]`` scores at once, and accumulates the softmax's column sums:

    received[b, j] = mean over layers and query heads of  sum over query positions i of  P[b, h, i, j]

Each row of ``P`` sums to 1, so ``received[b].sum()`` equals the number of (unpadded) query
positions. :func:`span_sums` adds it up per token span, e.g. per ``[DOC i]`` block.
:func:`encode_segments` tokenises a prompt piece by piece so those spans are known exactly.

The accumulator is bound explicitly to the attention modules for the duration of one call
(``module.lckv_probe``) and removed afterwards; the model's attention implementation is
restored even if the forward raises.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, prepare_padding_mask

__all__ = ["PROBE_NAME", "register_probe", "received_attention", "encode_segments", "span_sums"]

PROBE_NAME = "lckv_probe"


class _KeyPadding:
    """Key padding of a causal prefill: ``keep [batch, kv_len]`` bool, True = real token."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep


class _Accumulator:
    def __init__(self, query_chunk: int):
        self.query_chunk = query_chunk
        self.per_layer: dict[int, torch.Tensor] = {}

    def add(self, layer_idx: int, column_sums: torch.Tensor) -> None:
        if layer_idx in self.per_layer:
            raise RuntimeError(f"layer {layer_idx} was probed twice in one prefill")
        self.per_layer[layer_idx] = column_sums


def probe_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
               mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask function of the probe: the causal pattern is applied inside the attention function,
    so only the key padding (if any) is passed on, never an ``[L, L]`` mask."""
    if mask_function is not causal_mask_function or kv_offset != 0:
        raise NotImplementedError("the attention probe supports plain causal prefill only "
                                  "(no sliding-window or bidirectional layers, no cache offset)")
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        return None
    keep = padding[:, :kv_length].bool()
    return None if bool(keep.all()) else _KeyPadding(keep)


def probe_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """Exact causal attention, chunked over queries; adds the softmax column sums (summed over
    queries, averaged over heads) to the accumulator bound to ``module``.

    ``query [B, Hq, q_len, D]``, ``key/value [B, Hkv, kv_len, D]``; returns
    ``(out [B, q_len, Hq, D], None)``.
    """
    acc: _Accumulator | None = getattr(module, "lckv_probe", None)
    if acc is None:
        raise RuntimeError("lckv_probe attention used outside lckv.research.analysis.received_attention")
    batch, q_heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    groups = q_heads // key.shape[1]
    scaling = head_dim ** -0.5 if scaling is None else scaling
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    keep = attention_mask.keep if isinstance(attention_mask, _KeyPadding) else None
    if attention_mask is not None and keep is None:
        raise TypeError(f"unexpected attention_mask of type {type(attention_mask).__name__} for the probe")
    out = torch.empty(batch, q_heads, q_len, head_dim, dtype=torch.float32, device=query.device)
    column_sums = torch.zeros(batch, kv_len, dtype=torch.float32, device=query.device)
    key_pos = torch.arange(kv_len, device=query.device)
    offset = kv_len - q_len
    for start in range(0, q_len, acc.query_chunk):
        end = min(start + acc.query_chunk, q_len)
        visible = offset + end  # keys past the chunk's last query are masked for every row: skip them
        scores = torch.matmul(query[:, :, start:end].float(), k[:, :, :visible].transpose(-1, -2))
        scores.mul_(scaling)  # [B, Hq, c, visible]
        allowed = key_pos[None, :visible] <= (offset + torch.arange(start, end, device=query.device))[:, None]
        allowed = allowed[None, None]
        if keep is not None:
            allowed = allowed & keep[:, None, None, :visible]
        scores.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if keep is not None:  # fully masked rows (padded queries) give NaN: they count as 0
            probs.nan_to_num_(0.0)
            probs.mul_(keep[:, None, start:end, None])
        out[:, :, start:end] = torch.matmul(probs, v[:, :, :visible])
        column_sums[:, :visible] += probs.sum(dim=(1, 2))
    acc.add(module.layer_idx, column_sums / q_heads)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register_probe() -> None:
    """Registers ``"lckv_probe"`` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(PROBE_NAME, probe_attention_forward)
    AttentionMaskInterface.register(PROBE_NAME, probe_mask)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]


@torch.no_grad()
def received_attention(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       query_chunk: int = 128) -> torch.Tensor:
    """Attention each key token receives during prefill of ``input_ids``.

    Args:
        model: a transformers causal LM or base model whose attention modules have ``layer_idx``
            and dispatch through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Mistral, ...).
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
    if attention_mask is not None:
        attention_mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
    if not isinstance(query_chunk, int) or query_chunk < 1:
        raise ValueError(f"query_chunk must be a positive int, got {query_chunk!r}")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with layer_idx to probe")
    register_probe()
    acc = _Accumulator(query_chunk)
    previous = model.config._attn_implementation
    base = getattr(model, "base_model", model)
    try:
        model.set_attn_implementation(PROBE_NAME)
        for m in modules:
            m.lckv_probe = acc
        base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for m in modules:
            if hasattr(m, "lckv_probe"):
                del m.lckv_probe
        model.set_attn_implementation(previous)
    if len(acc.per_layer) != len(modules):
        raise RuntimeError(f"probed {len(acc.per_layer)} of {len(modules)} attention layers")
    received = torch.stack(list(acc.per_layer.values())).mean(dim=0)
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
