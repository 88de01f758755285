"""Pure PyTorch oracles (fp32 accumulation, any device); also the ``reference`` backend."""
from lckv.reference.attention import attention_with_lse, merge_attention_states, sparse_attention_with_lse

__all__ = ["attention_with_lse", "sparse_attention_with_lse", "merge_attention_states"]
from lckv.reference.scoring import flat_topk_scores, page_key_bounds, quest_page_scores
from lckv.reference.window import sink_window_attention_with_lse

__all__ += ["sink_window_attention_with_lse", "page_key_bounds", "quest_page_scores", "flat_topk_scores"]
from lckv.reference.decode_step import decode_cluster_step, offload_rows
from lckv.reference.estimate import centroid_estimate, estimate_add_rows
from lckv.reference.group_rank import rank_by_group_probability
from lckv.reference.kmeans import kmeans

__all__ += ["centroid_estimate", "estimate_add_rows", "rank_by_group_probability", "decode_cluster_step",
            "offload_rows", "kmeans"]
from lckv.reference.gather import gather_rows

__all__ += ["gather_rows"]
from lckv.reference.ivf import ivf_layout, ivf_topk_scores

__all__ += ["ivf_layout", "ivf_topk_scores"]
