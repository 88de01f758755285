"""Decode sparse attention over per-kv-head gathered key/value rows, with log-sum-exp.

One program per (batch, kv head): the GQA group's query heads are the rows of the tile, so every
gathered K/V row is loaded once per group. Online softmax over blocks of BLOCK_N indices; -1
indices are padding. Loads are upcast to fp32 right away (bf16 arithmetic is not trusted in the
interpreter) and all math is fp32. The launcher is ``lckv.ops.sparse_attention``.
"""
import triton
import triton.language as tl

from lckv.kernels import autotune_configs


@triton.autotune(
    configs=autotune_configs([
        triton.Config({"BLOCK_N": 32}, num_warps=2),
        triton.Config({"BLOCK_N": 64}, num_warps=4),
        triton.Config({"BLOCK_N": 128}, num_warps=4),
    ]),
    key=["head_dim", "GROUP"],
)
@triton.jit
def sparse_attention_fwd_kernel(
    Q, K, V, Idx, Out, Lse,
    scale, n_selected, head_dim, kv_heads,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ib, stride_ih,
    stride_ob, stride_oh,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    off_b = pid // kv_heads
    off_h = pid % kv_heads
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < head_dim
    q_heads = off_h * GROUP + offs_g

    q_ptrs = Q + off_b * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(tl.float32) * scale

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    idx_base = Idx + off_b * stride_ib + off_h * stride_ih
    for start_n in range(0, n_selected, BLOCK_N):
        cols = start_n + offs_n
        idx = tl.load(idx_base + cols, mask=cols < n_selected, other=-1)
        valid = idx >= 0
        row_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(k_base + idx[:, None] * stride_ks + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_G, BLOCK_N]
        # -inf means "no key": a selected row whose score is -inf (an inf in its K) turns NaN and
        # poisons its query's result like any other non-finite score, instead of getting weight 0
        s = tl.where(valid[None, :], tl.where(s == float("-inf"), float("nan"), s), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + idx[:, None] * stride_vs + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    empty = l_i == 0.0  # no key seen; a NaN read from K/V is not "empty" and propagates
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
    o_ptrs = Out + off_b * stride_ob + q_heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out, mask=mask_g[:, None] & mask_d[None, :])
    tl.store(Lse + off_b * stride_lb + q_heads * stride_lh, lse, mask=mask_g)
