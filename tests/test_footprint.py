"""lckv.footprint: the formula equals the cache's own accounting, component by component, for every
policy; the ClusterIndex model matches the index; the per-token rates are the formula's slopes;
and a long generation's RSS growth and high-water mark stay within 10% of the formula."""
import sys
from pathlib import Path

import pytest
import torch

import lckv
from lckv.footprint import COMPONENTS, ModelShape, cache_bytes, per_token_bytes, predicted_bytes

ROOT = Path(__file__).resolve().parent.parent
STORIES = ModelShape(layers=5, kv_heads=4, q_heads=8, head_dim=8)
SMOLLM2 = ModelShape(layers=30, kv_heads=3, q_heads=9, head_dim=64)
# a ClusterIndex pads each cluster to whole blocks of 8 rows; the formula takes 3.5 rows per
# cluster, the mean when sizes spread evenly mod 8 (real stories260K keys: 0.2% off; Gaussian
# keys at head_dim 64: 3% off)
INDEX_RTOL = 0.05
RSS_RTOL = 0.10


def _generate(model, policy, batch, prompt, chunk, steps):
    """Feeds fresh random tokens: ``prompt`` in chunks of ``chunk``, then ``steps`` one by one."""
    binding = lckv.enable(model, policy)
    cache = lckv.new_cache(model)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt + steps))
    with torch.no_grad():
        for lo in range(0, prompt, chunk):
            model(ids[:, lo:min(prompt, lo + chunk)], past_key_values=cache, use_cache=True, logits_to_keep=1)
        for t in range(prompt, prompt + steps):
            model(ids[:, t:t + 1], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return binding.policy, cache


@pytest.fixture(scope="module")
def stories(stories260k_files):
    from lckv.research.llama2c import load_model

    model = load_model(stories260k_files[0], max_position_embeddings=2048)
    yield model
    lckv.disable(model)


@pytest.mark.data
@pytest.mark.parametrize("name,settings,batch", [
    ("full", {"window": 100}, 1),
    ("streaming", {"sink": 2, "window": 50}, 1),
    ("snapkv", {"observation": 17}, 1),
    ("quest", {"page_size": 7, "host_dtype": "bfloat16"}, 3),
    ("block", {"block_size": 19, "representatives": 3}, 1),
    ("retrieval", {}, 1),
    ("retrieval", {"prefill": "retrieval", "prefill_select": 300, "budget": 200}, 1),
    ("retrieval", {"index": "flat", "clusters": 48, "host_dtype": "float16"}, 3),
    ("retrolm", {"page_size": 32}, 1),
])
def test_accounting_equals_formula(stories, name, settings, batch):
    """A prompt in chunks of odd size, then decoding: every component's written and allocated bytes
    (store capacity by the doubling rule, recorded queries by the stride rule, selection state,
    log) are what the formula says, exactly; the ClusterIndex within its padding estimate."""
    prompt, chunk, steps = 1400, 457, 19
    policy, cache = _generate(stories, lckv.get_policy(name, **settings), batch, prompt, chunk, steps)
    measured = cache_bytes(cache)
    formula = predicted_bytes(stories.config, policy, prompt + steps, batch, prompt=prompt, chunk=chunk)
    assert (measured["store_rows"], measured["store_capacity"]) == (formula["store_rows"], formula["store_capacity"])
    for key in [c + s for c in COMPONENTS for s in ("", "_allocated")]:
        tolerance = INDEX_RTOL * measured[key] if key.startswith("index") else 0
        assert abs(formula[key] - measured[key]) <= tolerance, (key, formula[key], measured[key])
    if name in ("snapkv", "quest", "block", "retrieval", "retrolm"):
        assert measured["host_kv"] and (measured["index"] or measured["selection"] or measured["estimate"])


@pytest.mark.parametrize("dim,build,adds", [
    (8, 70_000, [1000] * 5 + [1] * 300),  # super-clusters (4,375 clusters >= one span of 4,096)
    (64, 9_000, [3000] * 6 + [1] * 50),   # segments completed by adds
    (59, 100, [8192, 37]),                 # a build too small to cluster, then one segment
])
def test_cluster_index_model_matches_the_index(dim, build, adds):
    """_ClusterIndexModel follows ClusterIndex's arrays through build and adds: the same cluster,
    clustered and super-cluster counts, written bytes and memory_bytes() within the padding estimate."""
    from lckv.footprint import _ClusterIndexModel, _cluster_index_written
    from lckv.index import ClusterIndex

    keys = torch.randn(build + sum(adds), dim)
    index = ClusterIndex(dim).build(keys[:build].contiguous())
    settings = {k: v for k, v in ClusterIndex.build_defaults.items() if k != "n_iters"}
    model = _ClusterIndexModel(dim, **settings).build(build)
    at = build
    for n in adds:
        index.add(keys[at:at + n].contiguous())
        model.add(n)
        at += n
    assert (index.n_clusters, index.n_clustered, index.n_supers) == (model.clusters, model.clustered, model.supers)
    assert model.written() == pytest.approx(_cluster_index_written(index), rel=INDEX_RTOL)
    assert model.allocated() == pytest.approx(index.memory_bytes(), rel=INDEX_RTOL)


@pytest.mark.parametrize("shape", [STORIES, SMOLLM2], ids=["stories260K", "smollm2"])
@pytest.mark.parametrize("name,settings", [
    ("full", {}), ("streaming", {}), ("snapkv", {}), ("quest", {"page_size": 8}), ("block", {}),
    ("retrieval", {}), ("retrieval", {"index": "flat", "host_dtype": "bfloat16"}), ("retrolm", {}),
])
def test_per_token_bytes_are_the_slopes(shape, name, settings):
    """The documented per-token rates are the formula's growth over 2 * 8192 tokens (two whole
    ClusterIndex segments, so the index's tail is back where it was; no super-clusters yet): of
    the prompt (in chunks; the state built over it after one decode step), and of decoding."""
    policy = lckv.get_policy(name, **settings)
    n = 2 * 8192
    prompt_before = predicted_bytes(shape, policy, 20_481, prompt=20_480, chunk=1024)
    prompt_after = predicted_bytes(shape, policy, 20_481 + n, prompt=20_480 + n, chunk=1024)
    decode_after = predicted_bytes(shape, policy, 20_481 + n, prompt=20_480, chunk=1024)
    for after, decoded in ((prompt_after, False), (decode_after, True)):
        rates = per_token_bytes(shape, policy, decoded=decoded)
        for component in COMPONENTS:
            if component != "queries":  # a uniform sample of the prompt: between m and 2m queries
                slope = (after[component] - prompt_before[component]) / n
                assert slope == pytest.approx(rates[component], rel=2e-3, abs=0.01), (component, decoded)
    if name == "retrieval":  # cluster and flat indexes are built from the keys alone: no query kept
        assert prompt_before["queries"] == prompt_after["queries"] == 0


def test_recorder_keeps_exactly_the_recent_rows():
    """QueryRecorder's recent queries are the last ``recent_capacity`` rows of all calls so far, in
    a storage of exactly those rows (a view would keep a whole long call's queries alive)."""
    from lckv.cache import QueryRecorder

    recorder, seen = QueryRecorder(0, 17), []
    for n in (500, 3, 1, 40, 1):
        q = torch.randn(2, 3, n, 8)
        recorder.add(q)
        seen.append(q)
        expected = torch.cat(seen, dim=2)[:, :, -17:]
        assert torch.equal(recorder.recent, expected)
        assert recorder.recent.untyped_storage().nbytes() == expected.numel() * 4
    assert recorder.sample is None


@pytest.mark.parametrize("index,records", [("cluster", False), ("flat", False), ("exact", False), ("graph", True)])
def test_retrieval_records_prefill_queries_only_for_query_aware_indexes(index, records):
    """Only a query-aware index (graph) is built with prefill queries, so only then does the cache
    record them; the others keep none (their index is the same without them)."""
    from tiny_models import tiny_decoder

    torch.manual_seed(0)
    model = tiny_decoder("llama", kv_heads=2, max_positions=512)
    policy = lckv.get_policy("retrieval", index=index, sink=4, window=32, budget=48)
    binding = lckv.enable(model, policy)
    try:
        cache = lckv.new_cache(model)
        ids = torch.randint(3, 97, (1, 300))
        with torch.no_grad():
            model(ids[:, :299], past_key_values=cache, use_cache=True)
            model(ids[:, 299:], past_key_values=cache, use_cache=True)
        for layer in cache.layers:
            assert (layer.queries is not None and layer.queries.sample is not None) == records
            assert layer.selection is not None
    finally:
        lckv.disable(model)
    assert binding.policy.recorded_queries() == ((policy.build_queries, 0) if records else None)


def test_predicted_bytes_rejects_what_it_does_not_model():
    with pytest.raises(ValueError, match="prompt"):
        predicted_bytes(STORIES, "full", 100, prompt=200)
    with pytest.raises(NotImplementedError, match="graph"):
        predicted_bytes(STORIES, lckv.get_policy("retrieval", index="graph"), 3000, prompt=2000)


def _measure_rss(case: dict, timeout: float) -> dict:
    """benchmarks/bench_memory.py's measurement of one case in a fresh process, with glibc's mmap
    threshold held at its default 128 KiB (MALLOC_MMAP_THRESHOLD_ turns off the dynamic raise that
    keeps freed buffers of up to 32 MiB in the heap: with it, RSS tracks the live bytes)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_memory import measure_in_subprocess

    return measure_in_subprocess(dict(case, allocator="fixed"), timeout=timeout)


def _check_rss(result: dict) -> None:
    formula, mib = result["formula"], 1 << 20
    report = (f"RSS growth {result['rss'] / mib:.1f} MiB vs formula {formula['total'] / mib:.1f}; decode high-water "
              f"{result['hwm'] / mib:.1f} MiB vs formula peak {formula['peak_decode'] / mib:.1f}; left after freeing "
              f"the cache {result['residual'] / mib:.1f} MiB")
    assert result["acct"]["total"] == pytest.approx(formula["total"], rel=0.01), report
    assert result["rss"] == pytest.approx(formula["total"], rel=RSS_RTOL), report
    assert result["hwm"] == pytest.approx(formula["peak_decode"], rel=RSS_RTOL), report


@pytest.mark.data
@pytest.mark.usefixtures("stories260k_files")
def test_rss_of_a_long_generation_matches_the_formula():
    """stories260K, retrieval at its defaults: a 24,072-token prompt in 1,536-token chunks, then 48
    decoded tokens; the stores double at the 36th (so the decode high-water mark holds the old
    buffers beside the new ones until that call commits: 30 MiB over the 65 MiB the cache holds)."""
    result = _measure_rss({"model": "stories260K", "policy": "retrieval", "prompt": 24_072, "steps": 48,
                           "chunk": 1536}, timeout=600)
    assert result["formula"]["peak_decode"] > 1.3 * result["formula"]["total"]
    _check_rss(result)


@pytest.mark.slow
@pytest.mark.data
def test_rss_of_a_generation_on_smollm2_matches_the_formula():
    """SmolLM2-135M (head_dim 64, GQA 3:1), retrieval at its defaults, a 2,048-token prompt in 1K
    chunks and 32 decoded tokens (~100 s on 2 cores). The first decode step builds the index and
    the estimate (one layer's build scratch at a time) and doubles the stores: its high-water mark
    holds the old store buffers and the last chunk's resident K/V until it commits (+130 MiB over
    the 300 MiB the cache holds)."""
    from lckv.models import is_fetched

    if not is_fetched("smollm2-135m-instruct"):
        pytest.skip("SmolLM2-135M-Instruct is not in the model cache "
                    "(python -m lckv.models fetch smollm2-135m-instruct)")
    result = _measure_rss({"model": "smollm2-135m-instruct", "policy": "retrieval", "prompt": 2048, "steps": 32,
                           "chunk": 1024}, timeout=900)
    assert result["formula"]["peak_decode"] > 1.3 * result["formula"]["total"]
    _check_rss(result)
