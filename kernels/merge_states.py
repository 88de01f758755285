"""Merge of two partial attention states over disjoint key sets (elementwise over rows).

``out = (out_a e^(lse_a-m) + out_b e^(lse_b-m)) / (e^(lse_a-m) + e^(lse_b-m))``,
``lse = m + log(e^(lse_a-m) + e^(lse_b-m))`` with ``m = max(lse_a, lse_b)``; two empty parts
(``lse = -inf``) give 0 and -inf. Rows are contiguous ``[rows, head_dim]``; the launcher is
``lckv.ops.merge_states``.
"""
import triton
import triton.language as tl

from lckv.kernels import autotune_configs


@triton.autotune(
    configs=autotune_configs([triton.Config({"BLOCK_R": 16}, num_warps=2), triton.Config({"BLOCK_R": 64}, num_warps=4)]),
    key=["head_dim"],
)
@triton.jit
def merge_states_kernel(
    OutA, LseA, OutB, LseB, Out, Lse,
    rows, head_dim,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = offs_r < rows
    mask = mask_r[:, None] & (offs_d[None, :] < head_dim)
    lse_a = tl.load(LseA + offs_r, mask=mask_r, other=float("-inf")).to(tl.float32)
    lse_b = tl.load(LseB + offs_r, mask=mask_r, other=float("-inf")).to(tl.float32)
    m = tl.maximum(lse_a, lse_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_a = tl.exp(lse_a - m_safe)
    w_b = tl.exp(lse_b - m_safe)
    total = w_a + w_b
    nonempty = total > 0.0
    denom = tl.where(nonempty, total, 1.0)
    offs = offs_r[:, None] * head_dim + offs_d[None, :]
    out_a = tl.load(OutA + offs, mask=mask, other=0.0).to(tl.float32)
    out_b = tl.load(OutB + offs, mask=mask, other=0.0).to(tl.float32)
    out = (out_a * (w_a / denom)[:, None] + out_b * (w_b / denom)[:, None])
    tl.store(Out + offs, out, mask=mask)
    tl.store(Lse + offs_r, tl.where(nonempty, m_safe + tl.log(denom), float("-inf")), mask=mask_r)
