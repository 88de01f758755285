"""lckv._C.kmeans (csrc/include/lckv/kmeans.h, the k-means of every lckv index) against Lloyd's
algorithm in torch from the same initial centroids."""
import pytest
import torch

from lckv._extension import compiled

pytest.importorskip("lckv._C")


def kmeans(points, n_clusters, iterations, seed):
    """The kernel from n_clusters initial points drawn by seed (torch.randperm, as lckv's callers draw them)."""
    init = torch.randperm(points.shape[1], generator=torch.Generator().manual_seed(seed))[:n_clusters]
    return compiled("kmeans").kmeans(points, init, iterations)


def lloyd_reference(points, init, iterations):
    """Lloyd's k-means of points [heads, n, dim] from centroids init [heads, C, dim]: nearest
    centroid in L2 (first on ties), each centroid to its points' mean (an empty cluster keeps its
    centroid); fp64 arithmetic, centroids stored in fp32 as the kernel stores them."""
    x = points.double()
    cent = init.double()

    def nearest(c):
        return (x @ c.transpose(1, 2) - 0.5 * (c * c).sum(-1)[:, None, :]).argmax(-1)

    for _ in range(iterations):
        assign = nearest(cent)
        sums = torch.zeros_like(cent).scatter_add_(1, assign[..., None].expand_as(x), x)
        counts = torch.zeros(cent.shape[:2], dtype=torch.float64).scatter_add_(1, assign, torch.ones_like(x[..., 0]))
        cent = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], cent).float().double()
    return cent.float(), nearest(cent)


def initial_positions(points, init):
    """The positions of the initial centroids init [heads, C, dim] among points [heads, n, dim]:
    each must be a point, at the same position in every head, and the positions distinct."""
    match = (init[:, :, None, :] == points[:, None, :, :]).all(-1)  # [heads, C, n]
    assert match.any(-1).all(), "an initial centroid is not one of the points"
    positions = match.int().argmax(-1)[0]
    assert torch.equal(init, points[:, positions]) and len(set(positions.tolist())) == init.shape[1]
    return positions


def blobs(heads, n, dim, n_blobs=6):
    """Points around a few random centres per head (fresh each call)."""
    centres = 3 * torch.randn(heads, n_blobs, dim)
    labels = torch.randint(0, n_blobs, (heads, n))
    return torch.gather(centres, 1, labels[..., None].expand(-1, -1, dim)) + torch.randn(heads, n, dim)


@pytest.mark.parametrize("heads, n, dim, n_clusters", [(1, 1, 8, 1), (3, 37, 7, 5), (2, 300, 59, 16),
                                                       (1, 257, 128, 33), (2, 90, 1, 4), (3, 40, 16, 40)])
@pytest.mark.parametrize("iterations", [0, 1, 6])
def test_kmeans_matches_torch_lloyd(heads, n, dim, n_clusters, iterations):
    points = blobs(heads, n, dim)
    seed = int(torch.randint(0, 2**62, ()))
    init, _ = kmeans(points, n_clusters, 0, seed)
    initial_positions(points, init)
    centroids, assign = kmeans(points, n_clusters, iterations, seed)
    assert centroids.shape == (heads, n_clusters, dim) and centroids.dtype == torch.float32
    assert assign.shape == (heads, n) and assign.dtype == torch.int64
    ref_centroids, ref_assign = lloyd_reference(points, init, iterations)
    assert torch.equal(assign, ref_assign)
    torch.testing.assert_close(centroids, ref_centroids, rtol=1e-5, atol=1e-5)


def test_kmeans_starts_at_distinct_points_drawn_by_seed():
    heads, n, dim, n_clusters = 3, 50, 8, 10
    points = torch.randn(heads, n, dim)
    init, assign = kmeans(points, n_clusters, 0, seed=7)
    positions = initial_positions(points, init)
    assert torch.equal(assign[:, positions], torch.arange(n_clusters).expand(heads, -1))
    assert not torch.equal(positions, initial_positions(points, kmeans(points, n_clusters, 0, seed=8)[0]))
    again = kmeans(points, n_clusters, 4, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(again, kmeans(points, n_clusters, 4, seed=7)))


def test_kmeans_empty_cluster_keeps_its_centroid():
    row = torch.randn(5)
    points = row.expand(1, 20, 5).contiguous()  # every initial centroid is the same point: ties go to 0
    centroids, assign = kmeans(points, 3, 4, seed=1)
    assert (assign == 0).all()
    assert torch.equal(centroids, row.expand(1, 3, 5))


def test_kmeans_rejects_bad_input():
    points = torch.randn(2, 10, 4)
    with pytest.raises(TypeError, match="points must be float32"):
        kmeans(points.double(), 3, 1, 0)
    with pytest.raises(ValueError, match=r"points must have shape \[heads, n, dim\]"):
        kmeans(points[0], 3, 1, 0)
    with pytest.raises(ValueError, match="points must be contiguous"):
        kmeans(points.transpose(1, 2), 3, 1, 0)
    with pytest.raises(ValueError, match="points must be a CPU tensor"):
        kmeans(points.to("meta"), 3, 1, 0)
    with pytest.raises(ValueError, match="points must have dim >= 1"):
        kmeans(torch.randn(2, 10, 0), 3, 1, 0)
    with pytest.raises(ValueError, match="points contains NaN or inf"):
        kmeans(torch.cat([points, torch.full((2, 1, 4), float("nan"))], 1), 3, 1, 0)
    raw = compiled("kmeans").kmeans
    with pytest.raises(ValueError, match="init must hold between 1 and n = 10 point positions, got 0"):
        raw(points, torch.empty(0, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="init must hold between 1 and n = 10 point positions, got 11"):
        raw(points, torch.arange(11), 1)
    with pytest.raises(ValueError, match=r"init must hold point positions in \[0, 10\), got 10"):
        raw(points, torch.tensor([3, 10]), 1)
    with pytest.raises(ValueError, match="init must hold distinct positions, got 4 twice"):
        raw(points, torch.tensor([4, 1, 4]), 1)
    with pytest.raises(TypeError, match="init must be int64"):
        raw(points, torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="init must be a 1-D CPU tensor"):
        raw(points, torch.tensor([[1, 2]]), 1)
    with pytest.raises(ValueError, match="iterations must be >= 0"):
        kmeans(points, 3, -1, 0)
