"""Saving an :class:`~lckv.cache.LckvCache` to a file and loading it back, so a long context
survives a restart.

>>> cache.save("context.lckv")                                   # doctest: +SKIP
>>> # later, in a new process: the same model, enabled with the same policy
>>> lckv.enable(model, "retrieval", budget=2048)                 # doctest: +SKIP
>>> from lckv.persist import load_cache
>>> cache = load_cache("context.lckv", model)                     # doctest: +SKIP

What a file holds: per layer, the resident K/V (sink and recent window), the host store's rows,
the token counts, the key padding, the recorded prefill queries and the selection state's
:class:`~lckv.cache.SelectionLog`; the policy settings of every layer; and a fingerprint of the
model (class, geometry, sha256 of the key projections' weights). What load rebuilds: the
selection state (vector indexes, cluster estimate, page bounds, ...), by replaying the policy's
``build`` and ``on_offload`` over the saved rows exactly as they ran (same rows, same chunks, same
global RNG state), so a deterministic policy gets the same state back and decoding continues with
the same logits. The C++ indexes expose no state of their own; the replay costs what building
them and inserting every row cost (decode steps replay one row at a time).

File layout: a 54-byte header (:data:`MAGIC`, the format version, the sha256 of the payload and
its length), then the payload: records of 8-byte length + ``torch.save`` data (the metadata, then
one record per layer, so saving holds one layer's copy at a time), read with ``weights_only``.
Saving writes a temporary file beside ``path`` and renames it (a crash leaves the old file or
none, never half of one).

Errors: ``FileNotFoundError`` naming the path; :class:`CacheFileError` for a file that is not an
lckv cache, of another format version, truncated, or whose checksum does not match;
:class:`CacheMismatchError` for a file saved for another model or another policy.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import struct
import tempfile
from dataclasses import fields

import torch

from lckv.cache import LckvCache

__all__ = ["save_cache", "load_cache", "CacheFileError", "CacheMismatchError", "FORMAT_VERSION", "MAGIC"]

MAGIC = b"LCKVCACHE\x00"
FORMAT_VERSION = 1
#: magic, format version, sha256 of the payload, payload bytes
_HEADER = struct.Struct("<10sI32sQ")
_LENGTH = struct.Struct("<Q")
_BLOCK = 1 << 20


class CacheFileError(ValueError):
    """The file is not a readable lckv cache of this format (truncated, corrupt, another format)."""


class CacheMismatchError(ValueError):
    """The file was saved for another model or another policy than the one it is loaded into."""


def save_cache(cache: LckvCache, path, model=None) -> None:
    """Writes ``cache`` to ``path`` atomically; ``model`` (default: the one :func:`lckv.new_cache`
    made the cache for) supplies the fingerprint. Call it between model calls: inside one, or
    while another thread uses the cache, it raises (``RuntimeError``,
    :class:`~lckv.cache.ConcurrentCacheUseError`)."""
    if model is None and cache.model_ref is not None:
        model = cache.model_ref()
    if model is None:
        raise ValueError("save needs the model the cache was made for: create the cache with lckv.new_cache(model) "
                         "or pass model=")
    with cache.exclusive() as outermost:
        if not outermost:
            raise RuntimeError("LckvCache.save was called inside a model call on this cache; save between calls")
        meta = {"model": _fingerprint(model), "policies": [_settings(layer.policy) for layer in cache.layers],
                "shared": cache.shared}
        _write_atomic(os.fspath(path), [lambda: meta] + [layer.export_state for layer in cache.layers])


def load_cache(path, model) -> LckvCache:
    """A new :class:`~lckv.cache.LckvCache` for ``model`` (enabled with the policy the file was
    saved with) holding what ``path`` holds, its selection state rebuilt (module docstring).
    Resident tensors go to the device of the model's parameters."""
    fingerprint = _fingerprint(model)
    cache = model.lckv_binding.new_cache()
    device = next(model.parameters()).device
    with contextlib.closing(_read_records(os.fspath(path))) as records, cache.exclusive():
        meta = next(records)
        _check_same(path, "model", meta["model"], fingerprint)
        _check_same(path, "policy", meta["policies"], [_settings(layer.policy) for layer in cache.layers])
        for layer, state in zip(cache.layers, records):
            if state is not None:
                layer.import_state(state, device)
        cache.shared.update(meta["shared"])
        cache.replay_selections()
    return cache


