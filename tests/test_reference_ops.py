"""Reference ops (lckv.reference) against independent oracles, with fresh random inputs.

Oracles: float64 softmax attention written out here, and torch's scaled_dot_product_attention.
Exact ops in fp32: tolerance ~1e-5 relative (fp32 accumulation in a different order).
"""
import math

import pytest
import torch

from kernel_oracles import fresh_generator
from lckv.reference import attention_with_lse, merge_attention_states, sparse_attention_with_lse

HEAD_DIMS = [8, 59, 64, 128]
GQA = [1, 2, 4]
BATCHES = [1, 3]
ATOL, RTOL = 2e-5, 2e-5


def _oracle(q, k, v, allowed):
    """float64 attention; q [B,Hq,Lq,D], k/v [B,Hkv,S,D], allowed bool [B,Hq,Lq,S]."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    s = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return p @ v, lse


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GQA)
@pytest.mark.parametrize("batch", BATCHES)
def test_dense_causal_matches_float64_and_sdpa(head_dim, group, batch):
    kv_heads, q_len, kv_len = 2, 5, 37
    q = torch.randn(batch, kv_heads * group, q_len, head_dim)
    k = torch.randn(batch, kv_heads, kv_len, head_dim)
    v = torch.randn(batch, kv_heads, kv_len, head_dim)
    out, lse = attention_with_lse(q, k, v, causal=True)
    allowed = (torch.arange(kv_len)[None] <= torch.arange(q_len)[:, None] + kv_len - q_len).expand(batch, kv_heads * group, -1, -1)
    ref_out, ref_lse = _oracle(q, k, v, allowed)
    torch.testing.assert_close(out.double(), ref_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse.double(), ref_lse, atol=ATOL, rtol=RTOL)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[0, 0], enable_gqa=True)
    torch.testing.assert_close(out, sdpa, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GQA)
@pytest.mark.parametrize("batch", BATCHES)
def test_random_split_merged_equals_all_keys(head_dim, group, batch):
    """Sparse attention over a random partition of the keys, merged, equals attention over all."""
    kv_heads, seq = 2, int(torch.randint(2, 300, ()))
    q = torch.randn(batch, kv_heads * group, head_dim) * 2
    k = torch.randn(batch, kv_heads, seq, head_dim)
    v = torch.randn(batch, kv_heads, seq, head_dim)
    perm = torch.argsort(torch.rand(batch, kv_heads, seq), dim=-1)
    cut = int(torch.randint(0, seq + 1, ()))  # a part may be empty
    idx_a, idx_b = perm[..., :cut], perm[..., cut:]
    out_a, lse_a = sparse_attention_with_lse(q, k, v, idx_a)
    out_b, lse_b = sparse_attention_with_lse(q, k, v, idx_b)
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    full_out, full_lse = attention_with_lse(q.unsqueeze(2), k, v)
    torch.testing.assert_close(out, full_out.squeeze(2), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse, full_lse.squeeze(2), atol=ATOL, rtol=RTOL)
    # the same with dense masks: complementary random masks merge to the unmasked result
    keep = torch.rand(batch, kv_heads * group, 1, seq) < 0.5
    pa, la = attention_with_lse(q.unsqueeze(2), k, v, mask=keep)
    pb, lb = attention_with_lse(q.unsqueeze(2), k, v, mask=~keep)
    merged, merged_lse = merge_attention_states(pa, la, pb, lb)
    torch.testing.assert_close(merged, full_out, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(merged_lse, full_lse, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("group", GQA)
def test_sparse_matches_float64_with_padding_and_gqa(group):
    batch, kv_heads, seq, head_dim, n = 3, 2, 50, 64, 17
    q = torch.randn(batch, kv_heads * group, head_dim)
    k = torch.randn(batch, kv_heads, seq, head_dim)
    v = torch.randn(batch, kv_heads, seq, head_dim)
    idx = torch.randint(0, seq, (batch, kv_heads, n))
    idx[torch.rand(batch, kv_heads, n) < 0.3] = -1
    out, lse = sparse_attention_with_lse(q, k, v, idx)
    # oracle: dense attention where each selected slot counts once per occurrence
    counts = torch.zeros(batch, kv_heads, seq, dtype=torch.float64)
    valid = idx >= 0
    counts.scatter_add_(2, idx.clamp(min=0), valid.double())
    counts = counts.repeat_interleave(group, dim=1).unsqueeze(2)  # [B, Hq, 1, S]
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    s = (q.double().unsqueeze(2) @ kk.transpose(-1, -2)) / math.sqrt(head_dim) + torch.log(counts)
    ref_lse = torch.logsumexp(s, dim=-1)
    ref_out = (torch.exp(s - ref_lse.unsqueeze(-1)).nan_to_num(0.0) @ vv).squeeze(2)
    rows = valid.any(-1).repeat_interleave(group, dim=1)
    torch.testing.assert_close(out.double()[rows], ref_out[rows], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lse.double()[rows], ref_lse.squeeze(-1)[rows], atol=ATOL, rtol=RTOL)


def test_nothing_selected_gives_zero_and_minus_inf():
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    idx = torch.full((2, 2, 3), -1)
    idx[1, 0] = torch.tensor([0, 4, -1])
    out, lse = sparse_attention_with_lse(q, k, v, idx)
    assert torch.isneginf(lse[0]).all() and torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[1, 2:]).all() and torch.isfinite(lse[1, :2]).all()
    out0, lse0 = sparse_attention_with_lse(q, k, v, idx[..., :0])
    assert torch.isneginf(lse0).all() and not out0.abs().any()
    dense_out, dense_lse = attention_with_lse(q.unsqueeze(2), k[:, :, :0], v[:, :, :0])
    assert torch.isneginf(dense_lse).all() and not dense_out.abs().any()
    # merging with an empty part is the identity; two empty parts stay empty
    a_out, a_lse = torch.randn(2, 4, 8), torch.randn(2, 4)
    m_out, m_lse = merge_attention_states(a_out, a_lse, out0, lse0)
    torch.testing.assert_close(m_out, a_out)
    torch.testing.assert_close(m_lse, a_lse)
    e_out, e_lse = merge_attention_states(out0, lse0, out0, lse0)
    assert torch.isneginf(e_lse).all() and not e_out.abs().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    q = torch.randn(3, 4, 2, 64).to(dtype)
    k, v = torch.randn(3, 2, 40, 64).to(dtype), torch.randn(3, 2, 40, 64).to(dtype)
    out, lse = attention_with_lse(q, k, v, causal=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = attention_with_lse(q.float(), k.float(), v.float(), causal=True)
    # only the final rounding to `dtype` differs from fp32 compute on the same inputs
    torch.testing.assert_close(out, ref_out.to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse)


def test_float_mask_is_additive():
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    bias = torch.randn(1, 2, 3, 7)
    out, lse = attention_with_lse(q, k, v, mask=bias)
    s = (q.double() @ k.double().transpose(-1, -2)) / 4 + bias.double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ v.double(), atol=ATOL, rtol=RTOL)


def test_bad_inputs_raise_naming_the_argument():
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    idx = torch.zeros(1, 2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"q must have shape \[batch, q_heads, head_dim\]"):
        sparse_attention_with_lse(q.unsqueeze(0), k, v, idx)
    with pytest.raises(TypeError, match="indices must have dtype in \\(int64\\)"):
        sparse_attention_with_lse(q, k, v, idx.int())
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, seq=6\)"):
        sparse_attention_with_lse(q, k, v, idx + 6)
    with pytest.raises(ValueError, match="indices must have shape"):
        sparse_attention_with_lse(q, k, v, idx[:, :1])
    with pytest.raises(ValueError, match="q_heads \\(3\\) must be a multiple of kv_heads \\(2\\)"):
        sparse_attention_with_lse(q[:, :3], k, v, idx)
    with pytest.raises(ValueError, match="k contains NaN or inf"):
        sparse_attention_with_lse(q, k.clone().index_fill_(2, torch.tensor([1]), float("nan")), v, idx)
    with pytest.raises(TypeError, match="q must have dtype"):
        sparse_attention_with_lse(q.double(), k, v, idx)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        sparse_attention_with_lse(q.tolist(), k, v, idx)
    with pytest.raises(ValueError, match="one device"):
        sparse_attention_with_lse(q, k.to("meta"), v, idx)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        attention_with_lse(q.unsqueeze(2), k, v[:, :, :5])
    with pytest.raises(ValueError, match="does not broadcast"):
        attention_with_lse(q.unsqueeze(2), k, v, mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="lse_a contains NaN"):
        merge_attention_states(q, torch.full((1, 4), float("nan")), q, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="lse_b must have shape"):
        merge_attention_states(q, torch.zeros(1, 4), q, torch.zeros(4))


def test_dense_attention_backward_matches_sdpa():
    """Training through the lckv backend differentiates the reference attention."""
    q = torch.randn(2, 4, 6, 16, requires_grad=True)
    k = torch.randn(2, 2, 9, 16, requires_grad=True)
    v = torch.randn(2, 2, 9, 16, requires_grad=True)
    out, _ = attention_with_lse(q, k, v, causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    allowed = torch.arange(9)[None] <= torch.arange(6)[:, None] + 3
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_gather_rows_reference_indexes_rows_and_refuses_bad_indices():
    from lckv.reference import gather_rows

    gen, seed = fresh_generator()
    src = torch.randn(2, 3, 11, 5, generator=gen)
    indices = torch.randint(-1, 11, (2, 3, 7), generator=gen)
    got = gather_rows(src, indices)
    for b in range(2):
        for h in range(3):
            for j in range(7):
                i = int(indices[b, h, j])
                assert torch.equal(got[b, h, j], src[b, h, i] if i >= 0 else torch.zeros(5)), f"seed {seed}"
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, seq = 11\)"):
        gather_rows(src, torch.full((2, 3, 1), 11))
    with pytest.raises(ValueError, match="indices must have batch and heads"):
        gather_rows(src, torch.zeros(2, 2, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="indices must have dtype"):
        gather_rows(src, torch.zeros(2, 3, 1, dtype=torch.int32))
    assert gather_rows(src, torch.zeros(2, 3, 0, dtype=torch.int64)).shape == (2, 3, 0, 5)
    empty = gather_rows(torch.randn(2, 3, 0, 5), torch.full((2, 3, 4), -1))  # an empty store: all -1 (fuzz)
    assert empty.shape == (2, 3, 4, 5) and not bool(empty.any())


def test_ivf_topk_is_the_top_k_of_the_probed_lists():
    """The IVF oracle against a masked brute force: the best top_k keys among the lists whose
    centroids score best for each query head; with every list probed, the flat top-k."""
    from lckv.reference import flat_topk_scores, ivf_layout, ivf_topk_scores

    gen, seed = fresh_generator()
    keys = torch.randn(2, 2, 150, 12, generator=gen)
    assign = torch.randint(0, 6, (2, 2, 150), generator=gen)
    centroids = torch.randn(2, 2, 6, 12, generator=gen)
    q = torch.randn(2, 6, 12, generator=gen)
    layout = ivf_layout(keys, assign, 6)
    assert torch.equal(layout[0], torch.gather(keys, 2, layout[2][..., None].expand(-1, -1, -1, 12)))
    scores, rows = ivf_topk_scores(q, centroids, *layout, nprobe=2, top_k=20)
    for b in range(2):
        for h in range(6):
            kv = h // 3
            probed = torch.topk(centroids[b, kv] @ q[b, h], 2).indices
            allowed = (assign[b, kv][:, None] == probed[None]).any(-1)
            exact = (keys[b, kv] @ q[b, h]).masked_fill(~allowed, float("-inf"))
            count = min(20, int(allowed.sum()))
            want = torch.topk(exact, count)
            torch.testing.assert_close(scores[b, h, :count], want.values, msg=f"seed {seed}")
            assert set(rows[b, h, :count].tolist()) == set(want.indices.tolist()), f"seed {seed}"
            assert bool((rows[b, h, count:] == -1).all()) and bool(torch.isinf(scores[b, h, count:]).all())
    every = ivf_topk_scores(q, centroids, *layout, nprobe=6, top_k=20)
    flat = flat_topk_scores(q, keys, 20)
    torch.testing.assert_close(every[0], flat[0])
    assert torch.equal(every[1], flat[1]), f"seed {seed}"


def test_ivf_refuses_bad_layouts_and_settings():
    from lckv.reference import ivf_layout, ivf_topk_scores

    keys, q = torch.randn(1, 1, 10, 4), torch.randn(1, 1, 4)
    centroids = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match=r"assign must hold list ids in \[0, n_lists = 3\)"):
        ivf_layout(keys, torch.full((1, 1, 10), 3), 3)
    layout = ivf_layout(keys, torch.randint(0, 3, (1, 1, 10)), 3)
    with pytest.raises(ValueError, match=r"nprobe must be an int in \[1, n_lists = 3\]"):
        ivf_topk_scores(q, centroids, *layout, nprobe=4, top_k=2)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        ivf_topk_scores(q, centroids, *layout, nprobe=1, top_k=0)
    broken = layout[1].clone()
    broken[..., -1] = 9
    with pytest.raises(ValueError, match="list_offsets must rise from 0 to n = 10"):
        ivf_topk_scores(q, centroids, layout[0], broken, layout[2], nprobe=1, top_k=2)
    with pytest.raises(ValueError, match="list_keys contains NaN"):
        ivf_topk_scores(q, centroids, layout[0].clone().fill_(float("nan")), *layout[1:], nprobe=1, top_k=2)
