"""Triton Quest page scoring and block-wise flat top-k (TRITON_INTERPRET=1) against the reference."""
import pytest
import torch

from kernel_oracles import check_topk, fresh_generator, randn
from lckv.ops import quest_page_scores
from lckv.reference import page_key_bounds
from lckv.reference import quest_page_scores as reference_pages

pytestmark = pytest.mark.triton_interpret


def _fp32_close(got, want, seed, what):
    # Sums of head_dim products: relative 1e-5 of the largest magnitude in the row set.
    atol = 1e-5 * max(1.0, want[torch.isfinite(want)].abs().max().item() if torch.isfinite(want).any() else 1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=lambda m: f"{what} (seed {seed}): {m}")


@pytest.mark.parametrize("head_dim", [8, 59, 64, 128])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_page_scores_fp32(head_dim, group):
    gen, seed = fresh_generator()
    k = randn(gen, 2, 2, 150, head_dim)
    page_min, page_max = page_key_bounds(k, 16)  # 10 pages, the last one partial
    q = randn(gen, 2, 2 * group, head_dim)
    got = quest_page_scores(q, page_min, page_max, backend="triton")
    want = reference_pages(q, page_min, page_max)
    _fp32_close(got, want, seed, "page scores")
    # The bound really bounds every key of the page.
    exact = (q.reshape(2, 2, group, head_dim) @ k.transpose(-1, -2)).reshape(2, 2 * group, 150)
    per_page = torch.nn.functional.pad(exact, (0, 10), value=float("-inf")).reshape(2, 2 * group, 10, 16).amax(-1)
    assert bool((per_page <= got + 1e-4).all()), f"a page holds a key above its bound (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_page_scores_low_precision(dtype):
    gen, seed = fresh_generator()
    k = randn(gen, 1, 2, 70, 64, dtype=dtype)
    page_min, page_max = (t.to(dtype) for t in page_key_bounds(k, 8))
    q = randn(gen, 1, 4, 64, dtype=dtype)
    got = quest_page_scores(q, page_min, page_max, backend="triton")
    want = reference_pages(q.float(), page_min.float(), page_max.float())
    low = torch.maximum(q.reshape(1, 2, 2, 1, 64) * page_min.unsqueeze(2),
                        q.reshape(1, 2, 2, 1, 64) * page_max.unsqueeze(2)).sum(-1).reshape(1, 4, -1)
    bound = 2 * (low.float() - want).abs().max().item() + 1e-6
    err = (got - want).abs().max().item()
    assert err <= bound, f"{dtype}: error {err:.3g} > 2x torch low-precision error {bound:.3g} (seed {seed})"


def _check_topk(q, k, top_k, seed, tol):
    check_topk(q, k, top_k, seed, tol, backend="triton")


@pytest.mark.parametrize(
    "top_k,seq,group,head_dim",
    [(1, 100, 1, 8), (5, 150, 2, 59), (16, 70, 4, 64), (64, 130, 1, 128), (100, 90, 2, 8)],  # last: top_k > seq
)
def test_flat_topk_fp32(top_k, seq, group, head_dim):
    gen, seed = fresh_generator()
    q, k = randn(gen, 1, 2 * group, head_dim), randn(gen, 1, 2, seq, head_dim)
    _check_topk(q, k, top_k, seed, tol=1e-5 * head_dim ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flat_topk_low_precision(dtype):
    gen, seed = fresh_generator()
    q, k = randn(gen, 1, 2, 64, dtype=dtype), randn(gen, 1, 1, 80, 64, dtype=dtype)
    # Products of low-precision inputs are exact in fp32, so the kernel matches the fp32 reference.
    _check_topk(q, k, 8, seed, tol=1e-5 * 8)


@pytest.mark.slow
def test_flat_topk_many_blocks():
    gen, seed = fresh_generator()
    q, k = randn(gen, 2, 8, 128), randn(gen, 2, 2, 2000, 128)
    _check_topk(q, k, 200, seed, tol=1e-4)