# --- what identifies a model and a policy --------------------------------------------------------
def _fingerprint(model) -> dict:
    binding = getattr(model, "lckv_binding", None)
    if binding is None:
        raise ValueError(f"{type(model).__name__} is not enabled: call lckv.enable(model, policy) first (to load, "
                         "with the policy the cache was saved with)")
    return binding.fingerprint(model)


def _settings(policy) -> dict:
    return {"name": policy.name, **{f.name: getattr(policy, f.name) for f in fields(policy) if f.init}}


def _check_same(path, what: str, saved, here) -> None:
    if saved == here:
        return
    if what == "policy":
        layer = next(i for i, (a, b) in enumerate(zip(saved, here)) if a != b)
        saved, here = saved[layer], here[layer]
        what = f"policy of layer {layer}"
    diff = sorted(k for k in set(saved) | set(here) if saved.get(k) != here.get(k))
    detail = ", ".join(f"{k}: saved {saved.get(k)!r}, here {here.get(k)!r}" for k in diff)
    raise CacheMismatchError(f"{path} was saved for another {what} ({detail}); load it into the model it was saved "
                             "from, enabled with the saved policy")


# --- the file ----------------------------------------------------------------------------------
def _write_atomic(path: str, records) -> None:
    """Writes the header and ``records`` (callables giving each record's object, called one at a
    time) to a temporary file beside ``path``, then renames it to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w+b") as f:
            f.write(bytes(_HEADER.size))
            for record in records:
                start = f.tell()
                f.write(bytes(_LENGTH.size))
                torch.save(record(), f)
                end = f.tell()
                f.seek(start)
                f.write(_LENGTH.pack(end - start - _LENGTH.size))
                f.seek(end)
            size = f.tell() - _HEADER.size
            digest = _sha256(f, size)
            f.seek(0)
            f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, digest, size))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sha256(f, size: int) -> bytes:
    """sha256 of the ``size`` payload bytes after the header of the open file ``f``."""
    f.seek(_HEADER.size)
    digest = hashlib.sha256()
    left = size
    while left:
        block = f.read(min(_BLOCK, left))
        if not block:
            break
        digest.update(block)
        left -= len(block)
    return digest.digest()


def _read_records(path: str):
    """Checks the header, the length and the checksum of the whole file, then yields its records
    one at a time."""
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, f"no saved LckvCache at {path}", path)
    f = open(path, "rb")
    with f:
        header = f.read(_HEADER.size)
        if header[:len(MAGIC)] != MAGIC:
            raise CacheFileError(f"{path} is not an lckv cache file (expected it to start with {MAGIC!r})")
        if len(header) < _HEADER.size:
            raise CacheFileError(f"{path} is truncated: {len(header)} bytes, less than its {_HEADER.size}-byte header")
        _, version, digest, size = _HEADER.unpack(header)
        if version != FORMAT_VERSION:
            raise CacheFileError(f"{path} has cache format version {version}; this lckv reads version {FORMAT_VERSION}")
        held = os.fstat(f.fileno()).st_size - _HEADER.size
        if held != size:
            raise CacheFileError(f"{path} is truncated or extended: its header announces {size} payload bytes, "
                                 f"the file holds {held}")
        if _sha256(f, size) != digest:
            raise CacheFileError(f"{path} is corrupt: the sha256 of its payload does not match its header's "
                                 f"{digest.hex()}")
        f.seek(_HEADER.size)
        while f.tell() < _HEADER.size + size:
            (n,) = _LENGTH.unpack(f.read(_LENGTH.size))
            try:
                record = torch.load(io.BytesIO(f.read(n)), map_location="cpu", weights_only=True)
            except Exception as e:  # a file that passed its checksum but was written wrongly
                raise CacheFileError(f"{path}: a record of the payload cannot be read ({e})") from e
            yield record
