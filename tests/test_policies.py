"""Selection policies: exactness at full budget, decode-step plumbing against dense oracles, and
config validation."""
import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lckv
from lckv.attention import attend_with_selection
from lckv.cache import LckvCache
from lckv.policies import (BlockPolicy, BudgetTooSmallError, PolicyConfigError, QuestPolicy, RetrievalPolicy, SnapKVPolicy, get_policy)
from lckv.reference import attention_with_lse
from lckv.reference.estimate import assign_nearest
from lckv.reference.estimate import centroid_estimate as reference_estimate

SELECTION = [("snapkv", {}), ("quest", {"page_size": 4}), ("block", {"block_size": 5, "representatives": 2}),
             ("retrieval", {"index": "exact"}), ("retrieval", {"index": "graph"}), ("retrieval", {"index": "ivf"}),
             ("retrieval", {"index": "faiss_hnsw", "estimate_rest": False})]
LOGIT_ATOL, LOGIT_RTOL = 1e-4, 1e-4


def _tiny_llama(kv_heads=2):
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, head_dim=12, max_position_embeddings=512, initializer_range=0.3,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    return model


def _generate(model, ids, mask, steps=12):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("name,settings", SELECTION)
@pytest.mark.parametrize("budget", ["context", 1.0])
def test_budget_at_least_context_reproduces_full(name, settings, budget):
    model = _tiny_llama()
    ids = torch.randint(3, 97, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding in row 1
    ref_seq, ref_logits = _generate(model, ids, mask)
    tokens = ids.shape[1] + 12 if budget == "context" else 1.0
    lckv.enable(model, name, sink=2, window=6, budget=tokens, **settings)
    seq, logits = _generate(model, ids, mask)
    torch.testing.assert_close(logits, ref_logits, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
    assert torch.equal(seq, ref_seq)


def _filled_cache(policy, batch=2, kv_heads=2, group=2, head_dim=16, total=300, dtype=torch.float32):
    """An LckvCache layer filled with random keys by a prefill of `total` tokens."""
    cache = LckvCache(policy, 1)
    layer = cache.layers[0]
    k = torch.randn(batch, kv_heads, total, head_dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, total, head_dim, dtype=dtype)
    layer.update(k, v)
    layer.record_queries(torch.randn(batch, kv_heads * group, total, head_dim, dtype=dtype) + 0.5)
    new_k = torch.randn(batch, kv_heads, 1, head_dim, dtype=dtype)
    new_v = torch.randn(batch, kv_heads, 1, head_dim, dtype=dtype)
    layer.update(new_k, new_v)  # the decode step's token: spills, enters the window
    all_k = torch.cat([k, new_k], 2)
    all_v = torch.cat([v, new_v], 2)
    return layer, all_k, all_v


def _attended(indices, n_sink, n_store, total):
    """[B, Hkv, total] mask of the keys a selection step attends: the sink, the recent window (after
    the n_store offloaded rows) and the selected store rows (-1 = none)."""
    attended = torch.zeros(*indices.shape[:2], total, dtype=torch.bool)
    attended[:, :, :n_sink] = True
    attended[:, :, n_sink + n_store:] = True
    # count hits, so a -1 slot (clamped to row 0) cannot un-mark a selected row 0
    hits = torch.zeros(attended.shape, dtype=torch.long).scatter_add_(
        2, indices.clamp(min=0) + n_sink, (indices >= 0).long())
    return attended | (hits > 0)


def _dense_over(query, all_k, all_v, attended):
    """Exact attention restricted to attended [B, Hkv, S] (shared by a GQA group)."""
    group = query.shape[1] // all_k.shape[1]
    mask = attended.repeat_interleave(group, dim=1).unsqueeze(2)
    return attention_with_lse(query, all_k, all_v, mask=mask)


@pytest.mark.parametrize("policy", [
    SnapKVPolicy(sink=3, window=9, budget=60, observation=8),
    QuestPolicy(sink=3, window=9, budget=60, page_size=7),
    BlockPolicy(sink=3, window=9, budget=60, block_size=6, representatives=3, observation=8),
    RetrievalPolicy(sink=3, window=9, budget=60, index="exact", estimate_rest=False),
    RetrievalPolicy(sink=3, window=9, budget=60, index="flat", estimate_rest=False),
])
def test_decode_step_attends_resident_plus_selected_rows_exactly(policy):
    layer, all_k, all_v = _filled_cache(policy)
    query = torch.randn(2, 4, 1, 16)
    out, lse = attend_with_selection(query, layer, None, policy, None)
    n_sink, n_store = layer.sink_k.shape[2], layer.store.length
    indices = policy.select(layer.selection, layer.view(), query[:, :, 0], 60 - n_sink - layer.recent_k.shape[2])
    assert indices.shape[-1] <= 60 - n_sink - layer.recent_k.shape[2]
    attended = _attended(indices, n_sink, n_store, all_k.shape[2])
    ref_out, ref_lse = _dense_over(query, all_k, all_v, attended)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert int(attended.sum(-1).max()) <= 60


def test_exact_retrieval_selects_top_rows_of_group_summed_logits():
    policy = RetrievalPolicy(sink=2, window=5, budget=40, index="exact", estimate_rest=False, group_rank="logits")
    layer, _, _ = _filled_cache(policy)
    q = torch.randn(2, 4, 16)
    n = 40 - 2 - layer.recent_k.shape[2]
    got = policy.select(layer.selection_state(), layer.view(), q, n)
    q_sum = q.reshape(2, 2, 2, 16).sum(2)
    logits = torch.einsum("bhd,bhnd->bhn", q_sum, layer.store.keys)
    expected = logits.topk(n, dim=-1).indices
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)


def _group_probability(q, keys, scale, pool=None):
    """float64 oracle: [B, Hkv, n] summed softmax over each group (over `pool` rows only when given)."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    logits = torch.einsum("bhgd,bhnd->bhgn", q.double().reshape(b, hkv, hq // hkv, d), keys.double()) * scale
    if pool is not None:
        logits = logits.masked_fill(~pool.unsqueeze(2), float("-inf"))
    return torch.softmax(logits, -1).sum(2)


@pytest.mark.parametrize("group", [2, 3])
def test_exact_retrieval_selects_top_rows_of_group_summed_probability(group):
    """Default group_rank: rows ranked by sum_h softmax_h(scale * q_h . k) over all offloaded keys."""
    policy = RetrievalPolicy(sink=2, window=5, budget=40, index="exact", estimate_rest=False)
    layer, _, _ = _filled_cache(policy, group=group)
    q = 2 * torch.randn(2, 2 * group, 16)
    n = 40 - 2 - layer.recent_k.shape[2]
    got = policy.select(layer.selection_state(), layer.view(), q, n, 0.3)
    _assert_most_probable(got, q, layer.store.keys, n, 0.3, tol=1e-9)


def _assert_most_probable(got, q, keys, n, scale, tol):
    """``got`` [B, Hkv, n] holds n distinct rows of each kv head with the largest summed group
    probability: none left out beats the weakest chosen (ties within ``tol`` aside)."""
    prob = _group_probability(q, keys, scale)
    chosen = torch.gather(prob, 2, got)
    left_out = prob.scatter(2, got, float("-inf")).amax(-1)
    assert bool((left_out <= chosen.amin(-1) + tol).all())
    assert got.shape[-1] == n and bool((got >= 0).all()) and all(r.unique().numel() == n for r in got.flatten(0, 1))


@pytest.mark.parametrize("group", [1, 2, 4])
def test_cluster_retrieval_ranks_by_group_probability_in_the_index(group):
    """index='cluster', group_rank='probability': the rule runs inside ClusterIndex.search_group;
    with a scan that covers every offloaded key it is the exact summed-probability top-n."""
    policy = RetrievalPolicy(sink=2, window=5, budget=40, index="cluster", estimate_rest=False,
                             index_params={"cluster_size": 4, "segment": 64}, search_params={"scan": 1000.0})
    layer, _, _ = _filled_cache(policy, group=group)
    q = 2 * torch.randn(2, 2 * group, 16)
    n = 40 - 2 - layer.recent_k.shape[2]
    got = policy.select(layer.selection_state(), layer.view(), q, n, 0.3)
    _assert_most_probable(got, q, layer.store.keys, n, 0.3, tol=1e-6)  # float32 kernel vs float64 oracle


def _fused_policy(estimate, **settings):
    """Cluster retrieval whose searches scan a part of the keys (min_scanned=0: scan * k only), with
    super-clusters (spans of 32 clusters), so the partial-scan and super paths run."""
    return RetrievalPolicy(sink=3, window=9, budget=70, index="cluster", estimate_rest=estimate, cluster_size=4,
                           index_params={"cluster_size": 4, "segment": 64, "super_size": 4, "super_span": 32},
                           min_scanned=0, **settings)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,group,head_dim", [(1, 2, 16), (2, 3, 12)])
def test_fused_cluster_step_attends_resident_plus_selected_rows_exactly(dtype, batch, group, head_dim):
    """RetrievalPolicy.fused_step (index='cluster', one C++ call per layer) without the estimate:
    exact attention over sink + window + the rows it selected, which are the rows select() picks;
    float32 queries on float32/bf16/fp16 stores against the float32 oracle over the stored values.
    The index has super-clusters (span 32 clusters), so both search paths run."""
    pytest.importorskip("lckv._C")
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    policy = _fused_policy(False)
    layer, all_k, all_v = _filled_cache(policy, batch=batch, group=group, head_dim=head_dim, total=700, dtype=dtype)
    state = layer.selection_state()
    assert state.indexes[0].heads[0].n_supers > 0
    n_sink, n_store = layer.sink_k.shape[2], layer.store.length
    n = 70 - n_sink - layer.recent_k.shape[2]
    q = torch.randn(batch, 2 * group, head_dim)
    fused = policy.fused_step(state, layer.view(), q, n, 0.3)
    assert fused is not None  # the fused path was taken
    out, lse, indices = fused
    assert indices.shape == (batch, 2, n) and out.dtype == torch.float32
    separate = policy.select(state, layer.view(), q, n, 0.3)
    assert torch.equal(indices.sort(-1).values, separate.sort(-1).values)
    attended = _attended(indices, n_sink, n_store, all_k.shape[2])
    ref_out, ref_lse = attention_with_lse(q.unsqueeze(2), all_k.float(), all_v.float(), scale=0.3,
                                          mask=attended.repeat_interleave(group, dim=1).unsqueeze(2))
    torch.testing.assert_close(out, ref_out[:, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse[:, :, 0], atol=1e-5, rtol=1e-5)


def test_fused_cluster_step_equals_the_separate_ops():
    """With the estimate, over several decode steps (tokens spilling into the index and the
    estimate): attend_with_selection's fused step gives what select + sparse attention + estimate +
    merges give one by one (fp32 reduction order only), and the same rows."""
    pytest.importorskip("lckv._C")
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    policy = _fused_policy(True)
    layer, _, _ = _filled_cache(policy, group=3, head_dim=12, total=900)
    separate = copy.copy(policy)
    separate.fused_step = lambda *args, **kwargs: None  # the op-by-op path on the same layer
    for _ in range(4):
        query = torch.randn(2, 6, 1, 12)
        out, lse, rows = attend_with_selection(query, layer, None, policy, None, return_indices=True)
        ref_out, ref_lse, ref_rows = attend_with_selection(query, layer, None, separate, None, return_indices=True)
        assert torch.equal(rows.sort(-1).values, ref_rows.sort(-1).values)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
        layer.update(torch.randn(2, 2, 1, 12), torch.randn(2, 2, 1, 12))


def test_fused_cluster_step_rejects_bad_arguments():
    pytest.importorskip("lckv._C")
    from lckv._extension import compiled

    policy = _fused_policy(True)
    layer, _, _ = _filled_cache(policy, total=400)
    state = layer.selection_state()
    heads = [ix.native_handle() for index in state.indexes for ix in index.heads]
    est = state.estimate
    q = torch.randn(2, 4, 16)
    keys, values = layer.store.keys, layer.store.values
    res_k = torch.cat([layer.sink_k, layer.recent_k], 2)
    res_v = torch.cat([layer.sink_v, layer.recent_v], 2)
    step = compiled("decode_cluster_step").decode_cluster_step
    estimate = (est.centroids, est.counts, est.value_sums, est.assign)
    out, lse, rows = step(heads, q, keys, values, res_k, res_v, 30, 0.25, estimate=estimate)  # valid call
    assert out.shape == (2, 4, 16) and lse.shape == (2, 4) and rows.shape == (2, 2, 30)
    with pytest.raises(ValueError, match="heads must hold batch \\* kv_heads = 4"):
        step(heads[:3], q, keys, values, res_k, res_v, 30, 0.25)
    with pytest.raises(ValueError, match="the index must cover exactly the offloaded rows"):
        step(heads, q, keys[:, :, :-1], values[:, :, :-1], res_k, res_v, 30, 0.25)
    with pytest.raises(ValueError, match="k must be positive"):
        step(heads, q, keys, values, res_k, res_v, 0, 0.25)
    with pytest.raises(ValueError, match="q contains NaN or inf"):
        step(heads, q.clone().fill_(float("nan")), keys, values, res_k, res_v, 30, 0.25)
    with pytest.raises(TypeError, match="resident_k must have the dtype of offloaded_k"):
        step(heads, q, keys, values, res_k.half(), res_v.half(), 30, 0.25)
    with pytest.raises(ValueError, match="q_heads \\(3\\) must be a multiple"):
        step(heads, q[:, :3].contiguous(), keys, values, res_k, res_v, 30, 0.25)
    with pytest.raises(ValueError, match="assign must have shape"):
        step(heads, q, keys, values, res_k, res_v, 30, 0.25, estimate=estimate[:3] + (est.assign[..., :-1],))
    bad = est.assign.clone()
    bad[0, 1] = est.centroids.shape[2]  # every row of (batch 0, kv head 1) out of range
    with pytest.raises(ValueError, match="assign must hold cluster ids in \\[0, "):
        step(heads, q, keys, values, res_k, res_v, 30, 0.25, estimate=estimate[:3] + (bad,))


@pytest.mark.parametrize("fused", [False, True])
def test_min_scanned_widens_small_cluster_searches(fused):
    """min_scanned raises the cluster search's scan for small k: with a floor covering every
    offloaded key the group search is exhaustive, so the rows are the exact summed-probability
    top-n, through select() and through the fused step alike; the default scan alone (no floor)
    scans only scan * k keys."""
    pytest.importorskip("lckv._C")
    policy = RetrievalPolicy(sink=2, window=5, budget=40, index="cluster", estimate_rest=False,
                             index_params={"cluster_size": 4, "segment": 64}, min_scanned=100_000)
    layer, _, _ = _filled_cache(policy, group=2)
    state = layer.selection_state()
    q = 2 * torch.randn(2, 4, 16)
    n = 40 - 2 - layer.recent_k.shape[2]
    assert policy.search_settings(n)["scan"] == 100_000 / n
    got = policy.fused_step(state, layer.view(), q, n, 0.3)[2] if fused else policy.select(state, layer.view(), q, n, 0.3)
    _assert_most_probable(got, q, layer.store.keys, n, 0.3, tol=1e-6)
    no_floor = RetrievalPolicy(sink=2, window=5, budget=40, index="cluster", min_scanned=0)
    assert no_floor.search_settings(n) == {"scan": 2.0}
    assert RetrievalPolicy(index="cluster", search_params={"scan": 3.0}, min_scanned=0).search_settings(10) == {"scan": 3.0}
    assert RetrievalPolicy(index="graph").search_settings(10) == {}  # other indexes: untouched


@pytest.mark.parametrize("estimate", [False, True], ids=["union-normalised", "estimate-normalised"])
def test_index_retrieval_ranks_the_union_of_per_head_searches(estimate):
    """Index path of group_rank='probability': each query head searches its own top-n (flat index =
    exact search) and the union is ranked by the group's summed probability. Without an estimate
    each head's softmax is normalised over the union; with one, over every offloaded key (the rest
    by the estimate, exact here with one cluster per row)."""
    policy = RetrievalPolicy(sink=2, window=5, budget=40, index="flat", estimate_rest=estimate, cluster_size=1)
    layer, _, _ = _filled_cache(policy, total=400)
    q = 2 * torch.randn(2, 4, 16)
    n = 40 - 2 - layer.recent_k.shape[2]
    got = policy.select(layer.selection_state(), layer.view(), q, n, 0.25)
    keys = layer.store.keys
    per_head = torch.einsum("bhgd,bhnd->bhgn", q.reshape(2, 2, 2, 16).double(), keys.double())
    union = torch.zeros(keys.shape[:3], dtype=torch.bool).scatter_(2, per_head.topk(n, -1).indices.flatten(2), True)
    prob = _group_probability(q, keys, 0.25, pool=None if estimate else union).masked_fill(~union, float("-inf"))
    assert bool(torch.gather(union, 2, got).all())
    chosen = torch.gather(prob, 2, got)
    left_out = prob.scatter(2, got, float("-inf")).amax(-1)
    assert bool((left_out <= chosen.amin(-1) + 1e-6).all())


@pytest.mark.parametrize("with_rest", [False, True])
@pytest.mark.parametrize("group", [1, 2, 7])
def test_compiled_group_ranking_against_oracle(group, with_rest):
    """lckv._C.rank_by_group_probability (float32 CPU) and the torch formulation both choose the
    most probable distinct candidates (float64 oracle; -1 slots, repeats, strided keys, a mass
    outside the candidates), best first, and reject bad input."""
    pytest.importorskip("lckv._C")
    from lckv._extension import compiled
    from lckv.reference.group_rank import rank_by_group_probability

    batch, kv_heads, rows, dim, m, n = 2, 3, 500, 16, 90, 25
    keys = torch.randn(batch, kv_heads, rows + 9, dim)[:, :, :rows]  # a strided view
    q = 2 * torch.randn(batch, kv_heads * group, dim)
    candidates = torch.randint(-1, rows, (batch, kv_heads, m))
    candidates[..., :10] = candidates[..., 10:20]  # repeats
    rest = torch.randn(batch, kv_heads * group) + 3 if with_rest else None
    logits = torch.einsum("bhgd,bhnd->bhgn", q.double().reshape(batch, kv_heads, group, dim), keys.double()) * 0.3
    # count hits, so a -1 slot (clamped to row 0) cannot un-mark a candidate row 0
    pool = torch.zeros(batch, kv_heads, rows, dtype=torch.long).scatter_add_(
        2, candidates.clamp(min=0), (candidates >= 0).long()) > 0
    logits = logits.masked_fill(~pool.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(logits, -1)
    if with_rest:
        lse = torch.logaddexp(lse, rest.double().reshape(lse.shape))
    prob = torch.exp(logits - lse.unsqueeze(-1)).sum(2).masked_fill(~pool, float("-inf"))
    for got in (compiled("rank_by_group_probability").rank_by_group_probability(q, keys, candidates, rest, 0.3, n),
                rank_by_group_probability(q, keys, candidates, rest, 0.3, n)):
        assert got.shape == (batch, kv_heads, n) and bool((got >= 0).all())
        chosen = torch.gather(prob, 2, got)
        assert bool((chosen[..., :-1] >= chosen[..., 1:] - 1e-6).all())  # best first
        left_out = prob.scatter(2, got, float("-inf")).amax(-1)
        assert bool((left_out <= chosen.amin(-1) + 1e-6).all())
        assert all(len(set(r.tolist())) == n for r in got.flatten(0, 1))  # distinct
    rank = compiled("rank_by_group_probability").rank_by_group_probability
    with pytest.raises(ValueError, match="candidates must be row ids"):
        rank(q, keys, candidates + rows, rest, 0.3, n)
    with pytest.raises(ValueError, match="n_select must be positive"):
        rank(q, keys, candidates, rest, 0.3, 0)
    with pytest.raises(TypeError, match="keys must be float32"):
        rank(q, keys.double(), candidates, rest, 0.3, n)


def test_group_rank_logits_and_probability_agree_without_gqa():
    layer_p, _, _ = _filled_cache(RetrievalPolicy(sink=2, window=5, budget=40, index="exact", estimate_rest=False),
                                  group=1)
    q = torch.randn(2, 2, 16)
    n = 40 - 2 - layer_p.recent_k.shape[2]
    a = RetrievalPolicy(sink=2, window=5, budget=40, index="exact", estimate_rest=False).select(None, layer_p.view(), q, n)
    b = RetrievalPolicy(sink=2, window=5, budget=40, index="exact", estimate_rest=False,
                        group_rank="logits").select(None, layer_p.view(), q, n)
    assert torch.equal(a.sort(-1).values, b.sort(-1).values)


@pytest.mark.parametrize("group_rank", ["probability", "logits"])
def test_graph_retrieval_recall_against_exact(group_rank):
    """The graph index against exact search under the same group rule (index 'flat' searches
    exactly, through the same candidate path). Mean recall over 8 decode queries x 2 batch rows x
    2 kv heads: single queries on random keys range from ~0.7 to 1.0, so a mean over 4 would fail
    the bound by chance now and then."""
    policy = RetrievalPolicy(sink=2, window=5, budget=60, index="graph", estimate_rest=False, group_rank=group_rank)
    exact = RetrievalPolicy(sink=2, window=5, budget=60, index="flat", estimate_rest=False, group_rank=group_rank)
    layer, _, _ = _filled_cache(policy, total=2000)
    n = 60 - 2 - layer.recent_k.shape[2]
    flat_state = exact.build(layer.view())
    hits = total = 0
    for _ in range(8):
        q = torch.randn(2, 4, 16) + 0.5
        got = policy.select(layer.selection_state(), layer.view(), q, n)
        want = exact.select(flat_state, layer.view(), q, n)
        hits += sum(len(set(g.tolist()) & set(w.tolist())) for g, w in zip(got.flatten(0, 1), want.flatten(0, 1)))
        total += want.numel()
    assert hits / total >= 0.9


@pytest.mark.parametrize("clusters", [dict(clusters=100_000), dict(clusters="auto", cluster_size=1)],
                         ids=["kmeans", "auto"])
def test_estimate_with_one_cluster_per_row_is_exact(clusters):
    """With one cluster per offloaded row (k-means with more clusters than rows, or segment
    clustering with cluster_size 1), every centroid is a key and every cluster's mean value is that
    key's value: the estimate of the non-retrieved rows, and the merged output, are then exact."""
    policy = RetrievalPolicy(sink=2, window=5, budget=30, index="exact", estimate_rest=True, **clusters)
    layer, all_k, all_v = _filled_cache(policy, total=150)
    query = torch.randn(2, 4, 1, 16)
    out, lse = attend_with_selection(query, layer, None, policy, None)
    ref_out, ref_lse = attention_with_lse(query, all_k, all_v)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-4)


