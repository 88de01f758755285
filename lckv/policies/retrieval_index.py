"""Index wiring of the ``retrieval`` policy: the index kinds, the check of their settings, the
per-layer indexes built from a :class:`~lckv.layer_view.LayerView`, and the search settings of a
step. The indexes themselves live in :mod:`lckv.index` (imported lazily: faiss is optional)."""
from __future__ import annotations

import inspect

import torch

from lckv.layer_view import LayerView
from lckv.policies.base import PolicyConfigError
from lckv.policies.group_rank import group_sum

__all__ = ["INDEX_KINDS", "check_index_settings", "make_index", "build_indexes", "search_settings", "index_heads",
           "uses_build_queries"]

#: ``exact`` scores every offloaded key (lckv.ops.flat_topk_scores): the oracle top-k.
INDEX_KINDS = ("exact", "flat", "ivf", "graph", "cluster", "faiss_flat", "faiss_hnsw", "faiss_ivf")
_CLASSES = {"flat": "FlatIndex", "ivf": "IVFIndex", "graph": "GraphIndex", "cluster": "ClusterIndex",
            "faiss_flat": "FaissIndex", "faiss_hnsw": "FaissIndex", "faiss_ivf": "FaissIndex"}


def make_index(kind: str, dim: int, params: dict):
    """One head's index of ``kind`` (not ``exact``) with constructor settings ``params``."""
    from lckv import index

    cls = getattr(index, _CLASSES[kind])
    if kind.startswith("faiss_"):
        return cls(dim, kind=kind[len("faiss_"):], **params)
    return cls(dim, **params)


def uses_build_queries(kind: str) -> bool:
    """Whether an index of ``kind`` is built with prefill queries (``graph``); the others are built
    from the keys alone."""
    if kind == "exact":
        return False
    from lckv import index

    return getattr(index, _CLASSES[kind]).uses_build_queries


def check_index_settings(kind: str, index_params: dict, search_params: dict) -> None:
    """Raises :class:`PolicyConfigError` for an unknown kind, or settings its index does not take."""
    if kind not in INDEX_KINDS:
        raise PolicyConfigError(f"RetrievalPolicy.index must be one of {INDEX_KINDS}, got {kind!r}")
    if kind == "exact":
        if index_params or search_params:
            raise PolicyConfigError("RetrievalPolicy: index 'exact' takes no index_params or search_params")
        return
    from lckv import index

    cls = getattr(index, _CLASSES[kind])
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "dim", "kind"}
    unknown = sorted(set(index_params) - accepted)
    if unknown:
        raise PolicyConfigError(f"RetrievalPolicy.index_params {unknown} are not settings of {kind!r}; "
                                f"settings: {sorted(accepted)}")
    if "probe_supers" in search_params:
        raise PolicyConfigError("RetrievalPolicy.search_params: probe_supers is set per use (decode and block "
                                "searches use the exact rule; prefill_query_probe sets it for per-query picks)")
    # FaissIndex's search parameters depend on its kind: ask an empty one
    searchable = set(make_index(kind, 1, {}).search_params if cls is index.FaissIndex else cls.search_params)
    unknown = sorted(set(search_params) - searchable)
    if unknown:
        raise PolicyConfigError(f"RetrievalPolicy.search_params {unknown} are not search parameters of {kind!r}; "
                                f"parameters: {sorted(searchable)}")


def _build_queries(sample: torch.Tensor, kv_heads: int, group_rank: str) -> torch.Tensor:
    """``[q_heads, m, D]`` prefill queries -> ``[kv_heads, m, D]`` build queries distributed like
    the decode searches: group-summed for ``group_rank="logits"``; per query head otherwise
    (the group's queries interleaved, m of them, so the build cost stays the same)."""
    q_heads, m, head_dim = sample.shape
    if group_rank == "logits":
        return group_sum(sample.transpose(0, 1).reshape(-1, q_heads, head_dim), kv_heads).transpose(0, 1).contiguous()
    group = q_heads // kv_heads
    per_head = sample.float().reshape(kv_heads, group, m, head_dim).transpose(1, 2).reshape(kv_heads, m * group, head_dim)
    return per_head[:, ::group].contiguous()


def build_indexes(kind: str, index_params: dict, view: LayerView, group_rank: str) -> list:
    """One :class:`lckv.index.LayerIndex` per batch row over the view's offloaded keys, built with
    the recorded prefill queries when there are any; ``[None] * batch`` for kind ``exact``."""
    batch, kv_heads, _, head_dim = view.keys.shape
    if kind == "exact":
        return [None] * batch
    from lckv.index import LayerIndex

    indexes = []
    for b in range(batch):
        queries = None if view.query_sample is None else _build_queries(view.query_sample[b], kv_heads, group_rank)
        layer_index = LayerIndex(kv_heads, head_dim, lambda d: make_index(kind, d, index_params))
        indexes.append(layer_index.build(view.keys[b].float().contiguous(), queries))
    return indexes


def index_heads(indexes: list) -> list:
    """Every head's index, batch-major ([] when no batch row has an index)."""
    return [ix for layer_index in indexes if layer_index is not None for ix in layer_index.heads]


def search_settings(kind: str, search_params: dict, min_scanned: int, n_select: int) -> dict:
    """``search_params`` for a search of ``n_select`` keys: with index ``cluster``, ``scan`` raised
    so that at least ``min_scanned`` keys are scanned (other kinds: unchanged)."""
    params = dict(search_params)
    if kind == "cluster":
        from lckv.index import ClusterIndex

        scan = params.get("scan", ClusterIndex.search_params["scan"])
        params["scan"] = max(scan, min_scanned / n_select)
    return params
