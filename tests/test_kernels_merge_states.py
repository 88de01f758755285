"""Triton merge of partial attention states (TRITON_INTERPRET=1) against the reference, plus the
property that merging attention over two disjoint key sets equals attention over their union."""
import pytest
import torch

from kernel_oracles import assert_matches, fresh_generator, randn, sparse_oracle
from lckv.ops import merge_attention_states
from lckv.reference import merge_attention_states as reference

pytestmark = pytest.mark.triton_interpret


def _states(gen, shape, dtype):
    out_a, out_b = randn(gen, *shape, dtype=dtype), randn(gen, *shape, dtype=dtype)
    lse_a, lse_b = randn(gen, *shape[:-1], scale=3.0), randn(gen, *shape[:-1], scale=3.0)
    empty_a = torch.rand(shape[:-1], generator=gen) < 0.2
    empty_b = torch.rand(shape[:-1], generator=gen) < 0.2
    lse_a[empty_a] = float("-inf")
    lse_b[empty_b] = float("-inf")
    return out_a, lse_a, out_b, lse_b


@pytest.mark.parametrize("shape", [(2, 4, 8), (3, 5, 59), (1, 2, 7, 128), (65, 64)])
def test_fp32_matches_reference(shape):
    gen, seed = fresh_generator()
    args = _states(gen, shape, torch.float32)
    out, lse = merge_attention_states(*args, backend="triton")
    want_out, want_lse = reference(*args)
    assert_matches(lse, want_lse, what="lse", seed=seed)
    assert_matches(out, want_out, what="out", seed=seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype):
    gen, seed = fresh_generator()
    out_a, lse_a, out_b, lse_b = _states(gen, (3, 4, 64), dtype)
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b, backend="triton")
    want_out, want_lse = reference(out_a.float(), lse_a, out_b.float(), lse_b)
    # PyTorch's own merge with the weights and the sum in the low precision.
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_a, w_b = torch.exp(lse_a - m).to(dtype), torch.exp(lse_b - m).to(dtype)
    total = torch.where(w_a + w_b > 0, w_a + w_b, torch.ones_like(w_a))
    low = (out_a * w_a.unsqueeze(-1) + out_b * w_b.unsqueeze(-1)) / total.unsqueeze(-1)
    assert out.dtype == dtype
    assert_matches(out, want_out, lowp=low, what=f"out {dtype}", seed=seed)
    assert_matches(lse, want_lse, what="lse", seed=seed)


def test_merging_disjoint_parts_equals_attention_over_the_union():
    gen, seed = fresh_generator()
    q, k, v = randn(gen, 2, 4, 64), randn(gen, 2, 2, 80, 64), randn(gen, 2, 2, 80, 64)
    perm = torch.randperm(80, generator=gen)
    part_a = perm[:30].expand(2, 2, 30).contiguous()
    part_b = perm[30:].expand(2, 2, 50).contiguous()
    out_a, lse_a = sparse_oracle(q, k, v, part_a)
    out_b, lse_b = sparse_oracle(q, k, v, part_b)
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b, backend="triton")
    want_out, want_lse = sparse_oracle(q, k, v, perm.expand(2, 2, 80).contiguous())
    assert_matches(out, want_out, what="out", seed=seed)
    assert_matches(lse, want_lse, what="lse", seed=seed)