def test_estimate_improves_a_diffuse_head():
    """Uniform-ish attention (diffuse head): top-k alone misses most of the mass; the centroid
    estimate brings the output closer to exact attention."""
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    with_est = RetrievalPolicy(sink=2, window=5, budget=50, index="exact", estimate_rest=True, clusters=32)
    without = RetrievalPolicy(sink=2, window=5, budget=50, index="exact", estimate_rest=False)
    layer, all_k, all_v = _filled_cache(with_est, total=3000)
    all_v += 1.0  # values with a common mean: the missing mass biases the top-k-only output
    layer.store._v[:, :, :layer.store.length] += 1.0
    layer.sink_v += 1.0
    layer.recent_v += 1.0
    query = 0.05 * torch.randn(2, 4, 1, 16)
    ref_out, _ = attention_with_lse(query, all_k, all_v)
    est_out, _ = attend_with_selection(query, layer, None, with_est, None)
    layer.selection = None
    layer.policy = without
    top_out, _ = attend_with_selection(query, layer, None, without, None)
    err = lambda o: float((o - ref_out).norm() / ref_out.norm())  # noqa: E731
    assert err(est_out) < 0.5 * err(top_out)


def test_retrieval_inserts_spilled_tokens_during_decoding():
    policy = RetrievalPolicy(sink=2, window=5, budget=40, index="flat", estimate_rest=True, clusters=8)
    layer, _, _ = _filled_cache(policy, total=200)
    state = layer.selection_state()
    before = state.indexes[0].size
    for _ in range(7):
        layer.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
    assert state.indexes[0].size == before + 7 == layer.store.length
    assert state.estimate.assign.shape[-1] == layer.store.length
    assert torch.allclose(state.estimate.counts.sum(-1), torch.full((2, 2), float(layer.store.length)))


