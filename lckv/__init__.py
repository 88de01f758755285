"""lckv: compressed-KV long-context inference.

>>> import lckv
>>> lckv.enable(model, "streaming", sink=4, window=256)   # doctest: +SKIP
>>> model.generate(input_ids, max_new_tokens=64)           # doctest: +SKIP

``import lckv`` works with no GPU and without the compiled extension; compiled ops load lazily,
and the transformers integration is imported on first use.
"""
from lckv._extension import ExtensionNotAvailableError, extension_available
from lckv.policies import Policy, PolicyConfigError, available_policies, get_policy

__version__ = "0.1.0"

__all__ = [
    "ExtensionNotAvailableError", "extension_available", "Policy", "PolicyConfigError", "available_policies",
    "get_policy", "enable", "disable", "new_cache", "load_cache", "__version__",
]


def enable(model, policy="full", **settings):
    """See :func:`lckv.integrations.hf.enable`."""
    from lckv.integrations.hf import enable as _enable

    return _enable(model, policy, **settings)


def disable(model):
    """See :func:`lckv.integrations.hf.disable`."""
    from lckv.integrations.hf import disable as _disable

    return _disable(model)


def new_cache(model):
    """See :func:`lckv.integrations.hf.new_cache`."""
    from lckv.integrations.hf import new_cache as _new_cache

    return _new_cache(model)


def load_cache(path, model):
    """See :func:`lckv.persist.load_cache` (a cache saved with ``LckvCache.save``)."""
    from lckv.persist import load_cache as _load_cache

    return _load_cache(path, model)
