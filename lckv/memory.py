"""Host memory for large offloaded K/V: tensors on transparent huge pages.

Decode-time sparse attention reads a few thousand rows of 256-512 bytes at random positions of a
K/V cache that can be gigabytes large. On 4 KiB pages almost every such row misses the TLB and
pays a page walk; on 2 MiB huge pages the whole cache stays within the TLB's reach, and the
measured gather bandwidth of the C++ kernel roughly doubles at a 1M-token fp16 context (see
``benchmarks/bench_kernels.py``). Linux hands out huge pages to a region only if it was
``madvise(MADV_HUGEPAGE)``'d before its first touch when THP runs in the common ``madvise`` mode
(``/sys/kernel/mm/transparent_hugepage/enabled``), which ``torch.empty`` does not do.
:func:`empty_host` does, for tensors of at least :data:`HUGE_PAGE_MIN_BYTES`.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from lckv._extension import extension_available

__all__ = ["HUGE_PAGE_MIN_BYTES", "RELEASE_AFTER_CALLS", "empty_host", "huge_page_advised", "huge_page_fraction",
           "release_free_memory"]

#: Tensors at least this large go on huge pages. Below it the 4 KiB TLB reach of a typical x86
#: core (~2K second-level entries, 8 MiB) already covers most of the tensor, and rounding the
#: allocation to whole 2 MiB pages would waste a noticeable share of memory.
HUGE_PAGE_MIN_BYTES = 16 << 20


def empty_host(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, on transparent huge pages when it is large.

    Parameters
    ----------
    shape : sequence of int
        Non-negative sizes, e.g. ``[batch, kv_heads, capacity, head_dim]``.
    dtype : torch.dtype
        Any torch dtype.

    Returns
    -------
    torch.Tensor
        ``torch.empty(shape, dtype=dtype)``-like (uninitialised, contiguous, CPU). When the tensor
        has at least :data:`HUGE_PAGE_MIN_BYTES` bytes, its memory is 2 MiB aligned and advised
        ``MADV_HUGEPAGE`` before first touch (``lckv._C.empty_huge``), and freed when the tensor
        is. Otherwise -- small tensors, the extension not built, or the advice failing (a kernel
        without THP, a non-Linux system, a sandbox that forbids ``madvise``) -- it is a plain
        ``torch.empty``: huge pages are a speed-up, never a requirement. Whether the kernel actually
        backed the pages with huge pages (it may not, e.g. when memory is fragmented or THP is
        ``never``) can be checked after first touch with :func:`huge_page_fraction`.

    Raises
    ------
    TypeError
        ``dtype`` is not a ``torch.dtype`` or ``shape`` is not a sequence of ints.
    ValueError
        A size is negative.

    Examples
    --------
    >>> k = empty_host([1, 8, 65536, 128], torch.float16)   # 128 MiB: on huge pages
    >>> k.shape, k.is_contiguous()
    (torch.Size([1, 8, 65536, 128]), True)
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    try:
        sizes = [operator.index(s) for s in shape]
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in sizes):
        raise ValueError(f"shape must have non-negative sizes, got {tuple(sizes)}")
    if math.prod(sizes) * dtype.itemsize >= HUGE_PAGE_MIN_BYTES and extension_available():
        from lckv._extension import compiled

        try:
            return compiled("empty_huge").empty_huge(sizes, dtype)
        except RuntimeError:  # madvise refused: plain pages are correct, only slower
            pass
    return torch.empty(sizes, dtype=dtype)


#: Whether a model bound by :func:`lckv.enable` calls :func:`release_free_memory` after each call
#: with an LckvCache that added more than one token per row (a prompt or a prompt chunk), grew a
#: host store or built a selection state. Set it to False to leave the heap to the allocator.
RELEASE_AFTER_CALLS = True

_malloc_trim = None  # glibc's malloc_trim, once looked up (False: not available)


def release_free_memory() -> bool:
    """Hands the free pages of the C heap back to the operating system (glibc ``malloc_trim(0)``).

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, so from then
    on freed buffers below it -- a grown host store's old buffers, a prompt chunk's activations and
    attention scratch -- stay in the heap, counted in the process's RSS until reused: measured on
    SmolLM2-135M with ``retrieval`` at 4K tokens (``benchmarks/bench_memory.py``, glibc defaults),
    RSS grew 1.8x what the cache held without trims, 1.11x with the trims a bound model makes
    after its calls (:data:`RELEASE_AFTER_CALLS`). A trim's cost is that of unmapping what it releases
    (0.12 s for 800 MiB on a 2-core EPYC; 0.2 ms when there is nothing to release).

    Returns
    -------
    bool
        True when the trim ran; False where the C library has no ``malloc_trim`` (not glibc).
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes

        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


def _mapping_fields(address: int) -> dict[str, str] | None:
    """The ``/proc/self/smaps`` fields of the mapping that contains ``address`` (None if unreadable)."""
    try:
        with open("/proc/self/smaps") as smaps:
            fields: dict[str, str] | None = None
            for line in smaps:
                first = line.split(maxsplit=1)[0] if line.strip() else ""
                if "-" in first and not first.endswith(":"):  # a mapping header "start-end perms ..."
                    if fields is not None:
                        break
                    start, end = (int(x, 16) for x in first.split("-"))
                    if start <= address < end:
                        fields = {}
                elif fields is not None and first.endswith(":"):
                    fields[first[:-1]] = line.split(":", 1)[1].strip()
    except OSError:
        return None
    return fields


def huge_page_fraction(tensor: torch.Tensor) -> float | None:
    """Share of the memory mapping holding ``tensor`` that is backed by huge pages, in [0, 1].

    Read from ``/proc/self/smaps`` (``AnonHugePages`` over ``Rss`` of the mapping that contains
    ``tensor.data_ptr()``); only touched pages count. Returns None when that cannot be read
    (not Linux, no smaps) or nothing of the mapping is resident yet. The kernel decides the
    backing at first touch and may give plain pages to an advised mapping (memory too fragmented
    for a free 2 MiB block); :func:`huge_page_advised` says whether the advice itself is in place.
    """
    fields = _mapping_fields(tensor.data_ptr())
    if not fields or "Rss" not in fields or "AnonHugePages" not in fields:
        return None
    rss, huge = int(fields["Rss"].split()[0]), int(fields["AnonHugePages"].split()[0])
    return min(1.0, huge / rss) if rss else None


def huge_page_advised(tensor: torch.Tensor) -> bool | None:
    """Whether the mapping holding ``tensor`` carries ``MADV_HUGEPAGE`` (smaps ``VmFlags: hg``).

    None when ``/proc/self/smaps`` cannot be read or has no ``VmFlags`` line.
    """
    fields = _mapping_fields(tensor.data_ptr())
    if not fields or "VmFlags" not in fields:
        return None
    return "hg" in fields["VmFlags"].split()