@pytest.mark.parametrize("name,setting,value", [
    ("retrieval", "estimate_rest", "no"), ("retrieval", "prefill_per_head", 0), ("retrieval", "exact_above", "x"),
    ("retrieval", "index_params", 5), ("retrieval", "search_params", [1]), ("retrieval", "index", 3),
    ("snapkv", "pooling", None), ("quest", "prefill", 1), ("block", "budget", True), ("full", "window", 2.0),
])
def test_settings_of_the_wrong_type_are_refused_by_name(name, setting, value):
    """Every setting is checked against its annotation (found by benchmarks/fuzz.py: a bool
    setting took 0 or "no" silently, a dict setting 5 or a float setting "x" raised TypeError from
    a comparison deep in validate)."""
    with pytest.raises(PolicyConfigError, match=f"{setting} must be"):
        get_policy(name, **{setting: value})
    policy = get_policy(name)
    setattr(policy, setting, value)
    with pytest.raises(PolicyConfigError, match=f"{setting} must be"):
        lckv.policies.resolve_policy(policy)


def test_internal_fields_are_not_settings():
    with pytest.raises(PolicyConfigError, match=r"no setting\(s\) \['_module'\]"):
        get_policy("retrolm", _module=object())


def test_selection_policy_configs_are_validated():
    with pytest.raises(PolicyConfigError, match="budget must be >= 1 token"):
        get_policy("quest", budget=0)
    with pytest.raises(PolicyConfigError, match=r"fraction must be in \(0, 1\]"):
        get_policy("snapkv", budget=1.5)
    with pytest.raises(PolicyConfigError, match="fraction must be in"):
        get_policy("snapkv", budget=-0.1)
    with pytest.raises(BudgetTooSmallError, match=r"budget of 5 keys cannot hold the sink \(4\)"):
        get_policy("retrieval", sink=4, window=64, budget=5)
    with pytest.raises(PolicyConfigError, match="group_rank must be 'probability' or 'logits'"):
        RetrievalPolicy(group_rank="max")
    for bad in (-1, 2.5, True):
        with pytest.raises(PolicyConfigError, match="min_scanned must be an int"):
            RetrievalPolicy(index="cluster", min_scanned=bad)
    with pytest.raises(PolicyConfigError, match="index must be one of"):
        get_policy("retrieval", index="annoy")
    with pytest.raises(PolicyConfigError, match="not settings of 'graph'"):
        get_policy("retrieval", index="graph", index_params={"M": 16})
    with pytest.raises(PolicyConfigError, match=r"\['upper_eff'\] are not search parameters of 'graph'"):
        get_policy("retrieval", index="graph", search_params={"upper_eff": 64})
    with pytest.raises(PolicyConfigError, match="not search parameters of 'faiss_ivf'"):
        get_policy("retrieval", index="faiss_ivf", search_params={"ef": 64})
    get_policy("retrieval", index="graph", index_params={"upper_size": None}, search_params={"ef": 32, "upper_ef": 64})
    get_policy("retrieval", index="faiss_hnsw", search_params={"ef": 64})
    with pytest.raises(PolicyConfigError, match="page_size must be >= 1"):
        get_policy("quest", page_size=0)
    with pytest.raises(PolicyConfigError, match="pooling must be"):
        get_policy("snapkv", pooling="median")
    with pytest.raises(PolicyConfigError, match="must not exceed block_size"):
        get_policy("block", block_size=4, representatives=8)
    with pytest.raises(PolicyConfigError, match="budget must be a token count or a fraction"):
        get_policy("block", budget=float("nan"))
    assert get_policy("retrieval", budget=0.05).budget_tokens(1000) == 50
    assert get_policy("retrieval", budget=300, window=64).budget_tokens(1000) == 300


