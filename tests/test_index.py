"""lckv.index: exact search against torch, approximate recall against exact, incremental adds,
concurrent search while adding, the k > size rule, and input errors."""
import os
import threading

import pytest
import torch

from lckv.index import (ClusterIndex, DimensionMismatchError, EmptyIndexError, FaissIndex, FlatIndex,
                        GraphIndex, IVFIndex, LayerIndex, search_heads)
from lckv.research.eval_data import exact_topk, real_sets, recall_at, shifted_data, synthetic_set

pytest.importorskip("lckv._C")


def fresh_seed():
    return int.from_bytes(os.urandom(4), "little")


def all_indexes(dim):
    return [FlatIndex(dim), IVFIndex(dim), GraphIndex(dim), ClusterIndex(dim, cluster_size=4), FaissIndex(dim, "flat"),
            FaissIndex(dim, "hnsw"), FaissIndex(dim, "ivf")]


@pytest.mark.parametrize("dim", [8, 59, 128])
@pytest.mark.parametrize("n,k", [(1, 1), (777, 10), (4099, 100)])
def test_flat_equals_torch_topk(dim, n, k):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    keys, queries = torch.randn(n, dim, generator=g), torch.randn(3, dim, generator=g)
    scores, ids, n_scored = FlatIndex(dim).build(keys).search(queries, k)
    ref_scores, ref_ids = exact_topk(keys, queries, k)
    kk = min(k, n)
    tol = 1e-5 * dim ** 0.5 * float(ref_scores.abs().max())
    torch.testing.assert_close(scores[:, :kk], ref_scores, atol=tol, rtol=1e-5, msg=f"seed {seed}")
    # Same ids, except among scores tied within fp32 summation-order noise.
    differ = ids[:, :kk] != ref_ids
    assert bool((ref_scores[differ] - scores[:, :kk][differ]).abs().le(tol).all()), f"seed {seed}"
    assert bool((n_scored == n).all())


