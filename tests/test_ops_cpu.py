"""The C++ CPU backend (lckv._C) of the public ops against the reference, fresh random inputs."""
import pytest
import torch

from kernel_oracles import assert_matches, fresh_generator, lowp_attention, lowp_sparse, randn, sparse_oracle
from lckv import extension_available
from lckv.ops import merge_attention_states, sink_window_attention_with_lse, sparse_attention_with_lse
from lckv.reference import merge_attention_states as reference_merge
from lckv.reference import sink_window_attention_with_lse as reference_window
from lckv.reference.window import sink_window_mask

pytestmark = pytest.mark.skipif(not extension_available(), reason="lckv._C is not built (pip install -e .)")


def _sparse_case(gen, batch, kv_heads, group, seq, n_sel, head_dim, dtype):
    q = randn(gen, batch, kv_heads * group, head_dim, dtype=dtype, scale=2.0)
    k = randn(gen, batch, kv_heads, seq, head_dim, dtype=dtype)
    v = randn(gen, batch, kv_heads, seq, head_dim, dtype=dtype)
    idx = torch.randint(0, seq, (batch, kv_heads, n_sel), generator=gen)
    idx = torch.where(torch.rand(idx.shape, generator=gen) < 0.2, -1, idx)
    return q, k, v, idx