@pytest.mark.parametrize("policy", [
    QuestPolicy(sink=3, window=9, budget=70, page_size=5),
    RetrievalPolicy(sink=3, window=9, budget=70, index="exact", estimate_rest=False),
])
def test_decode_step_never_selects_padding(policy):
    from lckv.attention import KeyPaddingMask

    layer, all_k, all_v = _filled_cache(policy)
    total = all_k.shape[2]
    padding = torch.ones(2, total, dtype=torch.bool)
    padding[1, :120] = False  # row 1 is left-padded deep into the offloaded store
    layer.set_padding(padding)
    # make the pad keys the most attractive ones: a selection that ignores padding would pick them
    layer.store._k[1, :, :120 - 3] = 5.0
    all_k[1, :, 3:120] = 5.0
    query = torch.ones(2, 4, 1, 16)
    out, lse = attend_with_selection(query, layer, KeyPaddingMask(padding), policy, None)
    assert torch.isfinite(lse).all()
    # oracle: the real keys of row 1 only (pads masked), restricted to the policy's budget
    n_sink = layer.sink_k.shape[2]
    n_sel = 70 - n_sink - layer.recent_k.shape[2]
    raw = policy.select(layer.selection_state(), layer.view(), query[:, :, 0], n_sel)
    real = raw.clamp(min=0) + n_sink >= 120
    assert not real[1].all(), "the test must offer pad rows to the selection"
    attended = _attended(raw, n_sink, layer.store.length, total) & padding[:, None, :]
    ref_out, ref_lse = _dense_over(query, all_k, all_v, attended)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_retrieval_scans_exactly_when_k_is_a_large_fraction():
    graph = RetrievalPolicy(sink=2, window=5, budget=1000, index="graph", estimate_rest=False, exact_above=0.25)
    exact = RetrievalPolicy(sink=2, window=5, budget=1000, index="exact", estimate_rest=False)
    layer, _, _ = _filled_cache(graph, total=1500)
    q = torch.randn(2, 4, 16)
    n = 1000 - 2 - layer.recent_k.shape[2]  # > 25% of the ~1490 offloaded rows
    got = graph.select(layer.selection_state(), layer.view(), q, n)
    assert torch.equal(got.sort(-1).values, exact.select(None, layer.view(), q, n).sort(-1).values)
    with pytest.raises(PolicyConfigError, match="exact_above"):
        get_policy("retrieval", exact_above=1.5)


