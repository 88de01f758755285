"""RetroLM bookmarks: a learned page index over the KV cache (Luo et al., "Does RAG Really Perform
Bad In Long-Context Processing?").

The context is cut into pages of ``page_size`` tokens and a bookmark token is appended to each
page. A bookmark runs through every decoder layer like a token of its own, with its own query,
key and value projections (``W_q^b``, ``W_k^b``, ``W_v^b`` beside the frozen model's; layer norms,
output projection and MLP are the model's): at layer ``l`` it attends its own page's keys and
values (the model's, post-RoPE) and itself, and no normal token ever attends a bookmark, so the
model's outputs for its own tokens are unchanged. A page's importance at layer ``l`` is the dot
product of the current page's bookmark query with the page's bookmark key (both before RoPE,
so the score does not depend on how far back the page lies), summed over the query heads of a kv
head's group and scaled by ``head_dim ** -0.5``.

This module holds the math, shared by the ``retrolm`` policy (:mod:`lckv.policies.retrolm`) and
the stage-1 training hook (``training/retrolm.py``):

* :class:`Bookmarks` — the per-layer bookmark projections and the bookmark embedding, initialised
  from the model's own (``W^b = W``, the embedding of ``config.eos_token_id``), so the untrained
  retriever scores pages as the model's attention would score an end-of-text token there;
  :meth:`Bookmarks.step` advances bookmarks through one layer; :meth:`Bookmarks.save` /
  :func:`load_bookmarks` store them in a small file keyed to the model;
* :func:`page_scores` and :func:`info_nce` — the page score and the contrastive loss of stage 1.

The bookmark of a page sits one position after the page's last token (RoPE of its attention over
the page). Bookmarks of normal pages and the query bookmark follow the same equations.
"""
from __future__ import annotations

import copy
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["Bookmarks", "BookmarkFileError", "StateFileError", "load_bookmarks", "page_scores", "info_nce",
           "FILE_FORMAT", "write_state_file", "read_state_file", "model_fingerprint"]

FILE_FORMAT = "lckv-retrolm-bookmarks/1"


class StateFileError(ValueError):
    """A parameter file (:func:`write_state_file`) is corrupt, of another format, or made for
    another model."""


class BookmarkFileError(StateFileError):
    """A bookmark file is corrupt, of another format, or made for another model."""


def _decoder_layers(model) -> tuple[nn.Module, list[nn.Module]]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    needed = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    if layers is None or getattr(inner, "embed_tokens", None) is None or getattr(inner, "rotary_emb", None) is None \
            or not all(hasattr(layer, n) for layer in layers for n in needed):
        from lckv.integrations.hf import ModelNotSupportedError

        raise ModelNotSupportedError(
            f"{type(model).__name__}: RetroLM bookmarks need a Llama/Qwen2-style model (model.model.layers with "
            "input_layernorm, self_attn, post_attention_layernorm, mlp; embed_tokens; rotary_emb)")
    return inner, list(layers)


