"""Triton decode sparse attention (TRITON_INTERPRET=1) against the reference oracle."""
import pytest
import torch

from kernel_oracles import assert_matches, fresh_generator, lowp_sparse, randn, sparse_oracle
from lckv.ops import sparse_attention_with_lse

pytestmark = pytest.mark.triton_interpret


def _case(gen, batch, kv_heads, group, seq, n_sel, head_dim, dtype, pad_fraction=0.2):
    q = randn(gen, batch, kv_heads * group, head_dim, dtype=dtype, scale=2.0)
    k = randn(gen, batch, kv_heads, seq, head_dim, dtype=dtype)
    v = randn(gen, batch, kv_heads, seq, head_dim, dtype=dtype)
    idx = torch.randint(0, seq, (batch, kv_heads, n_sel), generator=gen)
    idx = torch.where(torch.rand(idx.shape, generator=gen) < pad_fraction, -1, idx)
    return q, k, v, idx


@pytest.mark.parametrize("head_dim", [8, 59, 64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_fp32_matches_reference(head_dim, group):
    gen, seed = fresh_generator()
    q, k, v, idx = _case(gen, 2, 2, group, 90, 77, head_dim, torch.float32)  # 77: not a multiple of BLOCK_N
    idx[1, 0] = -1  # one (batch, kv head) selects nothing: out 0, lse -inf
    out, lse = sparse_attention_with_lse(q, k, v, idx, backend="triton")
    want_out, want_lse = sparse_oracle(q, k, v, idx)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_matches(lse, want_lse, what="lse", seed=seed)
    assert_matches(out, want_out, what="out", seed=seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim,group", [(64, 2), (59, 4), (128, 1)])
def test_low_precision_within_twice_torch_error(dtype, head_dim, group):
    gen, seed = fresh_generator()
    q, k, v, idx = _case(gen, 1, 2, group, 120, 70, head_dim, dtype)
    out, lse = sparse_attention_with_lse(q, k, v, idx, backend="triton")
    want_out, want_lse = sparse_oracle(q.float(), k.float(), v.float(), idx)
    low_out, low_lse = lowp_sparse(q, k, v, idx)
    assert out.dtype == dtype
    assert_matches(out, want_out, lowp=low_out, what=f"out {dtype}", seed=seed)
    assert_matches(lse, want_lse, lowp=low_lse, what=f"lse {dtype}", seed=seed)


def test_strided_kv_and_explicit_scale():
    gen, seed = fresh_generator()
    base = randn(gen, 1, 40, 3, 64)  # [B, seq, Hkv, D] viewed as [B, Hkv, seq, D]
    k = base.transpose(1, 2)
    v = randn(gen, 1, 40, 3, 64).transpose(1, 2)
    q = randn(gen, 1, 6, 64)
    idx = torch.randint(-1, 40, (1, 3, 33), generator=gen)
    out, lse = sparse_attention_with_lse(q, k, v, idx, scale=0.37, backend="triton")
    want_out, want_lse = sparse_oracle(q, k, v, idx, scale=0.37)
    assert_matches(out, want_out, what="out", seed=seed)
    assert_matches(lse, want_lse, what="lse", seed=seed)


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [111, 256])
def test_larger_shapes(head_dim):
    gen, seed = fresh_generator()
    q, k, v, idx = _case(gen, 3, 4, 7, 700, 513, head_dim, torch.float32)
    out, lse = sparse_attention_with_lse(q, k, v, idx, backend="triton")
    want_out, want_lse = sparse_oracle(q, k, v, idx)
    assert_matches(out, want_out, what="out", seed=seed)
    assert_matches(lse, want_lse, what="lse", seed=seed)
