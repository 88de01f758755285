"""lckv: compressed-KV long-context inference.

``import lckv`` works with no GPU and without the compiled extension; compiled ops load lazily.
"""
from lckv._extension import ExtensionNotAvailableError, extension_available

__version__ = "0.1.0"

__all__ = ["ExtensionNotAvailableError", "extension_available", "__version__"]
