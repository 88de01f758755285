"""Lazy access to the compiled extension ``lckv._C``.

``import lckv`` never needs the extension: only a call that reaches a compiled op does, and then
a missing or broken build raises :class:`ExtensionNotAvailableError` saying what to do.
"""
from __future__ import annotations

import functools
import importlib


class ExtensionNotAvailableError(ImportError):
    """The compiled extension lckv._C is not built or cannot be loaded."""


@functools.lru_cache(maxsize=None)
def _load():
    import torch  # noqa: F401  (libc10 must be loaded before the extension)

    try:
        return importlib.import_module("lckv._C"), None
    except ImportError as exc:  # not built, or built against another torch
        return None, exc


def extension_available() -> bool:
    """True when ``lckv._C`` imports."""
    return _load()[0] is not None


def compiled(op_name: str):
    """Returns the compiled module, or raises naming the op that needed it."""
    module, error = _load()
    if module is None:
        raise ExtensionNotAvailableError(
            f"lckv op {op_name!r} needs the compiled extension lckv._C, which could not be "
            f"imported ({error}). Build it with `pip install -e .` from the repository root "
            "(needs a C++17 compiler with OpenMP), or pass backend='reference'."
        )
    if not hasattr(module, op_name):
        raise ExtensionNotAvailableError(
            f"lckv._C has no op {op_name!r}: the extension is older than this source tree; "
            "rebuild it with `pip install -e .`."
        )
    return module