class Bookmarks(nn.Module):
    """Bookmark projections of every layer of ``model`` plus the bookmark embedding.

    Parameters are copies (trainable); the model's own modules are referenced, never trained or
    saved. ``token_id`` picks the embedding the bookmark starts from (default: the config's EOS,
    else the mean embedding).
    """

    def __init__(self, model, token_id: int | None = None):
        super().__init__()
        inner, layers = _decoder_layers(model)
        config = model.config
        self.num_layers = len(layers)
        attn = layers[0].self_attn
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.q = nn.ModuleList(copy.deepcopy(layer.self_attn.q_proj) for layer in layers)
        self.k = nn.ModuleList(copy.deepcopy(layer.self_attn.k_proj) for layer in layers)
        self.v = nn.ModuleList(copy.deepcopy(layer.self_attn.v_proj) for layer in layers)
        weight = inner.embed_tokens.weight.detach()
        if token_id is None:
            eos = getattr(config, "eos_token_id", None)
            token_id = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        start = weight[token_id] if isinstance(token_id, int) and 0 <= token_id < weight.shape[0] else weight.mean(0)
        self.embedding = nn.Parameter(start.clone().float().to(weight.dtype))
        for p in self.parameters():
            p.requires_grad_(True)
        # the backbone: referenced outside the module tree (not parameters of this module)
        object.__setattr__(self, "_layers", layers)
        object.__setattr__(self, "_rotary", inner.rotary_emb)
        # the model's own RoPE function (transformers' modeling module of its attention class)
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if rope is None:
            from lckv.integrations.hf import ModelNotSupportedError

            raise ModelNotSupportedError(f"{type(attn).__module__} has no apply_rotary_pos_emb (Llama/Qwen2-style RoPE)")
        object.__setattr__(self, "_apply_rope", rope)
        self.fingerprint = model_fingerprint(model)

    # ------------------------------------------------------------------------------- the math
    def start(self, batch: int, n: int) -> torch.Tensor:
        """Layer-0 input of ``n`` bookmarks: ``[batch, n, hidden]``."""
        return self.embedding.expand(batch, n, -1)

    def _rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """``q`` ``[B, n, Hq, D]`` and ``k`` ``[B, n, Hkv, D]`` rotated at ``positions`` ``[n]``."""
        cos, sin = self._rotary(q, positions.to(q.device)[None])  # [1, n, D]
        return self._apply_rope(q, k, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim=2)

    def step(self, layer_idx: int, h: torch.Tensor, page_k: torch.Tensor, page_v: torch.Tensor,
             page_valid: torch.Tensor | None, positions: torch.Tensor):
        """Advances ``n`` bookmarks through layer ``layer_idx``.

        ``h`` ``[B, n, hidden]`` their input hidden states; ``page_k``/``page_v`` ``[B, Hkv, n, w,
        D]`` the keys and values (the model's, post-RoPE) of each bookmark's page; ``page_valid``
        ``[B, n, w]`` bool (None: all real); ``positions`` ``[n]`` the bookmarks' positions.
        Returns ``(q [B, n, Hq, D], k [B, n, Hkv, D], h_next [B, n, hidden])`` with ``q``/``k``
        before RoPE (the page index's query and key).
        """
        layer = self._layers[layer_idx]
        batch, n, _ = h.shape
        x = layer.input_layernorm(h)
        q = self.q[layer_idx](x).view(batch, n, self.num_heads, self.head_dim)
        k = self.k[layer_idx](x).view(batch, n, self.num_kv_heads, self.head_dim)
        v = self.v[layer_idx](x).view(batch, n, self.num_kv_heads, self.head_dim)
        q_rot, k_rot = self._rope(q, k, positions)
        group = self.num_heads // self.num_kv_heads
        qg = q_rot.view(batch, n, self.num_kv_heads, group, self.head_dim).float()
        pk, pv = page_k.float(), page_v.float()
        logits_page = torch.einsum("bnhgd,bhnwd->bnhgw", qg, pk) * self.scaling
        if page_valid is not None:
            logits_page = logits_page.masked_fill(~page_valid[:, :, None, None, :], float("-inf"))
        logit_self = torch.einsum("bnhgd,bnhd->bnhg", qg, k_rot.float())[..., None] * self.scaling
        probs = torch.softmax(torch.cat([logits_page, logit_self], dim=-1), dim=-1)
        out = torch.einsum("bnhgw,bhnwd->bnhgd", probs[..., :-1], pv) + probs[..., -1:] * v.float()[:, :, :, None]
        attn = layer.self_attn.o_proj(out.reshape(batch, n, -1).to(h.dtype))
        h = h + attn
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return q, k, h

    # ------------------------------------------------------------------------------- the file
    def save(self, path: str | Path) -> Path:
        """Writes the parameters, their sha256 and the model fingerprint to ``path`` atomically
        (:func:`write_state_file`)."""
        return write_state_file(path, FILE_FORMAT, self.fingerprint, self.state_dict())


