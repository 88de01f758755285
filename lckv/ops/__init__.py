"""Public ops: the names and signatures of :mod:`lckv.reference`, plus ``backend="auto"``.

Each op checks its arguments, asks :mod:`lckv.backends` which backend serves the tensors' device
(``triton`` on CUDA, ``cuda`` = hand-written CUDA kernels in the extension, ``cpu`` = the C++
extension on CPU tensors, ``reference`` anywhere) and
launches it. ``backend=`` overrides the choice; an impossible request raises
:class:`lckv.backends.BackendUnavailableError`.
"""
from lckv.ops.decode_step import decode_cluster_step, offload_rows
from lckv.ops.dense_attention import attention_with_lse
from lckv.ops.estimate import centroid_estimate, estimate_add_rows
from lckv.ops.gather import gather_rows
from lckv.ops.ivf import ivf_layout, ivf_topk_scores
from lckv.ops.group_rank import rank_by_group_probability
from lckv.ops.kmeans import kmeans
from lckv.ops.merge_states import merge_attention_states
from lckv.ops.scoring import flat_topk_scores, page_key_bounds, quest_page_scores
from lckv.ops.sparse_attention import sparse_attention_with_lse
from lckv.ops.window_attention import sink_window_attention_with_lse

__all__ = [
    "attention_with_lse", "sparse_attention_with_lse", "sink_window_attention_with_lse",
    "merge_attention_states", "page_key_bounds", "quest_page_scores", "flat_topk_scores",
    "centroid_estimate", "estimate_add_rows", "rank_by_group_probability", "decode_cluster_step", "offload_rows",
    "kmeans", "gather_rows", "ivf_topk_scores", "ivf_layout",
]

