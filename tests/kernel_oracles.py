"""Oracles shared by the kernel/op tests, composed only from lckv.reference.

``sparse_oracle`` evaluates decode sparse attention through the dense reference
(:func:`lckv.reference.attention_with_lse`) on explicitly gathered rows with a padding mask, so it
is an independent check of both the C++/Triton kernels and ``lckv.reference.sparse_attention_with_lse``.
"""
import os

import torch

from lckv.reference import attention_with_lse


def fresh_generator() -> tuple[torch.Generator, int]:
    """A generator seeded from os.urandom; print the seed in failure messages."""
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def sparse_oracle(q, k, v, indices, scale=None):
    batch, kv_heads, n_sel = indices.shape
    head_dim = q.shape[-1]
    safe = indices.clamp(min=0).unsqueeze(-1).expand(batch, kv_heads, n_sel, head_dim)
    k_sel = torch.gather(k, 2, safe)
    v_sel = torch.gather(v, 2, safe)
    group = q.shape[1] // kv_heads
    mask = (indices >= 0).repeat_interleave(group, dim=1).unsqueeze(2)  # [B, Hq, 1, n]
    out, lse = attention_with_lse(q.unsqueeze(2), k_sel, v_sel, mask=mask, scale=scale)
    return out.squeeze(2), lse.squeeze(2)


def low_precision_bound(exact, lowp_oracle, floor=1e-6):
    """Error allowed for a low-precision kernel: 2x what PyTorch's own low-precision computation
    (``lowp_oracle``) makes against the fp32 result ``exact`` (flash-attn's rule), plus a floor."""
    return 2.0 * (lowp_oracle.float() - exact.float()).abs().max().item() + floor
