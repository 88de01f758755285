"""The retrieval policy's ops (lckv.ops: centroid_estimate, estimate_add_rows,
rank_by_group_probability, decode_cluster_step, offload_rows): the ``cpu`` kernels against their
``reference`` implementations on fresh random inputs, and the backend choice by dtype.

Tolerances (STYLE.md): float32 reductions over at most a few thousand terms, atol 1e-5 /
rtol 1e-4 on outputs, 1e-5 on log-sum-exps; selections compared as sets."""
import os

import pytest
import torch

from lckv import ops
from lckv.backends import BackendUnavailableError

pytest.importorskip("lckv._C")


def _seed():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))


def _cluster_state(B, H, C, D, rows):
    centroids = torch.randn(B, H, C, D)
    assign = torch.randint(0, C, (B, H, rows))
    counts = torch.zeros(B, H, C).scatter_add_(2, assign, torch.ones(B, H, rows))
    values = torch.randn(B, H, rows, D)
    sums = torch.zeros(B, H, C, D).scatter_add_(2, assign.unsqueeze(-1).expand_as(values), values)
    return centroids, counts, sums, assign, values


@pytest.mark.parametrize("group", [1, 3])
def test_centroid_estimate_cpu_equals_reference(group):
    _seed()
    B, H, C, D, rows = 2, 2, 37, 16, 400
    centroids, counts, sums, assign, values = _cluster_state(B, H, C, D, rows)
    q = torch.randn(B, H * group, D)
    indices = torch.randint(-1, rows, (B, H, 50))
    got = ops.centroid_estimate(q, centroids, counts, sums, assign, values, indices, 0.3, backend="cpu")
    want = ops.centroid_estimate(q, centroids, counts, sums, assign, values, indices, 0.3, backend="reference")
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    lse = ops.centroid_estimate(q, centroids, counts, sums, assign, values, indices, 0.3, lse_only=True)
    torch.testing.assert_close(lse, want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 3])
