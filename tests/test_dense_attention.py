"""The exact path's fused dense attention (``lckv.ops.attention_with_lse``, torch backend: torch's
CPU flash kernel plus lckv's causal split and empty-row handling) against the fp32 reference."""
import pytest
import torch

from lckv import ops, reference
from lckv.backends import resolve_backend

# fp32: both accumulate in fp32 in a different order (blocked online softmax vs one softmax).
FP32_ATOL = 2e-5


def _inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, dtype=torch.float32, strided=False):
    q = torch.randn(batch, q_heads, q_len, head_dim, dtype=dtype)
    if strided:  # views into a larger buffer, as the host store hands them out
        k = torch.randn(batch, kv_heads, kv_len + 7, head_dim, dtype=dtype)[:, :, 3:3 + kv_len]
        v = torch.randn(batch, kv_heads, kv_len + 7, head_dim, dtype=dtype)[:, :, 3:3 + kv_len]
        q = torch.randn(batch, q_len, q_heads, head_dim, dtype=dtype).transpose(1, 2)
    else:
        k = torch.randn(batch, kv_heads, kv_len, head_dim, dtype=dtype)
        v = torch.randn(batch, kv_heads, kv_len, head_dim, dtype=dtype)
    return q, k, v


def _padding(batch, kv_len):
    pad = torch.rand(batch, kv_len) > 0.3
    pad[0, : kv_len // 2] = False  # left padding: early causal rows see only pad keys
    if batch > 2:
        pad[2] = False  # a row with no real key at all
    return pad


def test_auto_picks_the_fused_kernel_on_cpu():
    assert resolve_backend("attention_with_lse", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("head_dim", [8, 59, 64, 111, 128])
@pytest.mark.parametrize("q_heads,kv_heads", [(3, 3), (4, 2), (14, 2)])
@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 77), (13, 13), (13, 100), (40, 9), (130, 130)])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_matches_reference(head_dim, q_heads, kv_heads, q_len, kv_len, causal):
    batch = 3 if head_dim in (59, 111) else 1
    q, k, v = _inputs(batch, q_heads, kv_heads, q_len, kv_len, head_dim, strided=head_dim == 59)
    for pad in (None, _padding(batch, kv_len)):
        out, lse = ops.attention_with_lse(q, k, v, causal=causal, key_padding=pad, backend="torch")
        ref_out, ref_lse = reference.attention_with_lse(q, k, v, causal=causal, key_padding=pad)
        torch.testing.assert_close(out, ref_out, atol=FP32_ATOL, rtol=1e-5)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows with no key must get lse = -inf"
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=FP32_ATOL, rtol=1e-5)
        assert not out.isnan().any() and torch.all(out[~finite] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_low_precision_within_twice_torchs_own_error(dtype):
    """Exact-op tolerance (STYLE.md): error vs the fp32 reference at most ~2x what torch's own sdpa
    in the same dtype makes."""
    q, k, v = _inputs(2, 14, 2, 50, 300, 64, dtype=dtype)
    ref_out, ref_lse = reference.attention_with_lse(q.float(), k.float(), v.float(), causal=True)
    out, lse = ops.attention_with_lse(q, k, v, causal=True, backend="torch")
    kk, vv = k.repeat_interleave(7, 1), v.repeat_interleave(7, 1)
    mask = torch.ones(50, 300, dtype=torch.bool).tril(300 - 50)
    torch_own = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    bound = 2 * (torch_own.float() - ref_out).abs().max().item()
    assert (out.float() - ref_out).abs().max().item() <= bound
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


def test_empty_keys_and_general_masks():
    q, k, v = _inputs(2, 4, 2, 5, 0, 16)
    out, lse = ops.attention_with_lse(q, k, v, causal=True, backend="torch")
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    q, k, v = _inputs(2, 4, 2, 5, 9, 16)
    mask = torch.rand(2, 4, 5, 9) > 0.5
    out, lse = ops.attention_with_lse(q, k, v, mask=mask)  # auto: a general mask goes to the reference
    ref = reference.attention_with_lse(q, k, v, mask=mask)
    torch.testing.assert_close(out, ref[0])
    with pytest.raises(ValueError, match="takes key_padding, not a general mask"):
        ops.attention_with_lse(q, k, v, mask=mask, backend="torch")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_len", [0, 7])
def test_no_queries_returns_empty_states(causal, kv_len):
    """q_len 0 never reaches torch's fused kernel, which dies of SIGFPE on it (found by
    benchmarks/fuzz.py)."""
    q, k, v = _inputs(2, 4, 2, 0, kv_len, 16)
    for backend in ("torch", "reference"):
        out, lse = ops.attention_with_lse(q, k, v, causal=causal, backend=backend)
        assert out.shape == (2, 4, 0, 16) and lse.shape == (2, 4, 0) and lse.dtype == torch.float32
    out, lse = ops.attention_with_lse(q, k, v, causal=causal, key_padding=torch.ones(2, kv_len, dtype=torch.bool))
    assert out.shape == (2, 4, 0, 16)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_dim_not_contiguous_matches_the_reference(which, dtype):
    """torch's fused kernel reads the last dim as contiguous whatever its stride: a view with
    stride 2 there gave errors of ~1 (found by benchmarks/fuzz.py); the launcher copies it."""
    q, k, v = _inputs(2, 4, 2, 5, 9, 16, dtype=dtype)
    args = {"q": q, "k": k, "v": v}
    wide = torch.zeros(*args[which].shape[:-1], 32, dtype=dtype)
    wide[..., ::2] = args[which]
    args[which] = wide[..., ::2]
    assert args[which].stride(-1) == 2
    out, lse = ops.attention_with_lse(args["q"], args["k"], args["v"], causal=True, backend="torch")
    want, want_lse = ops.attention_with_lse(q, k, v, causal=True, backend="torch")
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_mask_wider_than_the_keys_is_refused(backend):
    """A [.., 2] mask over kv_len 1 "broadcast" with the scores instead of to them and raised a
    RuntimeError deep in the softmax (found by benchmarks/fuzz.py)."""
    q, k, v = _inputs(2, 3, 3, 3, 1, 8)
    with pytest.raises(ValueError, match=r"mask of shape \(1, 3, 1, 2\) does not broadcast to \(2, 3, 3, 1\)"):
        ops.attention_with_lse(q, k, v, mask=torch.ones(1, 3, 1, 2, dtype=torch.bool), backend=backend)


def test_key_padding_is_checked():
    q, k, v = _inputs(2, 4, 2, 5, 9, 16)
    with pytest.raises(TypeError, match="key_padding must be a bool tensor"):
        ops.attention_with_lse(q, k, v, key_padding=torch.ones(2, 9))
    with pytest.raises(ValueError, match=r"key_padding must have shape \[batch=2, kv_len=9\]"):
        ops.attention_with_lse(q, k, v, key_padding=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding must have shape"):
        reference.attention_with_lse(q, k, v, key_padding=torch.ones(1, 9, dtype=torch.bool))


def test_autograd_takes_the_reference():
    """The kernel's lse has no gradient: under autograd the engine uses the reference formulation."""
    q, k, v = _inputs(1, 4, 2, 6, 6, 16)
    q.requires_grad_(True)
    out, lse = ops.attention_with_lse(q, k, v, causal=True)
    (out.sum() + lse.sum()).backward()
    q2 = q.detach().clone().requires_grad_(True)
    ref_out, ref_lse = reference.attention_with_lse(q2, k, v, causal=True)
    (ref_out.sum() + ref_lse.sum()).backward()
    torch.testing.assert_close(q.grad, q2.grad)
