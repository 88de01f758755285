"""Sink + sliding-window attention with log-sum-exp (decode and causal chunked prefill).

Query ``i`` of ``q_len`` sits at position ``p = i + kv_len - q_len`` and sees key ``j`` iff
``j <= p`` and (``j < sink`` or ``p - j < window``). The rows of a tile are (query head of the
GQA group, query) pairs, ``row = g * q_len + i``, so decode (q_len = 1) still fills a tile with the
group's heads and every K/V block is loaded once per group. Each program visits only two key
ranges: the sink ``[0, sink)`` and the window band of its rows; the exact per-element mask handles
the edges. Loads are upcast to fp32 right away; the launcher is ``lckv.ops.window_attention``.
"""
import triton
import triton.language as tl

from lckv.kernels import autotune_configs


@triton.jit
def _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, pos, row_valid, offs_n, offs_d,
                  mask_d, start, stop, kv_len, sink, window, BLOCK_N: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        col_ok = (cols < stop) & (cols < kv_len)
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=col_ok[:, None] & mask_d[None, :],
                    other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N]; q is pre-scaled
        seen = (cols[None, :] <= pos[:, None]) & ((cols[None, :] < sink) | (pos[:, None] - cols[None, :] < window))
        seen = seen & col_ok[None, :] & row_valid[:, None]
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=col_ok[:, None] & mask_d[None, :],
                    other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(
    configs=autotune_configs([
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4),
    ]),
    key=["head_dim", "GROUP"],
)
@triton.jit
def sink_window_attention_fwd_kernel(
    Q, K, V, Out, Lse,
    scale, q_len, kv_len, head_dim, kv_heads, sink, window,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(1)
    off_b = pid // kv_heads
    off_h = pid % kv_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = rows < GROUP * q_len
    mask_d = offs_d < head_dim
    q_head = off_h * GROUP + rows // q_len
    q_idx = rows % q_len
    pos = q_idx + (kv_len - q_len)

    q_ptrs = Q + off_b * stride_qb + q_head[:, None] * stride_qh + q_idx[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None] & mask_d[None, :], other=0.0).to(tl.float32) * scale

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    pos_lo = tl.min(tl.where(row_valid, pos, kv_len))
    pos_hi = tl.max(tl.where(row_valid, pos, -1))
    sink_stop = tl.minimum(sink, pos_hi + 1)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, pos, row_valid, offs_n,
                                  offs_d, mask_d, 0, sink_stop, kv_len, sink, window, BLOCK_N)
    window_start = tl.maximum(sink, pos_lo - window + 1)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, pos, row_valid, offs_n,
                                  offs_d, mask_d, window_start, pos_hi + 1, kv_len, sink, window, BLOCK_N)

    empty = l_i == 0.0  # no key seen; a NaN read from K/V is not "empty" and propagates
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), m_i + tl.log(l_safe))
    o_ptrs = Out + off_b * stride_ob + q_head[:, None] * stride_oh + q_idx[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out, mask=row_valid[:, None] & mask_d[None, :])
    tl.store(Lse + off_b * stride_lb + q_head * stride_lh + q_idx, lse, mask=row_valid)