def test_centroid_estimate_blocks_equals_the_per_query_estimate(group):
    """The retrieval prefill's estimate (blocks sharing rows, retrieved rows taken out of their
    clusters first) against the decode estimate run once per query with its block's rows."""
    from lckv.reference.estimate import centroid_estimate, centroid_estimate_blocks

    _seed()
    B, H, C, D, rows, m, block = 2, 2, 23, 8, 300, 3, 5
    centroids, counts, sums, assign, values = _cluster_state(B, H, C, D, rows)
    q = torch.randn(B, H * group, m, block, D)
    indices = torch.randint(-1, rows, (B, H, m, 40))  # -1s and repeats
    out, lse = centroid_estimate_blocks(q, centroids, counts, sums, assign, values, indices, 0.4)
    for j in range(m):
        for i in range(block):
            want_out, want_lse = centroid_estimate(q[:, :, j, i], centroids, counts, sums, assign, values,
                                                   indices[:, :, j], 0.4)
            torch.testing.assert_close(out[:, :, j, i], want_out, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(lse[:, :, j, i], want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_centroid_estimate_16bit_values_estimate_as_their_float32_values(dtype):
    """16-bit value rows are read in place and converted exactly: bit-equal to the kernel on a
    float32 copy of the same rounded rows, and equal to the reference up to summation order. A
    16-bit query has no kernel: the cpu backend refuses it, auto takes the reference."""
    _seed()
    centroids, counts, sums, assign, values = _cluster_state(2, 2, 11, 16, 60)
    q, indices = torch.randn(2, 6, 16), torch.randint(-1, 60, (2, 2, 9))
    half = values.to(dtype)
    got = ops.centroid_estimate(q, centroids, counts, sums, assign, half, indices, 0.5, backend="cpu")
    same = ops.centroid_estimate(q, centroids, counts, sums, assign, half.float(), indices, 0.5, backend="cpu")
    assert torch.equal(got[0], same[0]) and torch.equal(got[1], same[1])
    want = ops.centroid_estimate(q, centroids, counts, sums, assign, half, indices, 0.5, backend="reference")
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    auto = ops.centroid_estimate(q.to(dtype), centroids, counts, sums, assign, half, indices, 0.5)
    ref = ops.centroid_estimate(q.to(dtype), centroids, counts, sums, assign, half, indices, 0.5, backend="reference")
    torch.testing.assert_close(auto[0], ref[0], atol=0, rtol=0)
    with pytest.raises(BackendUnavailableError, match="centroid_estimate.*q must be float32"):
        ops.centroid_estimate(q.to(dtype), centroids, counts, sums, assign, half, indices, 0.5, backend="cpu")


@pytest.mark.parametrize("padded", [False, True])
def test_estimate_add_rows_cpu_equals_reference(padded):
    _seed()
    B, H, C, D, n = 2, 3, 23, 16, 9
    centroids = torch.randn(B, H, C, D)
    half = 0.5 * centroids.square().sum(-1)
    keys, values = torch.randn(B, H, n, D), torch.randn(B, H, n, D)
    valid = torch.rand(B, n) > 0.3 if padded else None
    counts, sums = torch.rand(B, H, C), torch.randn(B, H, C, D)
    states = [(counts.clone(), sums.clone()) for _ in range(2)]
    got = ops.estimate_add_rows(keys, values, valid, centroids, half, *states[0], backend="cpu")
    want = ops.estimate_add_rows(keys, values, valid, centroids, half, *states[1], backend="reference")
    assert torch.equal(got, want)  # random keys: no near-ties between centroids
    torch.testing.assert_close(states[0][0], states[1][0])
    torch.testing.assert_close(states[0][1], states[1][1], atol=1e-5, rtol=1e-5)


def test_rank_by_group_probability_cpu_equals_reference():
    _seed()
    B, H, G, D, rows = 2, 2, 4, 16, 300
    q, keys = torch.randn(B, H * G, D), torch.randn(B, H, rows, D)
    candidates = torch.randint(-1, rows, (B, H, 120))
    rest = torch.randn(B, H * G)
    got = ops.rank_by_group_probability(q, keys, candidates, rest, 0.25, 20, backend="cpu")
    want = ops.rank_by_group_probability(q, keys, candidates, rest, 0.25, 20, backend="reference")
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rank_by_group_probability_16bit_keys_rank_as_their_float32_values(dtype):
    """A 16-bit key store ranks exactly as a float32 store of the same rounded rows (the kernel
    converts each row exactly, then runs the float32 arithmetic), and as the reference does."""
    _seed()
    B, H, G, D, rows = 2, 2, 4, 16, 300
    q, keys = torch.randn(B, H * G, D), torch.randn(B, H, rows, D).to(dtype)
    candidates = torch.randint(-1, rows, (B, H, 120))
    rest = torch.randn(B, H * G)
    got = ops.rank_by_group_probability(q, keys, candidates, rest, 0.25, 20, backend="cpu")
    assert torch.equal(got, ops.rank_by_group_probability(q, keys.float(), candidates, rest, 0.25, 20, backend="cpu"))
    want = ops.rank_by_group_probability(q, keys, candidates, rest, 0.25, 20, backend="reference")
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def _cluster_heads(B, H, D, rows):
    from lckv.index import ClusterIndex

    keys = torch.randn(B, H, rows, D)
    heads = [ClusterIndex(D, cluster_size=4, segment=64).build(keys[b, h].contiguous())
             for b in range(B) for h in range(H)]
    return keys, heads


@pytest.mark.parametrize("with_estimate", [False, True])
def test_decode_cluster_step_cpu_equals_its_composition(with_estimate):
    """The one-call step against the reference: group search + sparse attention + estimate +
    resident attention, merged by LSE (same search, so the same rows)."""
    _seed()
    B, H, G, D, rows, k = 2, 2, 3, 16, 500, 40
    keys, heads = _cluster_heads(B, H, D, rows)
    values = torch.randn(B, H, rows, D)
    res_k, res_v = torch.randn(B, H, 9, D), torch.randn(B, H, 9, D)
    q = torch.randn(B, H * G, D)
    estimate = None
    if with_estimate:
        centroids, counts, sums, assign, _ = _cluster_state(B, H, 31, D, rows)
        estimate = (centroids, counts, sums, assign)
    search = {"scan": 3.0}
    out, lse, ids = ops.decode_cluster_step(heads, q, keys, values, res_k, res_v, k, 0.25, estimate, search,
                                            backend="cpu")
    r_out, r_lse, r_ids = ops.decode_cluster_step(heads, q, keys, values, res_k, res_v, k, 0.25, estimate, search,
                                                  backend="reference")
    assert torch.equal(ids.sort(-1).values, r_ids.sort(-1).values)
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, r_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_cluster_step_16bit_store_beside_float32_resident_rows(dtype):
    """A 16-bit host store under a float32 model (host_dtype): the store read in place, the resident
    rows float32; bit-equal to the step over a float32 copy of the same rounded store. Resident rows
    of a third dtype are refused by name."""
    _seed()
    B, H, G, D, rows, k = 1, 2, 4, 16, 400, 32
    keys, heads = _cluster_heads(B, H, D, rows)  # the heads index keys; the store holds them rounded
    store_k, store_v = keys.to(dtype), torch.randn(B, H, rows, D).to(dtype)
    res_k, res_v = torch.randn(B, H, 7, D), torch.randn(B, H, 7, D)
    q = torch.randn(B, H * G, D)
    centroids, counts, sums, assign, _ = _cluster_state(B, H, 17, D, rows)
    estimate = (centroids, counts, sums, assign)
    got = ops.decode_cluster_step(heads, q, store_k, store_v, res_k, res_v, k, 0.3, estimate, backend="cpu")
    want = ops.decode_cluster_step(heads, q, store_k.float(), store_v.float(), res_k, res_v, k, 0.3, estimate,
                                   backend="cpu")
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    with pytest.raises(TypeError, match="resident_k must have the dtype of offloaded_k"):
        ops.decode_cluster_step(heads, q, store_k, store_v, res_k.to(other), res_v.to(other), k, 0.3, backend="cpu")


def test_offload_rows_cpu_equals_reference():
    _seed()
    B, H, D, C, n = 1, 2, 8, 13, 6
    keys, ours = _cluster_heads(B, H, D, 200)
    _, theirs = _cluster_heads(B, H, D, 200)
    new_k, new_v = torch.randn(B, H, n, D), torch.randn(B, H, n, D)
    centroids = torch.randn(B, H, C, D)
    half = 0.5 * centroids.square().sum(-1)
    a = (torch.zeros(B, H, C), torch.zeros(B, H, C, D))
    b = (torch.zeros(B, H, C), torch.zeros(B, H, C, D))
    got = ops.offload_rows(ours, new_k, new_v, None, (centroids, half, *a), backend="cpu")
    want = ops.offload_rows(theirs, new_k, new_v, None, (centroids, half, *b), backend="reference")
    assert torch.equal(got, want)
    torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=1e-6)
    assert all(ix.size == 200 + n for ix in ours + theirs)
    assert ops.offload_rows(ours, new_k, new_v) is None and ours[0].size == 200 + 2 * n


def test_host_index_ops_refuse_other_devices_by_name():
    with pytest.raises(BackendUnavailableError, match="decode_cluster_step.*'meta'"):
        ops.decode_cluster_step([], torch.empty(1, 2, 8, device="meta"), None, None, None, None, 1, 1.0)


@pytest.mark.parametrize("heads,n,dim,clusters", [(1, 50, 8, 1), (3, 301, 59, 17), (2, 128, 64, 128)])
def test_kmeans_cpu_equals_reference(heads, n, dim, clusters):
    """The one C++ k-means against torch Lloyd from the same initial points: the same clusters
    (random points: no near-ties), centroids to float32 rounding of the means."""
    _seed()
    points = torch.randn(heads, n, dim)
    init = torch.randperm(n)[:clusters]
    got = ops.kmeans(points, init, 5, backend="cpu")
    want = ops.kmeans(points, init, 5, backend="reference")
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(ops.kmeans(points, init, 0)[0], points[:, init])  # iterations 0: the initial points


def test_estimate_from_kmeans_uses_the_op():
    """RetrievalPolicy(clusters=<int>) builds its estimate with lckv.ops.kmeans: every row is in its
    nearest centroid's cluster and the counts add up to the rows."""
    from lckv.cache import LckvCache
    from lckv.policies import RetrievalPolicy
    from lckv.reference.estimate import assign_nearest

    _seed()
    policy = RetrievalPolicy(sink=2, window=6, budget=40, index="flat", clusters=9)
    layer = LckvCache(policy, 1).layers[0]
    layer.update(torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16))
    layer.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
    est = layer.selection_state().estimate
    assert est.centroids.shape == (2, 2, 9, 16)
    assert torch.equal(est.assign, assign_nearest(layer.store.keys, est.centroids))
    torch.testing.assert_close(est.counts.sum(-1), torch.full((2, 2), float(layer.store.length)))