@pytest.mark.parametrize("head_dim", [8, 59, 64, 111, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 7])
@pytest.mark.parametrize("batch", [1, 3])
def test_sparse_fp32(head_dim, group, batch):
    gen, seed = fresh_generator()
    q, k, v, idx = _sparse_case(gen, batch, 2, group, 300, 257, head_dim, torch.float32)
    idx[0, 1] = -1  # a kv head with nothing selected
    out, lse = sparse_attention_with_lse(q, k, v, idx, backend="cpu")
    want_out, want_lse = sparse_oracle(q, k, v, idx)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_matches(lse, want_lse, what="lse", seed=seed)
    assert_matches(out, want_out, what="out", seed=seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim,group", [(64, 4), (128, 1), (59, 2), (128, 8)])
def test_sparse_low_precision_within_twice_torch_error(dtype, head_dim, group):
    gen, seed = fresh_generator()
    q, k, v, idx = _sparse_case(gen, 2, 2, group, 500, 300, head_dim, dtype)
    out, lse = sparse_attention_with_lse(q, k, v, idx, backend="cpu")
    want_out, want_lse = sparse_oracle(q.float(), k.float(), v.float(), idx)
    low_out, low_lse = lowp_sparse(q, k, v, idx)
    assert out.dtype == dtype
    assert_matches(out, want_out, lowp=low_out, what=f"out {dtype}", seed=seed)
    assert_matches(lse, want_lse, lowp=low_lse, what=f"lse {dtype}", seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim,group", [(64, 4), (128, 2), (72, 1), (59, 4)])  # 64/128/72: AVX2 intrinsics path
def test_sparse_around_prefetch_batches_and_more_indices_than_rows(dtype, head_dim, group):
    """The kernel prefetches rows in batches of 32 and processes them in tiles of 4: selection sizes
    on and off those boundaries, and more indices than K/V rows (repeats and -1 padding)."""
    gen, seed = fresh_generator()
    for n_sel, seq in ((1, 40), (31, 40), (33, 40), (97, 40), (130, 300)):
        q, k, v, idx = _sparse_case(gen, 2, 2, group, seq, n_sel, head_dim, dtype)
        out, lse = sparse_attention_with_lse(q, k, v, idx, backend="cpu")
        want_out, want_lse = sparse_oracle(q.float(), k.float(), v.float(), idx)
        what = f"{dtype} n={n_sel} seq={seq}"
        if dtype == torch.float32:
            assert_matches(lse, want_lse, what=f"lse {what}", seed=seed)
            assert_matches(out, want_out, what=f"out {what}", seed=seed)
        else:
            low_out, low_lse = lowp_sparse(q, k, v, idx)
            assert_matches(out, want_out, lowp=low_out, what=f"out {what}", seed=seed)
            assert_matches(lse, want_lse, lowp=low_lse, what=f"lse {what}", seed=seed)


def test_sparse_strided_kv_is_read_in_place_and_scale():
    gen, seed = fresh_generator()
    k = randn(gen, 2, 200, 4, 64).transpose(1, 2)  # [B, Hkv, seq, D] with seq-major storage
    v = randn(gen, 2, 4, 200, 128)[..., ::2]  # head_dim stride 2: copied by the glue, still correct
    q = randn(gen, 2, 8, 64)
    idx = torch.randint(-1, 200, (2, 4, 99), generator=gen)
    out, lse = sparse_attention_with_lse(q, k, v, idx, scale=0.21, backend="cpu")
    want_out, want_lse = sparse_oracle(q, k.contiguous(), v.contiguous(), idx, scale=0.21)
    assert_matches(out, want_out, what="out", seed=seed)
    assert_matches(lse, want_lse, what="lse", seed=seed)


def test_sparse_empty_selection_and_repeats():
    gen, seed = fresh_generator()
    q, k, v, _ = _sparse_case(gen, 1, 2, 2, 10, 0, 16, torch.float32)
    out, lse = sparse_attention_with_lse(q, k, v, torch.empty(1, 2, 0, dtype=torch.int64), backend="cpu")
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    idx = torch.tensor([[[3, 3, 3, -1], [0, 9, 0, 9]]])
    out, lse = sparse_attention_with_lse(q, k, v, idx, backend="cpu")
    want_out, want_lse = sparse_oracle(q, k, v, idx)
    assert_matches(out, want_out, what="out", seed=seed)
    assert_matches(lse, want_lse, what="lse", seed=seed)


@pytest.mark.parametrize(
    "q_len,kv_len,sink,window,group,head_dim,batch",
    [(1, 300, 4, 64, 4, 64, 2), (1, 50, 0, 100, 2, 59, 1), (19, 70, 3, 11, 2, 128, 3), (12, 12, 1, 5, 1, 8, 1),
     (6, 20, 0, 0, 2, 8, 1)],
)
def test_sink_window_fp32(q_len, kv_len, sink, window, group, head_dim, batch):
    gen, seed = fresh_generator()
    q = randn(gen, batch, 2 * group, q_len, head_dim, scale=2.0)
    k, v = randn(gen, batch, 2, kv_len, head_dim), randn(gen, batch, 2, kv_len, head_dim)
    out, lse = sink_window_attention_with_lse(q, k, v, sink, window, backend="cpu")
    want_out, want_lse = reference_window(q, k, v, sink, window)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert_matches(lse, want_lse, what="lse", seed=seed)
    assert_matches(out, want_out, what="out", seed=seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sink_window_low_precision(dtype):
    gen, seed = fresh_generator()
    q = randn(gen, 1, 8, 5, 64, dtype=dtype, scale=2.0)
    k, v = randn(gen, 1, 2, 90, 64, dtype=dtype), randn(gen, 1, 2, 90, 64, dtype=dtype)
    out, lse = sink_window_attention_with_lse(q, k, v, 4, 30, backend="cpu")
    want_out, want_lse = reference_window(q.float(), k.float(), v.float(), 4, 30)
    low_out, low_lse = lowp_attention(q, k, v, sink_window_mask(5, 90, 4, 30))
    assert_matches(out, want_out, lowp=low_out, what=f"out {dtype}", seed=seed)
    assert_matches(lse, want_lse, lowp=low_lse, what=f"lse {dtype}", seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge(dtype):
    gen, seed = fresh_generator()
    out_a, out_b = randn(gen, 3, 8, 128, dtype=dtype), randn(gen, 3, 8, 128, dtype=dtype)
    lse_a, lse_b = randn(gen, 3, 8, scale=3.0), randn(gen, 3, 8, scale=3.0)
    lse_a[0, :3] = float("-inf")
    lse_b[0, 2:5] = float("-inf")
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b, backend="cpu")
    want_out, want_lse = reference_merge(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype
    assert_matches(lse, want_lse, what="lse", seed=seed)
    # Both compute in fp32 and round once to dtype: allow one unit of the output's precision.
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert_matches(out, want_out, what="out", seed=seed, rtol=tol, atol=tol)


def test_auto_picks_the_extension_on_cpu():
    gen, seed = fresh_generator()
    q, k, v, idx = _sparse_case(gen, 1, 2, 2, 50, 20, 32, torch.float32)
    out, lse = sparse_attention_with_lse(q, k, v, idx)  # auto -> cpu
    want_out, want_lse = sparse_oracle(q, k, v, idx)
    assert_matches(out, want_out, what="out", seed=seed)
    assert_matches(lse, want_lse, what="lse", seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_read_rows_probe_reads_exactly_the_selected_rows(dtype):
    """The benchmark's memory-only probe must read the rows the kernel reads (checksum of their
    64-bit words, wrapping), skipping -1 padding; bad arguments get the kernel's errors."""
    from lckv._extension import compiled

    probe = compiled("sparse_attention_read_rows").sparse_attention_read_rows
    gen, seed = fresh_generator()
    k, v = randn(gen, 2, 3, 70, 64, dtype=dtype), randn(gen, 2, 3, 70, 64, dtype=dtype)
    idx = torch.randint(-1, 70, (2, 3, 45), generator=gen)
    safe = idx.clamp(min=0).unsqueeze(-1).expand(*idx.shape, 64)
    rows = torch.cat([torch.gather(k, 2, safe), torch.gather(v, 2, safe)], 1)  # [2, 6, 45, 64]
    rows = rows.masked_fill((idx < 0).repeat(1, 2, 1).unsqueeze(-1), 0.0)  # padding is not read: zero words
    words = rows.contiguous().view(torch.int64).flatten().tolist()
    assert probe(k, v, idx) == sum(w % (1 << 64) for w in words) % (1 << 64), f"seed {seed}"
    with pytest.raises(ValueError, match="indices must lie in"):
        probe(k, v, torch.full((2, 3, 4), 70))
    other = torch.float16 if dtype != torch.float16 else torch.float32
    with pytest.raises(TypeError, match="v must have the dtype of k"):
        probe(k, v.to(other), idx)
