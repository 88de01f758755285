"""Public ops: the names and signatures of :mod:`lckv.reference`, plus ``backend="auto"``.

Each op checks its arguments, asks :mod:`lckv.backends` which backend serves the tensors' device
(``triton`` on CUDA, ``cpu`` = the C++ extension on CPU tensors, ``reference`` anywhere) and
launches it. ``backend=`` overrides the choice; an impossible request raises
:class:`lckv.backends.BackendUnavailableError`.
"""
import torch

from lckv import reference
from lckv.backends import resolve_backend
from lckv.ops.merge_states import merge_attention_states
from lckv.ops.scoring import flat_topk_scores, page_key_bounds, quest_page_scores
from lckv.ops.sparse_attention import sparse_attention_with_lse
from lckv.ops.window_attention import sink_window_attention_with_lse

__all__ = [
    "attention_with_lse", "sparse_attention_with_lse", "sink_window_attention_with_lse",
    "merge_attention_states", "page_key_bounds", "quest_page_scores", "flat_topk_scores",
]


def attention_with_lse(q, k, v, causal: bool = False, mask=None, scale=None, backend: str = "auto"):
    """Dense attention with LSE; served by the reference backend on every device (use
    :func:`sink_window_attention_with_lse` for the fused causal/windowed kernels). Same contract as
    :func:`lckv.reference.attention_with_lse`."""
    device = q.device if isinstance(q, torch.Tensor) else "cpu"
    resolve_backend("attention_with_lse", device, backend)
    return reference.attention_with_lse(q, k, v, causal=causal, mask=mask, scale=scale)