RETRIEVAL_BACKENDS = ["cpu", "reference"]


@pytest.mark.parametrize("backend", RETRIEVAL_BACKENDS)
def test_kmeans_bad_inputs_are_refused_on_every_backend(backend):
    """The reference path had no checks: out-of-range or repeated init positions, NaN points and
    non-tensors raised IndexError/AttributeError or were silently accepted (benchmarks/fuzz.py)."""
    points, init = torch.randn(2, 50, 8), torch.tensor([0, 7, 9])
    nan = points.clone()
    nan[1, 3, 2] = float("nan")
    cases = [((points, torch.tensor([0, 60]), 3), ValueError, "init must hold point positions in \\[0, 50\\)"),
             ((points, torch.tensor([0, 0, 3]), 3), ValueError, "init must hold distinct positions"),
             ((points, torch.tensor([0, 3]), -1), ValueError, "iterations must be >= 0"),
             ((points, init.float(), 3), TypeError, "init must"),
             ((nan, init, 3), ValueError, "points contains NaN or inf"),
             (("x", init, 3), TypeError, "points must be a torch.Tensor"),
             ((points, None, 3), TypeError, "init must be a torch.Tensor")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            ops.kmeans(*args, backend=backend)


@pytest.mark.parametrize("backend", RETRIEVAL_BACKENDS)
def test_estimate_ops_bad_inputs_are_refused_and_change_nothing(backend):
    _seed()
    B, H, C, D, rows = 1, 2, 5, 8, 30
    centroids, counts, sums, assign, values = _cluster_state(B, H, C, D, rows)
    q, indices = torch.randn(B, H * 2, D), torch.randint(-1, rows, (B, H, 6))
    base = dict(q=q, centroids=centroids, counts=counts, value_sums=sums, assign=assign, values=values, indices=indices,
                scale=0.5)
    bad_q = q.clone()
    bad_q[0, 1, 2] = float("nan")
    past = indices.clone()
    past[0, 1, 2] = rows
    cases = [(dict(indices=past), ValueError, "indices must be row ids"),
             (dict(q=bad_q), ValueError, "q contains NaN"), (dict(scale=float("nan")), ValueError, "scale must be"),
             (dict(values=values[:, :, :-1]), ValueError, "assign must have shape|values must have shape"),
             (dict(counts=counts[..., :-1]), ValueError, "counts must have shape"), (dict(q=None), TypeError, "q must be")]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            ops.centroid_estimate(**{**base, **change}, backend=backend)
    new_k, new_v = torch.randn(B, H, 4, D), torch.randn(B, H, 4, D)
    half = 0.5 * centroids.square().sum(-1)
    state = (counts.clone(), sums.clone())
    nan_k = new_k.clone()
    nan_k[0, 1, 3, 0] = float("nan")
    for args, error, message in [((nan_k, new_v, None), ValueError, "keys contains NaN"),
                                 ((new_k, new_v[:, :, :2], None), ValueError, "values must have the shape of keys"),
                                 ((new_k, new_v, torch.ones(B, 3, dtype=torch.bool)), ValueError, "valid must have")]:
        with pytest.raises(error, match=message):
            ops.estimate_add_rows(*args, centroids, half, *state, backend=backend)
        assert torch.equal(state[0], counts) and torch.equal(state[1], sums)


@pytest.mark.parametrize("backend", RETRIEVAL_BACKENDS)
def test_group_rank_bad_inputs_are_refused(backend):
    _seed()
    q, keys = torch.randn(1, 4, 8), torch.randn(1, 2, 20, 8)
    candidates = torch.randint(-1, 20, (1, 2, 9))
    bad_q = q.clone()
    bad_q[0, 0, 0] = float("nan")
    past = candidates.clone()
    past[0, 1, 4] = 20
    cases = [((q, keys, past, None, 0.3, 4), ValueError, "candidates must be row ids"),
             ((bad_q, keys, candidates, None, 0.3, 4), ValueError, "q contains NaN"),
             ((q, keys, candidates, torch.full((1, 4), float("nan")), 0.3, 4), ValueError, "rest_lse contains NaN"),
             ((q, keys, candidates, None, 0.3, 0), ValueError, "n_select must be >= 1"),
             ((q, keys[..., :7], candidates, None, 0.3, 4), ValueError, "q must have shape")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            ops.rank_by_group_probability(*args, backend=backend)


def test_retrieval_ops_take_any_last_dim_stride():
    """The C++ kernels read rows with a contiguous last dim; a view with stride 2 there raised a
    ValueError on a valid input (benchmarks/fuzz.py): the launchers copy such views."""
    _seed()
    q, keys = torch.randn(1, 4, 8), torch.randn(1, 2, 20, 8)
    wide = torch.zeros(1, 2, 20, 16)
    wide[..., ::2] = keys
    candidates = torch.randint(-1, 20, (1, 2, 9))
    got = ops.rank_by_group_probability(q, wide[..., ::2], candidates, None, 0.3, 4, backend="cpu")
    assert torch.equal(got, ops.rank_by_group_probability(q, keys, candidates, None, 0.3, 4, backend="cpu"))
    centroids, counts, sums, assign, values = _cluster_state(1, 2, 5, 8, 20)
    wide_values = torch.zeros(1, 2, 20, 16)
    wide_values[..., ::2] = values
    indices = torch.randint(-1, 20, (1, 2, 6))
    got = ops.centroid_estimate(q, centroids, counts, sums, assign, wide_values[..., ::2], indices, 0.5, backend="cpu")
    want = ops.centroid_estimate(q, centroids, counts, sums, assign, values, indices, 0.5, backend="cpu")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", RETRIEVAL_BACKENDS)
def test_offload_rows_refused_call_changes_no_index(backend):
    """The reference path added head 0's rows before head 1's NaN keys raised (benchmarks/fuzz.py)."""
    _seed()
    _, heads = _cluster_heads(1, 2, 8, 100)
    keys, values = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    keys[0, 1, 2, 4] = float("nan")
    with pytest.raises(ValueError, match="keys contains NaN"):
        ops.offload_rows(heads, keys, values, backend=backend)
    assert [ix.size for ix in heads] == [100, 100]
    with pytest.raises(ValueError, match="indexes must hold batch \\* kv_heads = 2"):
        ops.offload_rows(heads[:1], keys.nan_to_num(), values, backend=backend)
    with pytest.raises(TypeError, match="indexes must be a list"):
        ops.offload_rows("x", keys.nan_to_num(), values, backend=backend)


@pytest.mark.parametrize("backend", RETRIEVAL_BACKENDS)
def test_decode_cluster_step_bad_inputs_name_the_argument(backend):
    _seed()
    keys, heads = _cluster_heads(1, 2, 8, 60)
    values, res = torch.randn(1, 2, 60, 8), torch.randn(1, 2, 4, 8)
    q = torch.randn(1, 4, 8)
    base = dict(indexes=heads, q=q, keys=keys, values=values, resident_k=res, resident_v=res, n_select=8, scale=0.3)
    cases = [(dict(resident_v=res[:, :, :3]), ValueError, "resident_v must have the shape of resident_k"),
             (dict(scale="x"), TypeError, "scale must be"), (dict(n_select=None), TypeError, "n_select must be an int"),
             (dict(search="scan"), TypeError, "search must be a dict"),
             (dict(search={"bogus": 1}), TypeError, "search got unknown settings \\['bogus'\\]"),
             (dict(indexes=heads[:1]), ValueError, "indexes must hold batch \\* kv_heads = 2"),
             (dict(values=values[:, :, :-1]), ValueError, "values must have the shape of keys")]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            ops.decode_cluster_step(**{**base, **change}, backend=backend)


@pytest.mark.parametrize("n_select", [10**5, 2**63])
def test_group_rank_huge_n_select(n_select):
    """n_select past int64 raised pybind's "incompatible function arguments" (benchmarks/fuzz.py);
    any n_select above the candidates selects them all, on both backends."""
    _seed()
    q, keys = torch.randn(1, 4, 8), torch.randn(1, 2, 20, 8)
    candidates = torch.randint(0, 20, (1, 2, 9))
    got = ops.rank_by_group_probability(q, keys, candidates, None, 0.3, n_select, backend="cpu")
    want = ops.rank_by_group_probability(q, keys, candidates, None, 0.3, n_select, backend="reference")
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_fuzz_found_empty_stores_and_nan_centroids():
    """Cases benchmarks/fuzz.py found: the reference ops crashed gathering from a store of 0 rows
    (every index -1: nothing attended, nothing retrieved), and a NaN centroid silently dropped the
    estimate; now the documented empty result and a ValueError naming centroids."""
    _seed()
    q = torch.randn(1, 2, 8)
    empty = torch.zeros(1, 1, 0, 8)
    out, lse = ops.sparse_attention_with_lse(q, empty, empty, torch.full((1, 1, 3), -1), backend="reference")
    assert torch.equal(out, torch.zeros_like(q)) and bool((lse == float("-inf")).all())
    centroids, counts, sums, assign, values = _cluster_state(1, 1, 5, 8, 30)
    got = ops.centroid_estimate(q, centroids, counts, sums, assign[:, :, :0], values[:, :, :0],
                                torch.full((1, 1, 4), -1), 0.5, backend="reference")
    want = ops.centroid_estimate(q, centroids, counts, sums, assign, values, torch.full((1, 1, 4), -1), 0.5,
                                 backend="reference")
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)  # nothing retrieved either way
    centroids[0, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="centroids contains NaN"):
        ops.centroid_estimate(q, centroids, counts, sums, assign, values, torch.full((1, 1, 4), -1), 0.5)