def test_auto_estimate_reuses_the_cluster_index():
    policy = RetrievalPolicy(sink=2, window=5, budget=60, index="cluster", estimate_rest=True, cluster_size=8)
    assert policy.clusters == "auto"
    policy.index_params = {"cluster_size": 8}
    layer, _, _ = _filled_cache(policy, total=700)
    state = layer.selection_state()
    est, rows = state.estimate, layer.store.length
    for b in range(2):
        for h in range(2):
            index = state.indexes[b].heads[h]
            c = index.centroids()
            torch.testing.assert_close(est.centroids[b, h, :c.shape[0]], c)  # the index's own clusters
            assert bool((est.counts[b, h, c.shape[0]:] == 0).all())  # padding centroids hold no key
    assert est.assign.shape == (2, 2, rows) and bool((est.assign >= 0).all())
    torch.testing.assert_close(est.counts.sum(-1), torch.full((2, 2), float(rows)))
    # decode-time inserts join a real (non-padding) centroid
    for _ in range(5):
        layer.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
    n_real = [[state.indexes[b].heads[h].n_clusters for h in range(2)] for b in range(2)]
    new = est.assign[..., rows:]
    assert new.shape[-1] == 5 and all(bool((new[b, h] < n_real[b][h]).all()) for b in range(2) for h in range(2))


