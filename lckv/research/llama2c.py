"""Loads llama2.c checkpoints (legacy format) as a transformers ``LlamaForCausalLM``.

The real model used throughout tests and benchmarks is Karpathy's stories260K: a 5-layer Llama
with dim 64, 8 query heads and 4 kv heads (head_dim 8, GQA 2), trained on TinyStories.

Checkpoint layout (all little-endian): seven int32 ``dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len`` (``vocab_size < 0`` means an untied classifier follows), then
float32 arrays: token embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, the RoPE
cos/sin tables ``[seq_len, head_dim/2]`` each, and (untied only) the classifier.

llama2.c rotates adjacent pairs ``(x[2i], x[2i+1])``; HF Llama rotates ``(x[i], x[i+d/2])``. The
rows of wq and wk are permuted per head so the converted model computes the same attention scores.

Tokenizer layout: int32 ``max_token_length``, then per token ``{float32 score, int32 length,
bytes}``. Ids 0 ``<unk>``, 1 BOS, 2 EOS, 3..258 the bytes ``<0x00>``..``<0xFF>``; encoding merges
the adjacent pair whose merged piece has the highest score, repeatedly. It is rebuilt here as a
``tokenizers`` BPE model (merges ranked by the merged piece's score, byte fallback, SentencePiece
style leading space) inside a ``PreTrainedTokenizerFast`` that prepends BOS.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["load", "load_model", "load_tokenizer", "Llama2cHeader", "CheckpointFormatError"]

_HEADER = struct.Struct("<7i")


class CheckpointFormatError(ValueError):
    """A llama2.c checkpoint or tokenizer file is missing, truncated or malformed."""


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def array_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the float32 arrays, in file order."""
        L, D, H, kv_dim = self.n_layers, self.dim, self.hidden_dim, self.n_kv_heads * self.head_dim
        shapes = [
            ("tok_embeddings", (self.vocab_size, D)),
            ("rms_att", (L, D)),
            ("wq", (L, D, D)),
            ("wk", (L, kv_dim, D)),
            ("wv", (L, kv_dim, D)),
            ("wo", (L, D, D)),
            ("rms_ffn", (L, D)),
            ("w1", (L, H, D)),
            ("w2", (L, D, H)),
            ("w3", (L, H, D)),
            ("rms_final", (D,)),
            ("freq_cis_real", (self.seq_len, self.head_dim // 2)),
            ("freq_cis_imag", (self.seq_len, self.head_dim // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (self.vocab_size, D)))
        return shapes

    def expected_bytes(self) -> int:
        return _HEADER.size + 4 * sum(int(np.prod(s)) for _, s in self.array_shapes())


def _read_bytes(path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"{what} file {path} does not exist")
    return path.read_bytes()


def read_header(data: bytes, path) -> Llama2cHeader:
    if len(data) < _HEADER.size:
        raise CheckpointFormatError(
            f"checkpoint {path}: {len(data)} bytes, expected at least a {_HEADER.size}-byte header of 7 int32")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = _HEADER.unpack_from(data, 0)
    header = Llama2cHeader(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, vocab > 0)
    fields = dict(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                  vocab_size=abs(vocab), seq_len=seq_len)
    bad = [f"{k}={v}" for k, v in fields.items() if not 0 < v <= 1 << 20]
    if bad or dim % heads or heads % kv_heads or (dim // heads) % 2:
        raise CheckpointFormatError(
            f"checkpoint {path}: bad header {fields}; expected positive sizes with dim divisible by "
            "n_heads, n_heads divisible by n_kv_heads and an even head_dim")
    return header


def load_model(checkpoint_path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
               max_position_embeddings: int | None = None):
    """Reads a llama2.c checkpoint into a ``LlamaForCausalLM`` (eval mode).

    ``max_position_embeddings`` defaults to the checkpoint's ``seq_len`` (the trained length);
    RoPE itself is computed for any position, so longer inputs run (extrapolated).
    Raises :class:`CheckpointFormatError` naming the file for a missing file, a bad header or a
    size that does not match the header.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    data = _read_bytes(checkpoint_path, "checkpoint")
    h = read_header(data, checkpoint_path)
    if len(data) != h.expected_bytes():
        raise CheckpointFormatError(
            f"checkpoint {checkpoint_path}: {len(data)} bytes, expected {h.expected_bytes()} for header "
            f"dim={h.dim} hidden_dim={h.hidden_dim} n_layers={h.n_layers} n_heads={h.n_heads} "
            f"n_kv_heads={h.n_kv_heads} vocab_size={h.vocab_size} seq_len={h.seq_len} (truncated or not llama2.c legacy format)")
    arrays, offset = {}, _HEADER.size
    for name, shape in h.array_shapes():
        count = int(np.prod(shape))
        arrays[name] = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(shape).copy())
        offset += 4 * count
    for name, tensor in arrays.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointFormatError(f"checkpoint {checkpoint_path}: array {name} contains NaN or inf")

    config = LlamaConfig(
        vocab_size=h.vocab_size, hidden_size=h.dim, intermediate_size=h.hidden_dim,
        num_hidden_layers=h.n_layers, num_attention_heads=h.n_heads, num_key_value_heads=h.n_kv_heads,
        head_dim=h.head_dim, max_position_embeddings=max_position_embeddings or h.seq_len,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=h.shared_classifier, hidden_act="silu", bos_token_id=1, eos_token_id=2,
        attention_bias=False, mlp_bias=False,
    )
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    model.model.rotary_emb.__init__(config)  # rebuild the RoPE buffer on the real device
    _load_weights(model, h, arrays)
    model.eval()
    return model.to(dtype)


def _pair_to_half_rotation(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Permutes each head's rows from (2i, 2i+1) pairs to (i, i + d/2) pairs."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return w.reshape(heads, head_dim, -1)[:, order].reshape(heads * head_dim, -1)


def _load_weights(model, h: Llama2cHeader, a: dict):
    m = model.model
    with torch.no_grad():
        m.embed_tokens.weight.copy_(a["tok_embeddings"])
        for i, layer in enumerate(m.layers):
            layer.input_layernorm.weight.copy_(a["rms_att"][i])
            layer.self_attn.q_proj.weight.copy_(_pair_to_half_rotation(a["wq"][i], h.n_heads, h.head_dim))
            layer.self_attn.k_proj.weight.copy_(_pair_to_half_rotation(a["wk"][i], h.n_kv_heads, h.head_dim))
            layer.self_attn.v_proj.weight.copy_(a["wv"][i])
            layer.self_attn.o_proj.weight.copy_(a["wo"][i])
            layer.post_attention_layernorm.weight.copy_(a["rms_ffn"][i])
            layer.mlp.gate_proj.weight.copy_(a["w1"][i])
            layer.mlp.down_proj.weight.copy_(a["w2"][i])
            layer.mlp.up_proj.weight.copy_(a["w3"][i])
        m.norm.weight.copy_(a["rms_final"])
        if h.shared_classifier:
            model.tie_weights()
        else:
            model.lm_head.weight.copy_(a["wcls"])


def read_tokenizer_file(tokenizer_path, vocab_size: int = 512) -> list[tuple[bytes, float]]:
    """Returns ``[(piece bytes, score)]`` of a llama2.c tokenizer file."""
    data = _read_bytes(tokenizer_path, "tokenizer")
    pieces, offset = [], 4
    try:
        (max_len,) = struct.unpack_from("<i", data, 0)
        for i in range(vocab_size):
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            if not 0 < length <= max(max_len, 16) or offset + length > len(data):
                raise CheckpointFormatError(
                    f"tokenizer {tokenizer_path}: entry {i} has length {length}, expected 1..{max_len} within the file")
            pieces.append((data[offset:offset + length], score))
            offset += length
    except struct.error:
        raise CheckpointFormatError(
            f"tokenizer {tokenizer_path}: truncated after {len(pieces)} of {vocab_size} entries") from None
    if offset != len(data):
        raise CheckpointFormatError(
            f"tokenizer {tokenizer_path}: {len(data) - offset} trailing bytes after {vocab_size} entries; "
            "expected a llama2.c tokenizer for this vocabulary size")
    if pieces[1][0].strip() != b"<s>" or pieces[2][0].strip() != b"</s>":
        raise CheckpointFormatError(f"tokenizer {tokenizer_path}: ids 1 and 2 must be <s> and </s>")
    return pieces


def load_tokenizer(tokenizer_path, vocab_size: int = 512):
    """Builds a ``PreTrainedTokenizerFast`` equivalent to the llama2.c tokenizer file."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = read_tokenizer_file(tokenizer_path, vocab_size)
    names = []
    for i, (raw, _) in enumerate(pieces):
        if i in (0, 1, 2):
            names.append(["<unk>", "<s>", "</s>"][i])
        else:
            names.append(raw.decode("utf-8", errors="replace").replace(" ", "\u2581"))
    vocab = {name: i for i, name in enumerate(names)}
    if len(vocab) != len(names):
        raise CheckpointFormatError(f"tokenizer {tokenizer_path}: duplicate pieces")
    # Every split of a mergeable piece into two vocabulary pieces is a merge; rank merges by the
    # merged piece's score (highest first), as llama2.c picks the best-scoring merge each step.
    merges = []
    for i in sorted(range(259, len(names)), key=lambda j: -pieces[j][1]):
        piece = names[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=1 << 30, clean_up_tokenization_spaces=False)


def load(checkpoint_path, tokenizer_path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
         max_position_embeddings: int | None = None):
    """Returns ``(model, tokenizer)`` for a llama2.c checkpoint and tokenizer file.

    Example
    -------
    >>> model, tok = load("stories260K.bin", "tok512.bin")  # doctest: +SKIP
    >>> ids = model.generate(torch.tensor([[1]]), max_new_tokens=40, do_sample=False)
    >>> tok.decode(ids[0], skip_special_tokens=True)  # "Once upon a time, there was ..."
    """
    model = load_model(checkpoint_path, dtype, attn_implementation, max_position_embeddings)
    tokenizer = load_tokenizer(tokenizer_path, model.config.vocab_size)
    return model, tokenizer
