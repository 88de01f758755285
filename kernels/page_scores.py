"""Quest-style page scoring: an upper bound of q . k over each page of keys.

``score[g, p] = sum_d max(q[g, d] * page_min[p, d], q[g, d] * page_max[p, d])``. One program per
(batch, kv head, block of BLOCK_P pages); the GQA group's query heads share the page bounds they
load. fp32 math after upcasting loads; the launcher is ``lckv.ops.page_scores``.
"""
import triton
import triton.language as tl

from lckv.kernels import autotune_configs


@triton.autotune(
    configs=autotune_configs([triton.Config({"BLOCK_P": 16}, num_warps=2), triton.Config({"BLOCK_P": 64}, num_warps=4)]),
    key=["head_dim", "GROUP"],
)
@triton.jit
def quest_page_scores_kernel(
    Q, PageMin, PageMax, Scores,
    n_pages, head_dim, kv_heads,
    stride_qb, stride_qh,
    stride_pb, stride_ph, stride_pp,
    stride_sb, stride_sh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    off_b = pid // kv_heads
    off_h = pid % kv_heads
    offs_g = tl.arange(0, BLOCK_G)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_p = offs_p < n_pages
    mask_d = offs_d < head_dim
    q_heads = off_h * GROUP + offs_g

    q = tl.load(Q + off_b * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    page_offs = off_b * stride_pb + off_h * stride_ph + offs_p[:, None] * stride_pp + offs_d[None, :]
    page_mask = mask_p[:, None] & mask_d[None, :]
    lo = tl.load(PageMin + page_offs, mask=page_mask, other=0.0).to(tl.float32)
    hi = tl.load(PageMax + page_offs, mask=page_mask, other=0.0).to(tl.float32)
    bound = tl.maximum(q[:, None, :] * lo[None, :, :], q[:, None, :] * hi[None, :, :])
    scores = tl.sum(bound, axis=2)  # [BLOCK_G, BLOCK_P]
    s_ptrs = Scores + off_b * stride_sb + q_heads[:, None] * stride_sh + offs_p[None, :]
    tl.store(s_ptrs, scores, mask=mask_g[:, None] & mask_p[None, :])
