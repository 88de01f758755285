"""Triton sink + window attention (decode and causal chunked prefill, TRITON_INTERPRET=1) against
the reference oracle."""
import pytest
import torch

from kernel_oracles import assert_matches, fresh_generator, lowp_attention, randn
from lckv.ops import sink_window_attention_with_lse
from lckv.reference import sink_window_attention_with_lse as reference
from lckv.reference.window import sink_window_mask

pytestmark = pytest.mark.triton_interpret


def _case(gen, batch, kv_heads, group, q_len, kv_len, head_dim, dtype=torch.float32):
    q = randn(gen, batch, kv_heads * group, q_len, head_dim, dtype=dtype, scale=2.0)
    k = randn(gen, batch, kv_heads, kv_len, head_dim, dtype=dtype)
    v = randn(gen, batch, kv_heads, kv_len, head_dim, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("head_dim", [8, 59, 64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_decode_fp32(head_dim, group):
    gen, seed = fresh_generator()
    q, k, v = _case(gen, 2, 2, group, 1, 75, head_dim)
    out, lse = sink_window_attention_with_lse(q, k, v, sink=3, window=21, backend="triton")
    want_out, want_lse = reference(q, k, v, 3, 21)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    assert_matches(lse, want_lse, what="lse", seed=seed)
    assert_matches(out, want_out, what="out", seed=seed)


@pytest.mark.parametrize(
    "q_len,kv_len,sink,window,group,head_dim",
    [
        (13, 50, 4, 9, 2, 64),     # chunk in the middle of the cache, window smaller than the chunk
        (21, 21, 2, 40, 1, 59),    # whole-prompt prefill; window larger than the cache
        (7, 33, 0, 5, 4, 8),       # no sink
        (9, 30, 6, 0, 2, 128),     # sink only: every query sees just the sink keys
        (5, 12, 0, 0, 1, 8),       # sees nothing: out 0, lse -inf
        (17, 40, 45, 3, 2, 64),    # sink longer than the cache
    ],
)
def test_chunked_prefill_fp32(q_len, kv_len, sink, window, group, head_dim):
    gen, seed = fresh_generator()
    q, k, v = _case(gen, 2, 2, group, q_len, kv_len, head_dim)
    out, lse = sink_window_attention_with_lse(q, k, v, sink=sink, window=window, backend="triton")
    want_out, want_lse = reference(q, k, v, sink, window)
    assert_matches(lse, want_lse, what="lse", seed=seed)
    assert_matches(out, want_out, what="out", seed=seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_len,group,head_dim", [(1, 4, 64), (11, 2, 59)])
def test_low_precision_within_twice_torch_error(dtype, q_len, group, head_dim):
    gen, seed = fresh_generator()
    q, k, v = _case(gen, 1, 2, group, q_len, 47, head_dim, dtype)
    out, lse = sink_window_attention_with_lse(q, k, v, sink=4, window=16, backend="triton")
    want_out, want_lse = reference(q.float(), k.float(), v.float(), 4, 16)
    mask = sink_window_mask(q_len, 47, 4, 16)
    low_out, low_lse = lowp_attention(q, k, v, mask)
    assert out.dtype == dtype
    assert_matches(out, want_out, lowp=low_out, what=f"out {dtype}", seed=seed)
    assert_matches(lse, want_lse, lowp=low_lse, what=f"lse {dtype}", seed=seed)


@pytest.mark.slow
def test_long_prefill_chunk():
    gen, seed = fresh_generator()
    q, k, v = _case(gen, 1, 2, 4, 130, 700, 111)
    out, lse = sink_window_attention_with_lse(q, k, v, sink=4, window=200, backend="triton")
    want_out, want_lse = reference(q, k, v, 4, 200)
    assert_matches(out, want_out, what="out", seed=seed)
    assert_matches(lse, want_lse, what="lse", seed=seed)
