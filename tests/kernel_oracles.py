"""Oracles shared by the kernel/op tests, composed only from lckv.reference.

``sparse_oracle`` evaluates decode sparse attention through the dense reference
(:func:`lckv.reference.attention_with_lse`) on explicitly gathered rows with a padding mask, so it
is an independent check of both the C++/Triton kernels and ``lckv.reference.sparse_attention_with_lse``.
"""
import os

import torch

from lckv.reference import attention_with_lse


def fresh_generator() -> tuple[torch.Generator, int]:
    """A generator seeded from os.urandom; print the seed in failure messages."""
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def sparse_oracle(q, k, v, indices, scale=None):
    batch, kv_heads, n_sel = indices.shape
    head_dim = q.shape[-1]
    safe = indices.clamp(min=0).unsqueeze(-1).expand(batch, kv_heads, n_sel, head_dim)
    k_sel = torch.gather(k, 2, safe)
    v_sel = torch.gather(v, 2, safe)
    group = q.shape[1] // kv_heads
    mask = (indices >= 0).repeat_interleave(group, dim=1).unsqueeze(2)  # [B, Hq, 1, n]
    out, lse = attention_with_lse(q.unsqueeze(2), k_sel, v_sel, mask=mask, scale=scale)
    return out.squeeze(2), lse.squeeze(2)


def low_precision_bound(exact, lowp_oracle, floor=1e-6):
    """Error allowed for a low-precision kernel: 2x what PyTorch's own low-precision computation
    (``lowp_oracle``) makes against the fp32 result ``exact`` (flash-attn's rule), plus a floor."""
    return 2.0 * (lowp_oracle.float() - exact.float()).abs().max().item() + floor


def randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def lowp_sparse(q, k, v, indices, scale=None):
    """PyTorch's own low-precision sparse attention: every step in the inputs' dtype."""
    batch, kv_heads, n_sel = indices.shape
    q_heads, head_dim = q.shape[1], q.shape[2]
    group = q_heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    safe = indices.clamp(min=0).unsqueeze(-1).expand(batch, kv_heads, n_sel, head_dim)
    k_sel = torch.gather(k, 2, safe).repeat_interleave(group, 1)
    v_sel = torch.gather(v, 2, safe).repeat_interleave(group, 1)
    scores = (q.unsqueeze(2) @ k_sel.transpose(-1, -2)) * scale  # [B, Hq, 1, n]
    valid = (indices >= 0).repeat_interleave(group, 1).unsqueeze(2)
    scores = scores.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.nan_to_num(torch.softmax(scores, -1)) @ v_sel
    return out.squeeze(2), lse.squeeze(2).float()


def lowp_attention(q, k, v, mask, scale=None):
    """PyTorch's own low-precision masked attention (mask [q_len, kv_len] bool, True = attend)."""
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.nan_to_num(torch.softmax(scores, -1)) @ v
    return out, lse.float()


def assert_matches(got, want, lowp=None, what="", seed=None, rtol=1e-5, atol=1e-5):
    """fp32 inputs: ``rtol``/``atol`` (~1e-5). Low-precision inputs (``lowp`` given): the error may
    be at most 2x PyTorch's own low-precision error against the same fp32 ``want``."""
    got32, want32 = got.float(), want.float()
    finite = torch.isfinite(want32)
    assert torch.equal(torch.isfinite(got32), finite), f"{what}: empty-row pattern differs (seed {seed})"
    assert torch.equal(got32[~finite], want32[~finite]), f"{what}: -inf rows differ (seed {seed})"
    if lowp is None:
        torch.testing.assert_close(got32, want32, rtol=rtol, atol=atol, msg=lambda m: f"{what} (seed {seed}): {m}")
        return
    lowp32 = lowp.float()
    bound = 2.0 * (lowp32[finite] - want32[finite]).abs().max().item() + 1e-6 if finite.any() else 0.0
    err = (got32[finite] - want32[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= bound, f"{what}: error {err:.3g} > 2x PyTorch low-precision error bound {bound:.3g} (seed {seed})"


def check_topk(q, k, top_k, seed, tol, backend):
    """``lckv.ops.flat_topk_scores`` on ``backend`` against the reference: scores to ``tol``, -1 exactly
    where the score is -inf, each returned index scoring what it says, no index twice."""
    from lckv.ops import flat_topk_scores
    from lckv.reference import flat_topk_scores as reference_topk

    scores, idx = flat_topk_scores(q, k, top_k, backend=backend)
    want_scores, _ = reference_topk(q.float().cpu(), k.float().cpu(), top_k)
    scores, idx = scores.cpu(), idx.cpu()
    q, k = q.cpu(), k.cpu()
    assert scores.shape == idx.shape == (q.shape[0], q.shape[1], top_k)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    torch.testing.assert_close(scores, want_scores, rtol=tol, atol=tol, msg=lambda m: f"scores (seed {seed}): {m}")
    seq = k.shape[2]
    assert torch.equal(idx == -1, torch.isinf(scores)), f"-1 exactly where the score is -inf (seed {seed})"
    group = q.shape[1] // k.shape[1]
    exact = (q.float().reshape(q.shape[0], k.shape[1], group, -1) @ k.float().transpose(-1, -2)).reshape(
        q.shape[0], q.shape[1], seq)
    found = idx >= 0
    at_idx = torch.gather(exact, -1, idx.clamp(min=0))
    torch.testing.assert_close(at_idx[found], scores[found], rtol=tol, atol=tol,
                               msg=lambda m: f"scores at returned indices (seed {seed}): {m}")
    for row in idx.reshape(-1, top_k):
        kept = row[row >= 0]
        assert kept.unique().numel() == kept.numel(), f"repeated index (seed {seed})"