@pytest.mark.parametrize("bad", [dict(clusters="many"), dict(clusters=0), dict(clusters=True), dict(cluster_size=0)])
def test_estimate_settings_are_validated(bad):
    with pytest.raises(PolicyConfigError, match="clusters|cluster_size"):
        RetrievalPolicy(sink=4, window=16, budget=100, **bad)


@pytest.mark.parametrize("clusters", ["auto", 7])
def test_estimate_matches_per_cluster_oracle(clusters):
    """The estimate (computed as all clusters minus the retrieved rows) equals the per-cluster
    definition evaluated in float64: rest_c keys at centroid c carrying the mean value of the rest."""
    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    policy = RetrievalPolicy(sink=2, window=5, budget=40, index="exact", estimate_rest=True, clusters=clusters,
                             cluster_size=8)
    layer, _, _ = _filled_cache(policy, total=400)
    state = layer.selection_state()
    q = torch.randn(2, 4, 16)
    n = 33
    indices = policy.select(state, layer.view(), q, n)
    indices[0, 1, :5] = -1  # some empty slots
    out, lse = policy.estimate(state, layer.view(), q, indices, None)
    est = state.estimate
    values = layer.store.values.double()
    for b in range(2):
        for h in range(2):
            got = indices[b, h][indices[b, h] >= 0]
            taken = torch.zeros(est.assign.shape[-1], dtype=torch.bool)
            taken[got] = True
            for g in range(2):
                qh = q[b, h * 2 + g].double()
                logits, vals = [], []
                for c in range(est.centroids.shape[2]):
                    members = (est.assign[b, h] == c) & ~taken
                    rest = int(members.sum())
                    if rest == 0:
                        continue
                    logits.append(float(qh @ est.centroids[b, h, c].double()) * 16 ** -0.5 + math.log(rest))
                    vals.append(values[b, h][members].mean(0))
                logits = torch.tensor(logits, dtype=torch.float64)
                ref_lse = torch.logsumexp(logits, 0)
                ref_out = (torch.softmax(logits, 0).unsqueeze(-1) * torch.stack(vals)).sum(0)
                assert abs(float(lse[b, h * 2 + g]) - float(ref_lse)) < 1e-4
                torch.testing.assert_close(out[b, h * 2 + g].double(), ref_out, atol=1e-4, rtol=1e-4)


