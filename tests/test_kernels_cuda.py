"""The hand-written CUDA kernels (csrc/cuda/, backend ``cuda``) against the reference ops, on a GPU.

Skipped on machines without one (``cuda`` marker) and where lckv._C was built without its CUDA
kernels (a torch without CUDA). benchmarks/gpu_check.sh runs these on the GPU machine. Their
host/device cores are also tested without a GPU by tests/cpp/test_topk_scan.cpp and
test_gather_rows.cpp.
"""
import pytest
import torch

import lckv.backends as backends
from kernel_oracles import check_topk, fresh_generator, randn
from lckv.ops import gather_rows
from lckv.reference import gather_rows as reference_gather

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _cuda_kernels_bound():
    if not backends._cuda_extension_has("flat_topk_scores"):
        pytest.skip("lckv._C was built without its CUDA kernels (rebuild against a torch with CUDA)")


@pytest.mark.parametrize(
    "top_k,seq,group,head_dim",
    [(1, 100, 1, 8), (5, 150, 2, 59), (16, 700, 7, 64), (64, 130, 1, 128), (200, 2000, 2, 128), (130, 129, 4, 64)],
)
def test_flat_topk_fp32(top_k, seq, group, head_dim):
    gen, seed = fresh_generator()
    q, k = randn(gen, 2, 2 * group, head_dim).cuda(), randn(gen, 2, 2, seq, head_dim).cuda()
    check_topk(q, k, top_k, seed, tol=1e-5 * head_dim ** 0.5, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flat_topk_low_precision_and_strided_keys(dtype):
    gen, seed = fresh_generator()
    q = randn(gen, 1, 4, 64).cuda()
    k = randn(gen, 1, 3, 300, 2, 64, dtype=dtype).cuda()[:, 1:, :, 0]  # strided rows and heads
    # products of 16-bit keys with fp32 queries summed in fp32: the fp32 reference of the same keys
    check_topk(q, k, 8, seed, tol=1e-5 * 8, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pinned", [True, False])
def test_gather_rows_from_pinned_host_and_device(dtype, pinned):
    gen, seed = fresh_generator()
    src = randn(gen, 2, 3, 500, 72, dtype=dtype)
    src = src.pin_memory() if pinned else src.cuda()
    indices = torch.randint(-1, 500, (2, 3, 37), generator=gen).cuda()
    got = gather_rows(src, indices, backend="cuda")
    assert got.device == indices.device and got.dtype == dtype
    assert torch.equal(got.cpu(), reference_gather(src.cpu(), indices.cpu())), f"seed {seed}"


def test_gather_rows_refuses_an_unpinned_host_store():
    src, indices = torch.randn(1, 1, 10, 8), torch.zeros(1, 1, 2, dtype=torch.int64).cuda()
    with pytest.raises(ValueError, match="pinned host memory"):
        gather_rows(src, indices, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("top_k,n,n_lists,nprobe,group", [(10, 3000, 40, 4, 7), (200, 5000, 8, 3, 2), (5, 50, 16, 16, 1)])
def test_ivf_topk_matches_the_reference(dtype, top_k, n, n_lists, nprobe, group):
    from lckv.ops import ivf_layout, ivf_topk_scores

    gen, seed = fresh_generator()
    keys = randn(gen, 2, 2, n, 64, dtype=dtype)
    assign = torch.randint(0, n_lists, (2, 2, n), generator=gen)
    centroids, q = randn(gen, 2, 2, n_lists, 64), randn(gen, 2, 2 * group, 64)
    layout = ivf_layout(keys, assign, n_lists)
    want = ivf_topk_scores(q, centroids, *layout, nprobe, top_k, backend="reference")
    got = ivf_topk_scores(q.cuda(), centroids.cuda(), *(t.cuda() for t in layout), nprobe, top_k, backend="cuda")
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=1e-5 * 8, msg=lambda m: f"seed {seed}: {m}")
    assert torch.equal(got[1].cpu() == -1, want[1] == -1), f"seed {seed}"
