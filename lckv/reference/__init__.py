"""Pure PyTorch oracles (fp32 accumulation, any device); also the ``reference`` backend."""
from lckv.reference.attention import attention_with_lse, merge_attention_states, sparse_attention_with_lse

__all__ = ["attention_with_lse", "sparse_attention_with_lse", "merge_attention_states"]