def test_estimate_clusters_are_capped_per_head():
    policy = RetrievalPolicy(sink=2, window=5, budget=60, index="exact", estimate_rest=True, cluster_size=4,
                             max_clusters=20)
    layer, _, _ = _filled_cache(policy, total=900)
    est = layer.selection_state().estimate
    rows = layer.store.length
    # cluster size raised to ceil(rows / max_clusters): about max_clusters clusters, never 4-key ones
    assert est.centroids.shape[2] <= 20 + 2
    assert bool((est.counts.sum(-1) == rows).all())
    with pytest.raises(PolicyConfigError, match="max_clusters"):
        RetrievalPolicy(sink=2, window=5, budget=60, max_clusters=0)


def test_compiled_estimate_equals_the_torch_one():
    """lckv._C.centroid_estimate (used for float32 CPU caches) against the torch formulation, with
    strided value/assignment buffers, -1 slots and padding clusters; and its argument errors."""
    pytest.importorskip("lckv._C")
    from lckv._extension import compiled

    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    policy = RetrievalPolicy(sink=2, window=5, budget=80, index="exact", estimate_rest=True, cluster_size=8)
    layer, _, _ = _filled_cache(policy, total=700)
    state = layer.selection_state()
    for _ in range(3):  # decode-time inserts: the assignment buffer has spare capacity now
        layer.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
    est = state.estimate
    q = torch.randn(2, 4, 16)
    indices = policy.select(state, layer.view(), q, 60)
    indices[1, 0, 10:] = -1
    rows = layer.store.length
    buffer = torch.randn(2, 2, rows + 37, 16)  # values as a strided view of a larger buffer
    buffer[:, :, :rows] = layer.store.values
    values = buffer[:, :, :rows]
    assert not values.is_contiguous() and not est.assign.is_contiguous()
    got_out, got_lse = compiled("centroid_estimate").centroid_estimate(
        q, est.centroids, est.counts, est.value_sums, est.assign, values, indices, 0.25)
    ref_out, ref_lse = reference_estimate(q, est.centroids, est.counts, est.value_sums, est.assign, values, indices, 0.25)
    torch.testing.assert_close(got_out, ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_lse, ref_lse, atol=1e-5, rtol=1e-5)
    # everything retrieved: no rest, lse -inf and zero output (both paths)
    everything = torch.arange(layer.store.length).expand(2, 2, -1).contiguous()
    out, lse = compiled("centroid_estimate").centroid_estimate(
        q, est.centroids, est.counts, est.value_sums, est.assign, values, everything, 0.25)
    assert bool(torch.isinf(lse).all()) and bool((out == 0).all())
    lse_only = compiled("centroid_estimate").centroid_estimate(
        q, est.centroids, est.counts, est.value_sums, est.assign, values, indices, 0.25, True)[1]
    torch.testing.assert_close(lse_only, got_lse, atol=0, rtol=0)  # the same lse without reading values
    repeated = torch.cat([indices, indices[..., :7]], -1)  # a row listed twice is retrieved once
    out_r, lse_r = compiled("centroid_estimate").centroid_estimate(
        q, est.centroids, est.counts, est.value_sums, est.assign, values, repeated, 0.25)
    torch.testing.assert_close(out_r, got_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse_r, got_lse, atol=1e-6, rtol=1e-6)
    out_t, lse_t = reference_estimate(q, est.centroids, est.counts, est.value_sums, est.assign, values, repeated, 0.25)  # the torch path too
    torch.testing.assert_close(out_t, ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse_t, ref_lse, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="indices must be row ids"):
        compiled("centroid_estimate").centroid_estimate(
            q, est.centroids, est.counts, est.value_sums, est.assign, values, everything + 1, 0.25)
    with pytest.raises(TypeError, match="q must be float32"):
        compiled("centroid_estimate").centroid_estimate(
            q.double(), est.centroids, est.counts, est.value_sums, est.assign, values, indices, 0.25)
    with pytest.raises(ValueError, match="assign must have shape"):
        compiled("centroid_estimate").centroid_estimate(
            q, est.centroids, est.counts, est.value_sums, est.assign[..., :-1], values, indices, 0.25)
    # cluster ids are checked where a step reads them (the retrieved rows): O(k), not O(rows)
    bad = est.assign.clone()
    row = int(indices[1, 0, 0])  # retrieved (slots 10: of this head are -1)
    bad[1, 0, row] = est.centroids.shape[2]
    with pytest.raises(ValueError, match=f"retrieved row {row} of batch 1, kv head 0 has cluster"):
        compiled("centroid_estimate").centroid_estimate(
            q, est.centroids, est.counts, est.value_sums, bad, values, indices, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_offload_rows_equals_index_add_plus_estimate_add(dtype, padded):
    """lckv._C.offload_rows (a decode step's spilled rows, one call) against the two ops it fuses:
    ClusterIndex add (add_heads) and estimate_add, on strided 16-bit or float32 store views; a bad
    call raises and changes neither the indexes nor the estimate."""
    pytest.importorskip("lckv._C")
    from lckv._extension import compiled
    from lckv.index import ClusterIndex

    torch.manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    B, H, C, D, n = 2, 3, 29, 12, 7
    base = torch.randn(B * H, 500, D)
    ours = [ClusterIndex(D, cluster_size=4, segment=64).build(base[t]) for t in range(B * H)]
    theirs = [ClusterIndex(D, cluster_size=4, segment=64).build(base[t]) for t in range(B * H)]
    centroids = torch.randn(B, H, C, D)
    half = 0.5 * centroids.square().sum(-1)
    counts, sums = torch.rand(B, H, C) * 10, torch.randn(B, H, C, D)
    store_k = torch.randn(B, H, n + 5, D).to(dtype)
    store_v = torch.randn(B, H, n + 5, D).to(dtype)
    keys, values = store_k[:, :, 3:3 + n], store_v[:, :, 3:3 + n]  # strided views, as the host store's
    valid = torch.rand(B, n) > 0.3 if padded else None
    got_counts, got_sums = counts.clone(), sums.clone()
    assign = compiled("offload_rows").offload_rows([ix.native_handle() for ix in ours], keys, values, valid,
                                                   (centroids, half, got_counts, got_sums))
    ref_counts, ref_sums = counts.clone(), sums.clone()
    ref_assign = compiled("estimate_add").estimate_add(keys.float().contiguous(), values.float().contiguous(), valid,
                                                       centroids, half, ref_counts, ref_sums)
    compiled("add_heads").add_heads([ix.native_handle() for ix in theirs], keys.float().reshape(B * H, n, D).contiguous())
    assert torch.equal(assign, ref_assign)
    assert torch.equal(got_counts, ref_counts) and torch.equal(got_sums, ref_sums)
    q = torch.randn(B * H, 2, D)
    for a, b, t in zip(ours, theirs, range(B * H)):
        assert a.size == b.size == 500 + n
        assert torch.equal(a.search(q[t], 40)[1], b.search(q[t], 40)[1])
    # without an estimate: the indexes only, None back
    assert compiled("offload_rows").offload_rows([ix.native_handle() for ix in ours], keys, values) is None
    assert all(ix.size == 500 + 2 * n for ix in ours)
    bad = keys.float().clone()
    bad[1, 2, 3, 4] = float("nan")
    before = got_counts.clone(), got_sums.clone()
    with pytest.raises(ValueError, match="keys contains NaN or inf"):
        compiled("offload_rows").offload_rows([ix.native_handle() for ix in ours], bad, values.float(), valid,
                                              (centroids, half, got_counts, got_sums))
    with pytest.raises(ValueError, match="heads must be empty \\(no index\\) or hold batch \\* kv_heads = 6"):
        compiled("offload_rows").offload_rows([ix.native_handle() for ix in ours[:2]], keys, values)
    with pytest.raises(TypeError, match="values must have the dtype of keys"):
        compiled("offload_rows").offload_rows([], keys, values.half() if dtype != torch.float16 else values.float())
    assert all(ix.size == 500 + 2 * n for ix in ours)
    assert torch.equal(got_counts, before[0]) and torch.equal(got_sums, before[1])


def test_spilled_rows_reach_index_and_estimate_through_the_fused_offload():
    """A decode step's spilled token goes through RetrievalPolicy.on_offload's one C++ call: the
    index and the estimate then cover every store row, and the estimate's counts sum to them."""
    pytest.importorskip("lckv._C")
    policy = _fused_policy(True)
    layer, _, _ = _filled_cache(policy, total=300)
    state = layer.selection_state()
    for _ in range(5):
        layer.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
        assert all(ix.size == layer.store.length for index in state.indexes for ix in index.heads)
        assert state.estimate.rows == layer.store.length
        torch.testing.assert_close(state.estimate.counts.sum(-1), torch.full((2, 2), float(layer.store.length)))
    last = layer.store.keys[:, :, -1:].float()
    expect = assign_nearest(last, state.estimate.centroids, state.estimate.half_norms)
    assert torch.equal(state.estimate.assign[:, :, -1:], expect)


@pytest.mark.parametrize("padded", [False, True])
def test_estimate_add_matches_the_torch_update(padded):
    """lckv._C.estimate_add (the decode-time offload of the estimate) against the torch formulation:
    nearest centroid in L2, counts and value sums of valid rows only."""
    from lckv._extension import compiled

    pytest.importorskip("lckv._C")
    B, H, C, D, n = 2, 3, 37, 16, 5
    centroids = torch.randn(B, H, C, D)
    half = 0.5 * centroids.square().sum(-1)
    counts, sums = torch.rand(B, H, C) * 10, torch.randn(B, H, C, D)
    keys, values = torch.randn(B, H, n, D), torch.randn(B, H, n, D)
    valid = torch.rand(B, n) > 0.3 if padded else None
    got_counts, got_sums = counts.clone(), sums.clone()
    assign = compiled("estimate_add").estimate_add(keys, values, valid, centroids, half, got_counts, got_sums)
    # nearest centroid in L2 (float64 oracle; a float32 near-tie may go either way)
    dist = torch.cdist(keys.double(), centroids.double())
    chosen = torch.gather(dist, 3, assign.unsqueeze(-1)).squeeze(-1)
    assert bool((chosen <= dist.amin(-1) + 1e-4).all())
    assert float((assign == assign_nearest(keys, centroids, half)).float().mean()) >= 0.9
    weight = (valid if padded else torch.ones(B, n, dtype=torch.bool))[:, None, :].expand_as(assign).float()
    ref_counts = counts.clone().scatter_add_(2, assign, weight)
    ref_sums = sums.clone().scatter_add_(2, assign.unsqueeze(-1).expand_as(values), values * weight.unsqueeze(-1))
    torch.testing.assert_close(got_counts, ref_counts)
    torch.testing.assert_close(got_sums, ref_sums, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="keys contains NaN or inf"):
        compiled("estimate_add").estimate_add(torch.full_like(keys, float("nan")), values, valid, centroids, half,
                                              got_counts, got_sums)
    with pytest.raises(ValueError, match="values must have the shape of keys"):
        compiled("estimate_add").estimate_add(keys, values[:, :, :2], valid, centroids, half, got_counts, got_sums)
