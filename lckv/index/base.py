"""The interface every lckv vector index implements, and its argument checks.

One index holds the keys of one (layer, kv head). Keys get ids 0, 1, 2, ... in insertion order.

``search(queries, k, **params) -> (scores, ids, n_scored)``:

* ``queries``: ``[n_queries, head_dim]`` float32, contiguous, CPU, finite.
* ``scores``: ``[n_queries, k]`` float32, inner products sorted descending.
* ``ids``: ``[n_queries, k]`` int64 key ids.
* ``n_scored``: ``[n_queries]`` int64, the keys (and for IVF the centroids) whose inner product the
  search computed: the cost measure benchmarks report as "fraction scored".

**k larger than the index**: the outputs keep shape ``[n_queries, k]``; the first ``min(k, size)``
slots hold results and the rest hold id ``-1`` and score ``-inf``. Exact indexes always fill
``min(k, size)`` slots; approximate ones fill what their search reached (at most that many), and
any unfilled slot is padding of the same form, never a stale or out-of-range id.

Errors (raised before any work): ``TypeError`` for a non-tensor or a dtype other than float32;
``ValueError`` for a non-CPU device, a wrong number of dimensions, non-contiguous input, NaN/inf,
or ``k <= 0``; :class:`DimensionMismatchError` (a ``ValueError``) when ``head_dim`` differs from
the index's; :class:`EmptyIndexError` (a ``ValueError``) for a search before any key was added.
Each check runs once per call: the C++ indexes' glue checks dtype, device, contiguity and values
itself (the same exception types, equally specific messages), so their Python side checks only what it
needs to read the shapes (:func:`check_shape`); other indexes check everything here (:func:`check_rows`).

**Threads**: any number of threads may search one index at once, also while other threads add keys.
``build`` and ``add`` hold the index's lock exclusively (writers run one at a time and wait for the
searches in flight; a waiting writer holds back searches that start after it), searches hold it
shared. So a search sees every key of each ``add`` that returned before it started, possibly the keys
of an ``add`` that finished while it ran, and never part of an ``add``. The lock is a
:class:`ReadWriteLock` on the Python object, except for searches of lckv's C++ indexes: their core
holds the same kind of lock itself (``RwLock`` in ``csrc/include/lckv/vector_index.h``) around every
search and add, also those of the compiled calls that take index handles (``search_heads``,
``search_groups``, the decode step), and releases the GIL, so those searches run in parallel.
"""
from __future__ import annotations

import abc
import threading

import torch

__all__ = ["Index", "EmptyIndexError", "DimensionMismatchError", "ReadWriteLock", "check_rows", "check_shape",
           "check_k"]


class EmptyIndexError(ValueError):
    """search() on an index that holds no keys."""


class DimensionMismatchError(ValueError):
    """Input rows do not have the index's head_dim."""