@pytest.mark.parametrize("n", [0, 1, 63, 64, 500, 1066, 3000])
@pytest.mark.parametrize("count", [0, 1, 48, 100, 5000])
def test_select_top_equals_a_stable_sort(n, count):
    """The graph search's top-k selection (select_top.h) against torch's stable descending sort, on
    fresh scores with many ties (rounded) and a wide range (a few large outliers)."""
    from lckv._extension import compiled

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(n, generator=g) * 4).round() / 4
    scores[: n // 50] *= 100  # outliers stretch the buckets
    want = torch.sort(scores, descending=True, stable=True).indices[:count]
    select = compiled("_select_top")._select_top
    assert torch.equal(select(scores, count), want), f"seed {seed}"
    if n > 0:  # with bounds given (exact ones, and loose ones) instead of computed
        lo, hi = float(scores.min()), float(scores.max())
        assert torch.equal(select(scores, count, lo, hi), want), f"seed {seed}"
        assert torch.equal(select(scores, count, lo - 50.0, hi + 3.0), want), f"seed {seed}"


@pytest.mark.parametrize("make", [lambda d: FlatIndex(d), lambda d: IVFIndex(d), lambda d: GraphIndex(d),
                                  lambda d: ClusterIndex(d, cluster_size=1), lambda d: FaissIndex(d, "flat"),
                                  lambda d: FaissIndex(d, "hnsw"), lambda d: FaissIndex(d, "ivf")],
                         ids=["flat", "ivf", "graph", "cluster", "faiss-flat", "faiss-hnsw", "faiss-ivf"])
def test_k_larger_than_index_pads_with_minus_one(make):
    dim, n, k = 16, 5, 12
    keys, queries = torch.randn(n, dim), torch.randn(4, dim)
    index = make(dim).build(keys, torch.randn(20, dim))
    scores, ids, _ = index.search(queries, k)
    assert scores.shape == ids.shape == (4, k)
    valid = ids >= 0
    assert bool((valid.sum(1) <= n).all())
    assert bool((ids[~valid] == -1).all()) and bool((scores[~valid] == float("-inf")).all())
    assert bool((ids < n).all())
    # Results come first, sorted descending.
    for row_ids, row_scores in zip(ids, scores):
        count = int((row_ids >= 0).sum())
        assert bool((row_ids[:count] >= 0).all())
        assert bool((row_scores[:count][:-1] >= row_scores[:count][1:]).all())
    if isinstance(index, FlatIndex) or getattr(index, "kind", "") == "flat":
        assert bool((valid.sum(1) == n).all())


def test_graph_and_ivf_recall_on_synthetic_set():
    seed = fresh_seed()
    es = synthetic_set(n_keys=8192, n_build=4096, n_decode=128, seed=seed)
    _, truth = exact_topk(es.keys, es.decode_queries, 100)
    graph = GraphIndex(128).build(es.keys, es.build_queries)
    # ef 150: at ef 100 recall@100 over 61 generator seeds ranged 0.842-0.945 (below the bound on
    # 1-2 in 40: a flaky test), at ef 150 0.877-0.95, scoring at most 10% of the keys.
    _, ids, n_scored = graph.search(es.decode_queries, 100, ef=150)
    r100 = recall_at(ids, truth, 100)
    assert r100 >= 0.85, f"graph recall@100 {r100:.3f} (seed {seed})"
    assert recall_at(ids, truth, 10) >= 0.9, f"seed {seed}"
    assert float(n_scored.double().mean()) < 0.25 * es.keys.shape[0]
    ivf = IVFIndex(128).build(es.keys)
    _, ids, _ = ivf.search(es.decode_queries, 100, nprobe=ivf._core.n_lists // 4)
    assert recall_at(ids, truth, 10) >= 0.8, f"ivf (seed {seed})"


def test_graph_upper_level_navigates_where_entries_alone_do_not():
    """The upper level (step 7 of graph_index.h): on the synthetic set, whose decode queries want
    regions no build query's list links to the entry points, a walk over the upper keys finds
    them; with the same entries and beam but no upper level, many queries stay in the wrong regions."""
    seed = fresh_seed()
    # decode queries continue the sequence, whose topic segments average 256 positions: 128 of them
    # sample one or two topics, and a set's recall then hangs on one region (0.92-0.998 across
    # seeds); 1024 sample several (0.955-0.993 over 29 seeds)
    es = synthetic_set(n_keys=32768, n_build=16384, n_decode=1024, seed=seed)
    _, truth = exact_topk(es.keys, es.decode_queries, 10)
    with_upper = GraphIndex(128, upper_size=512).build(es.keys, es.build_queries)
    upper = with_upper._core.upper_keys
    entries = with_upper._core.entry_points
    assert len(upper) <= 512 and len(set(upper)) == len(upper)
    assert all(0 <= u < es.keys.shape[0] for u in upper)
    assert set(entries) <= set(upper)  # the walk starts from the entries
    _, ids, n_scored = with_upper.search(es.decode_queries, 10, ef=32)
    assert bool((n_scored > len(entries)).all())
    flat = GraphIndex(128, upper_size=0).build(es.keys, es.build_queries)
    assert flat._core.upper_keys == []
    _, ids_flat, _ = flat.search(es.decode_queries, 10, ef=32)
    # upper_ef at search time: a wider walk scores more upper keys; without an upper level it is ignored.
    _, _, n_wide = with_upper.search(es.decode_queries, 10, ef=32, upper_ef=256)
    assert float(n_wide.double().mean()) > float(n_scored.double().mean())
    assert torch.equal(flat.search(es.decode_queries, 10, ef=32, upper_ef=256)[1], ids_flat)
    with pytest.raises(ValueError, match="upper_ef"):
        with_upper.search(es.decode_queries, 10, upper_ef=-1)
    r_upper, r_flat = recall_at(ids, truth, 10), recall_at(ids_flat, truth, 10)
    assert r_upper >= 0.92, f"recall@10 {r_upper:.3f} with the upper level (seed {seed})"
    assert r_upper >= r_flat + 0.03, f"upper {r_upper:.3f} vs none {r_flat:.3f} (seed {seed})"


def test_graph_recall_on_shifted_clusters():
    seed = fresh_seed()
    keys, build_q, decode_q = shifted_data(20000, 2000, 200, 32, seed)
    _, truth = exact_topk(keys, decode_q, 10)
    _, ids, _ = GraphIndex(32).build(keys, build_q).search(decode_q, 10, ef=64)
    assert recall_at(ids, truth, 10) >= 0.95, f"seed {seed}"


@pytest.mark.data
def test_graph_and_ivf_recall_on_real_stories260k(stories260k_files, hotpotqa_file, tmp_path):
    (es,) = real_sets(4096, heads=[(2, 1)], n_decode_positions=64, cache_dir=None)
    _, truth = exact_topk(es.keys, es.decode_queries, 100)
    _, ids, _ = GraphIndex(8).build(es.keys, es.build_queries).search(es.decode_queries, 100, ef=100)
    assert recall_at(ids, truth, 100) >= 0.95
    ivf = IVFIndex(8).build(es.keys)
    _, ids, _ = ivf.search(es.decode_queries, 100, nprobe=ivf._core.n_lists // 4)
    assert recall_at(ids, truth, 10) >= 0.9


@pytest.mark.parametrize("upper_size", [0, 512])
def test_keys_added_after_build_are_found(upper_size):
    seed = fresh_seed()
    keys, build_q, decode_q = shifted_data(12000, 1500, 100, 16, seed)
    index = GraphIndex(16, upper_size=upper_size).build(keys[:8000], build_q)
    assert (len(index._core.upper_keys) > 0) == (upper_size > 0)
    for lo in range(8000, 12000, 500):
        index.add(keys[lo:lo + 500])
    assert index.size == 12000
    _, truth = exact_topk(keys, decode_q, 10)
    _, ids, _ = index.search(decode_q, 10, ef=64)
    assert recall_at(ids, truth, 10) >= 0.9, f"seed {seed}"
    late = truth >= 8000
    found_late = (ids.unsqueeze(2) == truth.unsqueeze(1)).any(1)[late]
    assert late.any() and float(found_late.float().mean()) >= 0.85, f"seed {seed}"
    # A key that beats everything for these queries becomes their top-1.
    strong = torch.zeros(1, 16)
    strong[0, 0] = 1000.0
    index.add(strong)
    _, ids, _ = index.search(decode_q[decode_q[:, 0] > 1.0].contiguous(), 1)
    assert bool((ids[:, 0] == 12000).all()), f"seed {seed}"
    flat = FlatIndex(16).build(keys[:10])
    flat.add(keys[10:20])
    assert flat.size == 20


@pytest.mark.parametrize("chunk", [300, 512])  # spills that split a segment; spills that fill one
def test_streamed_keys_search_like_one_build(chunk):
    """Keys streamed in after the build (a retrieval prefill's spills) against one build over the
    same keys: flat gives the same ids and scores; IVF probing every list and the cluster index
    scanning every key give the exact top-k; the cluster index at its default scan keeps the
    recall of the one-shot build (its clusters differ: old segments are never re-clustered)."""
    seed = fresh_seed()
    keys, _, queries = shifted_data(6000, 0, 64, 32, seed)
    _, truth = exact_topk(keys, queries, 100)
    built = {"flat": FlatIndex(32).build(keys[:1024]), "ivf": IVFIndex(32).build(keys[:1024]),
             "cluster": ClusterIndex(32, segment=512).build(keys[:1024])}
    for lo in range(1024, 6000, chunk):
        for index in built.values():
            index.add(keys[lo:lo + chunk])
    once = {"flat": FlatIndex(32).build(keys), "cluster": ClusterIndex(32, segment=512).build(keys)}
    scores, ids, _ = built["flat"].search(queries, 100)
    want_scores, want_ids, _ = once["flat"].search(queries, 100)
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores), f"seed {seed}"
    _, ids, _ = built["ivf"].search(queries, 100, nprobe=built["ivf"]._core.n_lists)
    assert recall_at(ids, truth, 100) == 1.0, f"seed {seed}"
    _, ids, _ = built["cluster"].search(queries, 100, scan=60.0)  # scan * k >= size: exact
    assert recall_at(ids, truth, 100) == 1.0, f"seed {seed}"
    streamed = recall_at(built["cluster"].search(queries, 100)[1], truth, 100)
    one_build = recall_at(once["cluster"].search(queries, 100)[1], truth, 100)
    assert streamed >= one_build - 0.05, f"seed {seed}: streamed {streamed:.3f} vs one build {one_build:.3f}"


@pytest.mark.parametrize("make", [lambda d: GraphIndex(d), lambda d: GraphIndex(d, upper_size=256),
                                  lambda d: IVFIndex(d), lambda d: FlatIndex(d),
                                  lambda d: ClusterIndex(d, segment=512)],
                         ids=["graph", "graph-upper", "ivf", "flat", "cluster"])
def test_concurrent_search_while_adding(make):
    keys, build_q, decode_q = shifted_data(6000, 500, 64, 16, fresh_seed())
    index = make(16).build(keys[:3000], build_q)
    errors, stop = [], threading.Event()

    def reader():
        try:
            while not stop.is_set():
                _, ids, _ = index.search(decode_q, 20)
                if bool((ids < -1).any()) or bool((ids >= index.size).any()):
                    errors.append("invalid id")
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for lo in range(3000, 6000, 100):
        index.add(keys[lo:lo + 100])
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert index.size == 6000


def test_graph_without_build_queries():
    keys, _, decode_q = shifted_data(3000, 0, 50, 16, fresh_seed())
    _, truth = exact_topk(keys, decode_q, 10)
    _, ids, _ = GraphIndex(16).build(keys).search(decode_q, 10, ef=128)
    assert recall_at(ids, truth, 10) >= 0.8


def test_layer_index_matches_per_head_search():
    heads, dim = 3, 16
    keys, queries, decode = torch.randn(heads, 2000, dim), torch.randn(heads, 400, dim) + 1, torch.randn(heads, 7, dim) + 1
    for make in (lambda d: GraphIndex(d), lambda d: FlatIndex(d), lambda d: FaissIndex(d, "hnsw")):
        layer = LayerIndex(heads, dim, make).build(keys, queries)
        scores, ids, n_scored = layer.search(decode, 5)
        assert ids.shape == (heads, 7, 5) and n_scored.shape == (heads, 7)
        for h in range(heads):
            s, i, _ = layer.heads[h].search(decode[h].contiguous(), 5)
            assert torch.equal(i, ids[h])
            torch.testing.assert_close(s, scores[h])
    with pytest.raises(ValueError, match="3 heads"):
        layer.search(decode[:2], 5)


@pytest.mark.parametrize("n_new", [1, 300])
def test_layer_index_add_matches_per_head_add(n_new):
    """LayerIndex.add (one C++ call for native heads) leaves every head as its own add() would."""
    heads, dim = 3, 16
    keys, queries = torch.randn(heads, 2000, dim), torch.randn(heads, 400, dim) + 1
    new, decode = torch.randn(heads, n_new, dim), torch.randn(heads, 7, dim) + 1
    for make in (lambda d: GraphIndex(d), lambda d: ClusterIndex(d, segment=256), lambda d: FaissIndex(d, "flat")):
        layer = LayerIndex(heads, dim, make).build(keys, queries)
        alone = [make(dim).build(keys[h], queries[h]) for h in range(heads)]
        layer.add(new)
        for h in range(heads):
            alone[h].add(new[h].contiguous())
            assert layer.heads[h].size == alone[h].size == 2000 + n_new
            s, i, _ = alone[h].search(decode[h].contiguous(), 20)
            s2, i2, _ = layer.heads[h].search(decode[h].contiguous(), 20)
            assert torch.equal(i, i2)
            torch.testing.assert_close(s, s2)
    with pytest.raises(ValueError, match="kv_heads=3"):
        layer.add(new[:2])
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.add(torch.full((heads, 1, dim), float("inf")))


def test_faiss_flat_is_exact_and_counts_scored():
    keys, queries = torch.randn(1000, 24), torch.randn(6, 24)
    ref_s, ref_i = exact_topk(keys, queries, 10)
    scores, ids, n_scored = FaissIndex(24, "flat").build(keys).search(queries, 10)
    torch.testing.assert_close(scores, ref_s, atol=1e-4, rtol=1e-5)
    assert bool((n_scored == 1000).all())
    _, _, n_hnsw = FaissIndex(24, "hnsw").build(keys).search(queries, 10, ef=32)
    assert 0 < int(n_hnsw[0]) <= 1000


@pytest.mark.parametrize("index", all_indexes(8), ids=lambda ix: type(ix).__name__ + getattr(ix, "kind", ""))
def test_bad_input_errors(index):
    keys = torch.randn(50, 8)
    with pytest.raises(EmptyIndexError, match="empty"):
        index.search(torch.randn(2, 8), 3)
    with pytest.raises(DimensionMismatchError, match="keys must have head_dim 8"):
        index.build(torch.randn(50, 7))
    with pytest.raises(TypeError, match="keys must be float32"):
        index.build(keys.double())
    with pytest.raises(ValueError, match="keys must be on the CPU"):
        index.build(torch.empty(50, 8, device="meta"))
    with pytest.raises(ValueError, match="keys contains NaN or inf"):
        index.build(torch.cat([keys, torch.full((1, 8), float("nan"))]))
    with pytest.raises(ValueError, match="keys must be contiguous"):
        index.build(torch.randn(8, 50).T)
    with pytest.raises(ValueError, match=r"keys must have shape \[n, head_dim\]"):
        index.build(torch.randn(50))
    with pytest.raises(TypeError, match="keys must be a torch.Tensor"):
        index.build(keys.numpy())
    index.build(keys, torch.randn(30, 8))
    q = torch.randn(3, 8)
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(q, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        index.search(q, 2.0)
    with pytest.raises(DimensionMismatchError, match="queries must have head_dim 8"):
        index.search(torch.randn(3, 9), 2)
    with pytest.raises(ValueError, match="queries contains NaN or inf"):
        index.search(torch.tensor([[float("inf")] * 8]), 2)
    with pytest.raises(ValueError, match="queries must be contiguous"):
        index.search(torch.randn(8, 3).T, 2)
    with pytest.raises(TypeError, match="queries must be float32"):
        index.search(q.half(), 2)
    with pytest.raises(TypeError, match="unknown parameters"):
        index.search(q, 2, beam=3)
    with pytest.raises(ValueError, match="build\\(\\) needs an empty index"):
        index.build(keys)
    with pytest.raises(DimensionMismatchError):
        index.add(torch.randn(4, 3))


def test_compiled_glue_checks_its_inputs():
    from lckv import _C

    core = _C.GraphIndex(8)
    with pytest.raises(ValueError, match="empty index"):
        core.search(torch.randn(2, 8), 3)
    core.build(torch.randn(100, 8), torch.randn(10, 8))
    with pytest.raises(ValueError, match="k must be positive"):
        core.search(torch.randn(2, 8), -1)
    with pytest.raises(ValueError, match="ef must be positive"):
        core.search(torch.randn(2, 8), 2, ef=0)
    with pytest.raises(TypeError, match="queries must be float32"):
        core.search(torch.randn(2, 8, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="contiguous"):
        core.search(torch.randn(8, 2).T, 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        core.add(torch.full((1, 8), float("nan")))
    with pytest.raises(ValueError, match="head_dim 8"):
        _C.search_heads([core], torch.randn(1, 2, 4), 2)
    with pytest.raises(ValueError, match="max_degree"):
        _C.GraphIndex(8, max_degree=1)
    for bad in (dict(upper_size=-1), dict(upper_degree=1), dict(upper_ef=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _C.GraphIndex(8, **bad)


def test_defaults_come_from_the_cpp_params():
    """Build settings and search parameters are the C++ params structs' (lckv._C.index_defaults);
    the classes' dicts keep their keys and values, and constructors start from them."""
    from lckv import _C

    expected_search = {FlatIndex: {}, IVFIndex: {"nprobe": 8}, GraphIndex: {"ef": 64, "upper_ef": 0},
                       ClusterIndex: {"scan": 2.0, "expand": 0.1, "probe_supers": 0}}
    for cls, kind in ((FlatIndex, "flat"), (IVFIndex, "ivf"), (GraphIndex, "graph"), (ClusterIndex, "cluster")):
        assert cls.search_params == _C.index_defaults(kind)["search"] == expected_search[cls]
        assert cls.build_defaults == _C.index_defaults(kind)["build"]
    assert ClusterIndex.build_defaults["cluster_size"] == 16
    assert ClusterIndex(8).config == ClusterIndex.build_defaults
    assert ClusterIndex(8, segment=512).config == {**ClusterIndex.build_defaults, "segment": 512}
    assert IVFIndex(8).config == IVFIndex.build_defaults
    graph = GraphIndex(128).config
    assert {key: graph[key] for key in GraphIndex.build_defaults if key != "n_entry"} == {
        key: value for key, value in GraphIndex.build_defaults.items() if key != "n_entry"}
    assert graph["n_entry"] is None and GraphIndex(8).config["max_degree"] == 48
    params = ClusterIndex.search_params
    params["scan"] = 99.0  # a copy: the class's defaults stay
    assert ClusterIndex.search_params["scan"] == 2.0 and ClusterIndex(8).search_params == ClusterIndex.search_params
    with pytest.raises(ValueError, match="kind must be"):
        _C.index_defaults("hnsw")


def test_native_handle_is_the_cpp_index():
    from lckv import _C

    index = ClusterIndex(8)
    with pytest.raises(EmptyIndexError, match="build\\(\\) or add\\(\\) keys first"):
        index.native_handle()
    index.build(torch.randn(300, 8))
    handle = index.native_handle()
    assert isinstance(handle, _C.ClusterIndex) and handle.size == 300
    probs, ids, _ = _C.search_groups([handle], torch.randn(1, 2, 8), 5, scale=0.5)
    assert ids.shape == (1, 5)


def test_search_heads_rejects_mixed_and_empty():
    a, b = FlatIndex(8).build(torch.randn(10, 8)), GraphIndex(8)
    with pytest.raises(TypeError, match="one class"):
        search_heads([a, FaissIndex(8, "flat").build(torch.randn(10, 8))], torch.randn(2, 1, 8), 1)
    with pytest.raises(EmptyIndexError, match=r"indexes\[1\]"):
        search_heads([a, FlatIndex(8)], torch.randn(2, 1, 8), 1)
    del b


def test_synthetic_set_is_labelled_and_queries_differ_from_keys():
    es = synthetic_set(n_keys=4096, n_build=512, n_decode=32, seed=fresh_seed())
    assert es.synthetic and "synthetic" in es.label
    assert es.keys.shape == (4096, 128) and es.decode_queries.shape == (32, 128)
    # Different distributions: the queries' mean is far from the keys' mean.
    gap = (es.build_queries.mean(0) - es.keys.mean(0)).norm()
    assert gap > 0.5 * es.keys.std(0).norm()


@pytest.mark.parametrize("index", all_indexes(8), ids=lambda ix: type(ix).__name__ + getattr(ix, "kind", ""))
def test_fuzz_found_inputs_are_refused_by_name(index):
    """Cases benchmarks/fuzz.py found: an empty add of a bad tensor, a None or bool search
    parameter, a k past MAX_K and a negative faiss ef were accepted or crashed deep inside; each
    is now refused naming the argument, and the index is unchanged."""
    from lckv.index.base import MAX_K

    index.build(torch.zeros(0, 8))  # an empty build is legal (faiss IVF trains on the first keys)
    assert index.size == 0
    with pytest.raises(TypeError, match="keys must be float32"):
        index.add(torch.zeros(0, 8, dtype=torch.float64))
    index.add(torch.randn(40, 8))
    q = torch.randn(2, 8)
    with pytest.raises(ValueError, match=f"k must be at most {MAX_K}"):
        index.search(q, MAX_K + 1)
    for name in index.search_params:
        for bad in (None, True, "2"):
            with pytest.raises(TypeError, match=f"parameter {name} must be"):
                index.search(q, 3, **{name: bad})
    if isinstance(index, FaissIndex) and index.kind != "flat":
        name = "ef" if index.kind == "hnsw" else "nprobe"
        with pytest.raises(ValueError, match=f"{name} must be >= 1"):
            index.search(q, 40, **{name: -1})
    assert index.size == 40 and index.search(q, 3)[1].shape == (2, 3)


def test_native_settings_are_checked_at_construction():
    with pytest.raises(ValueError, match="max_degree"):
        GraphIndex(8, max_degree=0)
    with pytest.raises(ValueError, match="n_iters"):
        IVFIndex(8, n_iters=-1)