def write_state_file(path: str | Path, file_format: str, fingerprint: dict, state: dict) -> Path:
    """Writes ``state`` (name -> tensor), its sha256 and the model ``fingerprint`` to ``path``
    atomically (a temporary file in the same folder, then renamed): an interrupted save leaves no
    partial file, and a file corrupted later fails the checksum when read
    (:func:`read_state_file`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in state.items()}
    payload = {"format": file_format, "fingerprint": fingerprint, "state": state, "state_sha256": _state_digest(state)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_state_file(path: str | Path, file_format: str, fingerprint: dict, what: str = "state",
                    error: type[StateFileError] = StateFileError) -> dict:
    """The state saved at ``path`` by :func:`write_state_file`. Raises FileNotFoundError when the
    file is missing and ``error`` (naming ``what``) when it is corrupt (unreadable, or its
    parameters fail the checksum saved with them), of another format, made for another model than
    ``fingerprint`` (the differing fields are named) or not a dict of tensors. Files saved without a
    checksum are read unchecked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or not a torch file
        raise error(f"{what}: {path} is not a readable {what} file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise error(f"{what}: {path} is not a {file_format} file")
    theirs = payload.get("fingerprint")
    theirs = theirs if isinstance(theirs, dict) else {}
    differ = sorted(k for k in fingerprint if theirs.get(k) != fingerprint[k])
    if differ:
        raise error(f"{what}: {path} was made for another model ({', '.join(differ)} differ)")
    state = payload.get("state")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(f"{what}: {path} does not hold a dict of parameter tensors")
    if "state_sha256" in payload and payload["state_sha256"] != _state_digest(state):
        raise error(f"{what}: {path} is corrupt: its parameters fail the checksum saved with them")
    return state


def model_fingerprint(model) -> dict:
    """What a bookmark file must match: the geometry and a hash of layer 0's query projection."""
    config = model.config
    _, layers = _decoder_layers(model)
    weight = layers[0].self_attn.q_proj.weight.detach().float().cpu().contiguous()
    return {"model_type": getattr(config, "model_type", None), "hidden_size": config.hidden_size,
            "num_layers": len(layers), "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "q_proj_sha1": hashlib.sha1(weight.numpy().tobytes()).hexdigest()}


def _state_digest(state: dict) -> str:
    """sha256 of the parameters (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_bookmarks(path: str | Path, model) -> Bookmarks:
    """The bookmarks saved at ``path`` for ``model``. Raises FileNotFoundError when the file is
    missing and :class:`BookmarkFileError` when it is corrupt (unreadable, or its parameters fail
    the checksum saved with them), of another format or made for another model (the differing
    fingerprint fields are named). Files saved without a checksum load unchecked."""
    bookmarks = Bookmarks(model)
    state = read_state_file(path, FILE_FORMAT, bookmarks.fingerprint, "bookmarks", BookmarkFileError)
    try:
        bookmarks.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        raise BookmarkFileError(f"bookmarks: {path} does not hold this model's parameters: {exc}") from exc
    return bookmarks


def page_scores(q: torch.Tensor, page_keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Page scores: ``q`` ``[B, Hq, D]`` (a bookmark query), ``page_keys`` ``[B, Hkv, P, D]`` ->
    ``[B, Hkv, P]``, the dot products summed over each kv head's query group, times ``scale``."""
    from lckv.policies.group_rank import group_sum

    return torch.einsum("bhd,bhpd->bhp", group_sum(q, page_keys.shape[1]), page_keys.float()) * scale


def info_nce(scores: torch.Tensor, positive: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Contrastive loss of stage 1: ``-log(sum_pos softmax(scores / t))`` over the pages (last
    dim), averaged over the other dims. ``positive`` ``[..., P]`` bool, at least one per row."""
    if not bool(positive.any(dim=-1).all()):
        raise ValueError("info_nce: every row needs at least one positive page")
    logp = torch.log_softmax(scores / temperature, dim=-1)
    return -torch.logsumexp(logp.masked_fill(~positive, float("-inf")), dim=-1).mean()