def check_shape(x, name: str, dim: int | None = None, ndim: int = 2, layout: str = "[n, head_dim]"):
    """Checks a tensor of ``ndim`` dims whose last is ``dim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {tuple(x.shape)}")
    if dim is not None and x.shape[-1] != dim:
        raise DimensionMismatchError(
            f"{name} must have head_dim {dim} (the index's) in its last dimension, got shape {tuple(x.shape)}")


def check_rows(x, name: str, dim: int | None = None, ndim: int = 2, layout: str = "[n, head_dim]"):
    """Checks a float32, CPU, contiguous, finite tensor of ``ndim`` dims whose last is ``dim``."""
    check_shape(x, name, dim, ndim, layout)
    if x.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {str(x.dtype).replace('torch.', '')} (convert with .float())")
    if x.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU (the index lives in host memory), got device {x.device}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {x.stride()}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


#: the largest k a search takes: results are ``[m, k]`` (padded past the index's size), so a larger
#: k would only allocate padding
MAX_K = 1 << 24


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if k > MAX_K:
        raise ValueError(f"k must be at most {MAX_K} (lckv.index.base.MAX_K), got {k}")
    return k


def check_search_params(index, params: dict) -> None:
    """Raises, naming the parameter, unless every one is one ``index`` understands and is a
    number of the type of its default (an int parameter takes an int, a float one any number)."""
    unknown = set(params) - set(index.search_params)
    if unknown:
        raise TypeError(f"{type(index).__name__}.search got unknown parameters {sorted(unknown)}; "
                        f"it understands {sorted(index.search_params)}")
    for name, value in params.items():
        default = index.search_params[name]
        kinds = (int,) if isinstance(default, int) else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            expected = "an int" if kinds == (int,) else "a number"
            raise TypeError(f"{type(index).__name__}.search parameter {name} must be {expected}, got {value!r}")


class ReadWriteLock:
    """Shared access for many threads or exclusive access for one; a waiting writer holds back new
    readers, so a steady stream of searches cannot starve ``add`` (the rule of the C++ ``RwLock``).

    >>> lock = ReadWriteLock()
    >>> with lock.shared:       # searches: many threads at once
    ...     pass
    >>> with lock.exclusive:    # build / add: one thread, no reader inside
    ...     pass
    """

    def __init__(self):
        self._mutex = threading.Lock()                  # guards the two fields below
        self._changed = threading.Condition(self._mutex)  # notified when they change in a way a waiter wants
        self._readers = 0      # threads holding shared access
        self._writer = False   # a writer holds exclusive access or waits for the readers to leave
        self.shared = _Holder(self._acquire_shared, self._release_shared)
        self.exclusive = _Holder(self._acquire_exclusive, self._release_exclusive)

    def _acquire_shared(self):
        with self._mutex:
            while self._writer:
                self._changed.wait()
            self._readers += 1

    def _release_shared(self):
        with self._mutex:
            self._readers -= 1
            if self._writer and not self._readers:
                self._changed.notify_all()

    def _acquire_exclusive(self):
        with self._mutex:
            while self._writer:
                self._changed.wait()
            self._writer = True
            try:
                while self._readers:
                    self._changed.wait()
            except BaseException:  # interrupted while waiting: give the claim back
                self._writer = False
                self._changed.notify_all()
                raise

    def _release_exclusive(self):
        with self._mutex:
            self._writer = False
            self._changed.notify_all()


class _Holder:
    """One side of a :class:`ReadWriteLock` as a context manager."""

    def __init__(self, acquire, release):
        self._acquire, self._release = acquire, release

    def __enter__(self):
        self._acquire()

    def __exit__(self, *exc_info):
        self._release()


class Index(abc.ABC):
    """An inner-product top-k index over the keys of one (layer, kv head).

    Subclasses implement ``_build``, ``_add``, ``_search`` and ``size``; the public methods check
    arguments and take the lock (see "Threads" in :mod:`lckv.index.base`): ``_build`` and ``_add``
    run alone, ``_search`` beside other searches only. ``build`` may be called once, on an empty
    index; ``add`` any time after.
    """

    #: search keyword arguments this index understands, with their defaults
    search_params: dict = {}
    #: whether ``build`` uses its ``queries`` (a query-aware index); the others ignore them, and
    #: the ``retrieval`` policy then records no prefill queries for them
    uses_build_queries: bool = False
    #: the checks of an input tensor; the C++ indexes set check_shape (their glue checks the rest)
    _check_input = staticmethod(check_rows)

    def __init__(self, dim: int):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self._lock = ReadWriteLock()

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Number of keys held."""

    def __len__(self) -> int:
        return self.size

    def build(self, keys: torch.Tensor, queries: torch.Tensor | None = None) -> "Index":
        """Adds keys ``[n, head_dim]``; ``queries`` ``[m, head_dim]`` (optional) are a sample of the
        queries the index will serve (prefill queries), used by query-aware indexes and ignored by
        the others. Returns self."""
        self._check_input(keys, "keys", self.dim)
        if queries is not None:
            self._check_input(queries, "queries", self.dim, layout="[n_queries, head_dim]")
        with self._lock.exclusive:
            if self.size:
                raise ValueError(f"build() needs an empty index, this one holds {self.size} keys; use add()")
            self._build(keys, queries)
        return self

    def add(self, keys: torch.Tensor) -> None:
        """Appends keys ``[n, head_dim]``; their ids continue from ``size``. Safe while other threads
        search or add: it waits for the searches in flight, and searches that start after it returns
        see the keys."""
        self._check_input(keys, "keys", self.dim)
        if not keys.shape[0]:  # nothing reaches the backend, whose own checks would run: run them here
            check_rows(keys, "keys", self.dim)
            return
        with self._lock.exclusive:
            self._add(keys)

    def search(self, queries: torch.Tensor, k: int, **params):
        """Top-k keys by inner product: ``(scores [m, k], ids [m, k], n_scored [m])``; see the module
        docstring for padding when ``k > size``. Safe from many threads at once, also while keys are
        added (module docstring, "Threads")."""
        self._check_input(queries, "queries", self.dim, layout="[n_queries, head_dim]")
        check_k(k)
        check_search_params(self, params)
        return self._search_under_lock(queries, k, {**self.search_params, **params})

    def _search_under_lock(self, queries, k, params):
        """The empty check and ``_search`` under the lock, shared: for callers that checked the
        arguments (:func:`lckv.index.search_heads`). Indexes whose backend locks its own searches
        override it."""
        with self._lock.shared:
            if self.size == 0:
                raise self._empty_error()
            return self._search(queries, k, params)

    def _empty_error(self) -> EmptyIndexError:
        return EmptyIndexError(f"search on an empty {type(self).__name__}: build() or add() keys first")

    @abc.abstractmethod
    def _build(self, keys, queries): ...

    @abc.abstractmethod
    def _add(self, keys): ...

    @abc.abstractmethod
    def _search(self, queries, k, params): ...

    def memory_bytes(self) -> int:
        """Bytes held by the index (keys plus structure), approximately."""
        return 0
