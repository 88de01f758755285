"""Block-wise flat top-k scoring: exact q . k over a block of keys, keeping the block's best K_BLOCK.

One program per (batch, kv head, block of BLOCK_N keys); the GQA group's query heads are the rows
of the tile, so each key row is loaded once per group. Each score is packed with its position into
one int64 whose order is the score's order (sign-folded float bits in the high word), so a single
``tl.topk`` returns both the best scores and where they are. Keys past ``seq`` score -inf with
position -1. The launcher (``lckv.ops.flat_topk``) reduces the per-block candidates to the global
top-k.
"""
import triton
import triton.language as tl


@triton.jit
def flat_topk_block_kernel(
    Q, K, CandScores, CandIdx,
    seq, head_dim, kv_heads,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_cb, stride_ch, stride_cn,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    K_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    off_b = pid // kv_heads
    off_h = pid % kv_heads
    block = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_n = offs_n < seq
    mask_d = offs_d < head_dim
    q_heads = off_h * GROUP + offs_g

    q = tl.load(Q + off_b * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_G, BLOCK_N]
    scores = tl.where(mask_n[None, :], scores, float("-inf"))

    # Order-preserving int32 view of the float: flip the magnitude bits of negatives.
    bits = scores.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    local = tl.broadcast_to(tl.arange(0, BLOCK_N)[None, :], (BLOCK_G, BLOCK_N))
    packed = (key.to(tl.int64) << 32) | local.to(tl.int64)
    best = tl.topk(packed, K_BLOCK)  # [BLOCK_G, K_BLOCK], largest first

    best_key = (best >> 32).to(tl.int32)
    best_bits = tl.where(best_key >= 0, best_key, best_key ^ 0x7FFFFFFF)
    best_scores = best_bits.to(tl.float32, bitcast=True)
    best_pos = block * BLOCK_N + (best & 0xFFFFFFFF)
    best_pos = tl.where(best_scores == float("-inf"), -1, best_pos)

    offs_k = tl.arange(0, K_BLOCK)
    c_offs = off_b * stride_cb + q_heads[:, None] * stride_ch + (block * K_BLOCK + offs_k)[None, :] * stride_cn
    tl.store(CandScores + c_offs, best_scores, mask=mask_g[:, None])
    tl.store(CandIdx + c_offs, best_pos, mask=mask_g[:, None])
