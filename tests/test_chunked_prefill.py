"""Retrieval-augmented chunked prefill (``SelectionPolicy.prefill="retrieval"``).

Three oracles: (1) with ``prefill_select`` and the budget covering every offloaded row, a prompt
fed in chunks (transformers' ``prefill_chunk_size``) gives sdpa's greedy tokens and logits, for
chunk sizes that split the window, with left padding and batch > 1; (2) one layer fed chunk by
chunk with random keys and queries against a masked dense softmax over exactly the keys the rule
says (sink, window + chunk causally, and the top ``prefill_select`` rows of each query block's mean
query); (3) after such a prefill every layer's selection state exists and covers every offloaded
row, so the first decode step builds nothing.
"""
import math

import pytest
import torch

import lckv
from kernel_oracles import fresh_generator
from lckv.attention import attend_chunk_with_selection
from lckv.cache import LckvCacheLayer
from lckv.policies import PolicyConfigError, resolve_policy
from lckv.policies.selection import unique_rows
from tiny_models import tiny_decoder

# fp32 end-to-end logits, merged partial softmaxes vs one softmax: rounding-level differences
# (the same bound as tests/test_hf_backend.py)
LOGIT_ATOL, LOGIT_RTOL = 1e-4, 1e-4
# one fp32 attention layer against a dense fp32 softmax: a few ulps of accumulation order
ATTN_ATOL, ATTN_RTOL = 1e-5, 1e-5
NEW_TOKENS = 12


def _tiny(kind: str, kv_heads: int, seed: int):
    torch.manual_seed(seed)
    return tiny_decoder(kind, kv_heads, max_positions=512)


def _generate(model, ids, mask, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0,
                             **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("kind,kv_heads", [("llama", 2), ("qwen2", 1), ("llama", 4)])
@pytest.mark.parametrize("policy", ["retrieval", "quest", "block"])
@pytest.mark.parametrize("chunk", [5, 16])
def test_covering_retrieval_prefill_equals_sdpa(kind, kv_heads, policy, chunk):
    gen, seed = fresh_generator()
    model = _tiny(kind, kv_heads, seed)
    lengths = (90, 61)
    ids = torch.zeros(2, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):  # left padding
        ids[row, -n:] = torch.randint(3, 97, (n,), generator=gen)
        mask[row, -n:] = 1
    ref = _generate(model, ids, mask)
    settings = dict(sink=3, window=7, budget=1.0, prefill="retrieval", prefill_select=200, prefill_block=4)
    if policy == "retrieval":
        settings["index"] = "exact"  # flat: any index attends every row when the budget covers them
    lckv.enable(model, policy, **settings)
    cache = lckv.new_cache(model)
    got = _generate(model, ids, mask, past_key_values=cache, prefill_chunk_size=chunk)
    torch.testing.assert_close(got[1], ref[1], atol=LOGIT_ATOL, rtol=LOGIT_RTOL, msg=f"seed {seed}")
    assert torch.equal(got[0], ref[0]), f"seed {seed}"
    assert cache.layers[0].store.length > 0, "the prompt must have been offloaded"


def _reference_chunk(q, k, v, lo, hi, sink, window, select, block, scale, estimate=None, per_query=0, per_head=False,
                     exact=(0, 0)):
    """Dense softmax of queries ``lo..hi-1`` over the keys the retrieval prefill rule allows;
    with ``estimate`` (a callable ``(query [B, Hq, D], picked store rows [B, H, n], -1 = none) ->
    (out, lse)``, the decode step's estimate of the rows not picked) merged in per query by LSE.
    ``per_query``: each query of a block adds its own top rows by its group-summed query (each
    query head's own with ``per_head``), and the whole block attends them. The queries at
    positions ``exact`` = ``(start, end)`` attend every earlier key (exact causal attention); when
    they end the chunk the blocks are made of the queries before them, else of all its queries."""
    batch, q_heads, _, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    recent_start = max(sink, lo - (window - 1))  # the window kept before the chunk arrived
    store = torch.arange(sink, recent_start)
    outs, lses = [], []
    e_lo, e_hi = max(lo, exact[0]), min(hi, exact[1])
    if e_lo < e_hi:  # the exact queries, attending every earlier key
        qt = q[:, :, e_lo:e_hi].double()
        logits = torch.einsum("bhqd,bhkd->bhqk", qt, k[:, :, :e_hi].double().repeat_interleave(group, 1)) * scale
        causal = torch.arange(e_hi)[None, :] <= torch.arange(e_lo, e_hi)[:, None]
        logits = logits.masked_fill(~causal, float("-inf"))
        exact_part = (torch.softmax(logits, -1) @ v[:, :, :e_hi].double().repeat_interleave(group, 1),
                      torch.logsumexp(logits, dim=-1))
    if e_lo < e_hi == hi:
        hi = e_lo
    for b_lo in range(lo, hi, block):
        b_hi = min(hi, b_lo + block)
        qb = q[:, :, b_lo:b_hi].double()
        allowed = torch.zeros(batch, kv_heads, b_hi - b_lo, hi, dtype=torch.bool)
        allowed[..., :sink] = True
        for i, p in enumerate(range(b_lo, b_hi)):
            allowed[:, :, i, recent_start:p + 1] = True
        picked = None
        if len(store) > select:  # group-summed mean query, top `select` store rows per kv head
            mean = qb.mean(2).reshape(batch, kv_heads, group, head_dim).sum(2)
            scores = torch.einsum("bhd,bhnd->bhn", mean, k[:, :, store].double())
            picks = [store[scores.topk(select, dim=-1).indices]]  # [batch, kv_heads, select]
            if per_query:
                own = qb.reshape(batch, kv_heads, group, b_hi - b_lo, head_dim)
                own = own.flatten(2, 3) if per_head else own.sum(2)
                own_scores = torch.einsum("bhqd,bhnd->bhqn", own, k[:, :, store].double())
                picks.append(store[own_scores.topk(min(per_query, len(store)), dim=-1).indices].flatten(2))
            picked = torch.full((batch, kv_heads, len(store)), -1, dtype=torch.long)
            for bb in range(batch):
                for h in range(kv_heads):
                    rows = torch.cat([p[bb, h] for p in picks]).unique()
                    allowed[bb, h, :, rows] = True
                    picked[bb, h, :len(rows)] = rows
        else:
            allowed[..., store] = True
        allowed = allowed.repeat_interleave(group, dim=1)
        logits = torch.einsum("bhqd,bhkd->bhqk", qb, k[:, :, :hi].double().repeat_interleave(group, 1)) * scale
        logits = logits.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        out = torch.softmax(logits, -1) @ v[:, :, :hi].double().repeat_interleave(group, 1)
        if estimate is not None and picked is not None:
            for i in range(b_hi - b_lo):  # the rest of the store, per query, merged by LSE
                rest_out, rest_lse = estimate(q[:, :, b_lo + i], torch.where(picked >= 0, picked - sink, -1))  # store rows
                top = torch.maximum(lse[:, :, i], rest_lse.double())
                wa, wb = torch.exp(lse[:, :, i] - top), torch.exp(rest_lse.double() - top)
                out[:, :, i] = (out[:, :, i] * wa[..., None] + rest_out.double() * wb[..., None]) / (wa + wb)[..., None]
                lse[:, :, i] = top + torch.log(wa + wb)
        outs.append(out)
        lses.append(lse)
    if e_lo >= e_hi:
        return torch.cat(outs, 2), torch.cat(lses, 2)
    if not outs:  # every query of the chunk is exact
        return exact_part
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)  # the blocks' queries lo .. hi - 1
    a, b = e_lo - lo, e_hi - lo  # the exact ones replace theirs (b > hi - lo: they ended the chunk)
    return (torch.cat([out[:, :, :a], exact_part[0], out[:, :, b:]], 2),
            torch.cat([lse[:, :, :a], exact_part[1], lse[:, :, b:]], 2))


def _exact_positions(prompt_end, lo, hi, tail):
    """The positions of chunk ``lo..hi-1`` that attend exactly, by the rule of
    :attr:`lckv.cache.LckvCache.prompt_end`, written out independently of the engine's helper."""
    if not tail:
        return (0, 0)
    if prompt_end is None:  # unknown: the chunk's own last queries
        return (max(lo, hi - tail), hi)
    return (max(lo, prompt_end - tail), min(hi, prompt_end))


@pytest.mark.parametrize("index", ["exact", "flat"])  # per-block select loop; one batched index search
@pytest.mark.parametrize("chunk,block,select", [(16, 4, 5), (9, 16, 3), (7, 3, 11)])
@pytest.mark.parametrize("estimate_rest", [False, True])
@pytest.mark.parametrize("per_query,per_head", [(0, False), (2, False), (1, True)])
@pytest.mark.parametrize("tail,prompt_end", [(0, None), (5, None), (5, 90), (12, 97), (4, 40)])
def test_one_layer_against_masked_dense_softmax(chunk, block, select, index, estimate_rest, per_query, per_head, tail,
                                                prompt_end):
    gen, seed = fresh_generator()
    batch, kv_heads, group, head_dim, n = 2, 2, 3, 16, 97
    sink, window = 2, 6
    k = torch.randn(batch, kv_heads, n, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, n, head_dim, generator=gen)
    q = torch.randn(batch, kv_heads * group, n, head_dim, generator=gen)
    policy = resolve_policy("retrieval", sink=sink, window=window, budget=1.0, index=index, group_rank="logits",
                            estimate_rest=estimate_rest, prefill_estimate=estimate_rest, cluster_size=4, exact_above=1.0, prefill="retrieval",
                            prefill_select=select, prefill_block=block, prefill_per_query=per_query, prefill_per_head=per_head,
                            prefill_exact_tail=tail)
    layer = LckvCacheLayer(policy, 0)
    # 90: queries after the prompt end in its chunk; 97: a tail over two chunks; 40: chunks after the prompt
    layer.prompt_end = prompt_end
    scale = head_dim ** -0.5
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        layer.update(k[:, :, lo:hi], v[:, :, lo:hi])
        if layer.store is None or layer.store.length == 0:
            continue
        out, lse = attend_chunk_with_selection(q[:, :, lo:hi], layer, None, policy, scale)
        estimate = None
        if estimate_rest and layer.selection is not None:  # the decode step's estimate, one query at a time
            state = layer.selection.estimate
            estimate = lambda q_i, rows: state.attend(layer.view(), q_i, rows, scale)  # noqa: E731
        ref_out, ref_lse = _reference_chunk(q, k, v, lo, hi, sink, window, select, block, scale, estimate, per_query,
                                            per_head, _exact_positions(prompt_end, lo, hi, tail))
        torch.testing.assert_close(out, ref_out.float(), atol=ATTN_ATOL, rtol=ATTN_RTOL, msg=f"seed {seed}, chunk {lo}")
        torch.testing.assert_close(lse, ref_lse.float(), atol=ATTN_ATOL, rtol=ATTN_RTOL, msg=f"seed {seed}, chunk {lo}")
    assert layer.selection is not None and layer.store.length > select, "the selection path must have run"


def _prefill_tail_policy():
    # a selection smaller than the store, so that exact and selected queries differ
    return dict(sink=2, window=8, budget=24, prefill="retrieval", prefill_select=6, prefill_block=4,
                prefill_exact_tail=5)


def test_generate_announces_the_prompt_end():
    """generate() tells the cache where the prompt ends, so only the prompt's last
    ``prefill_exact_tail`` positions attend exactly: the same logits and the same stored KV as forward
    calls on a cache told the same, and not the KV of a cache left without it (every chunk's tail
    exact). The last layer's stored values carry the first layer's outputs at each chunk's tail,
    which the announcement changes directly; the last logits only through later layers, sometimes
    by little more than the tolerance."""
    gen, seed = fresh_generator()
    model = _tiny("llama", 2, seed)
    ids = torch.randint(3, model.config.vocab_size, (1, 83), generator=gen)
    lckv.enable(model, "retrieval", **_prefill_tail_policy())
    cache = lckv.new_cache(model)
    got = _generate(model, ids, torch.ones_like(ids), past_key_values=cache, prefill_chunk_size=16)
    assert cache.prompt_end == ids.shape[1]
    prompt = ids.shape[1]

    def forward_calls(prompt_end):
        manual = lckv.new_cache(model)
        manual.prompt_end = prompt_end
        with torch.no_grad():
            for lo in range(0, prompt, 16):
                logits = model(ids[:, lo:lo + 16], past_key_values=manual, use_cache=True).logits[:, -1]
        return logits, manual.layers[-1].kept_keys_values()[1][:, :, :prompt]

    told_logits, told_values = forward_calls(prompt)
    got_values = cache.layers[-1].kept_keys_values()[1][:, :, :prompt]
    torch.testing.assert_close(got[1][:, 0], told_logits, atol=LOGIT_ATOL, rtol=LOGIT_RTOL, msg=f"seed {seed}")
    torch.testing.assert_close(got_values, told_values, atol=LOGIT_ATOL, rtol=LOGIT_RTOL, msg=f"seed {seed}")
    _, unknown_values = forward_calls(None)
    assert (unknown_values - got_values).abs().max() > 100 * LOGIT_ATOL, \
        f"seed {seed}: the announcement changed nothing"
    lckv.disable(model)
    assert "_prefill" not in vars(model)


def test_prompt_end_checks_its_value():
    model = _tiny("llama", 2, 0)
    lckv.enable(model, "retrieval", **_prefill_tail_policy())
    cache = lckv.new_cache(model)
    with pytest.raises(TypeError, match="prompt_end must be an int or None"):
        cache.prompt_end = True
    with torch.no_grad():
        model(torch.arange(3, 13)[None], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="prompt_end must be past the 10 slots"):
        cache.prompt_end = 10
    cache.prompt_end = 11
    assert all(layer.prompt_end == 11 for layer in cache.layers)
    cache.prompt_end = None
    assert cache.prompt_end is None
    lckv.disable(model)


@pytest.fixture(scope="module")
def stories(stories260k_files):
    from lckv.research.llama2c import load

    return load(*stories260k_files)[0]


@pytest.mark.parametrize("policy", ["retrieval", "quest", "block"])
def test_prefill_leaves_every_layer_ready_to_decode(stories, policy):
    model = stories
    gen, seed = fresh_generator()
    lengths = (700, 530)  # batch 2, left padding
    ids = torch.zeros(2, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, model.config.vocab_size, (n,), generator=gen)
        mask[row, -n:] = 1
    lckv.enable(model, policy, sink=4, window=32, budget=64, prefill="retrieval", prefill_select=48, prefill_block=16)
    cache = lckv.new_cache(model)
    with torch.no_grad():
        for lo in range(0, ids.shape[1], 128):
            logits = model(ids[:, lo:lo + 128], attention_mask=mask[:, :lo + 128], past_key_values=cache,
                           use_cache=True).logits
            assert torch.isfinite(logits).all(), f"seed {seed}, chunk at {lo}"
    for layer in cache.layers:
        assert layer.selection is not None, "the state must be built during prefill"
        if policy == "retrieval":
            rows = layer.store.length
            assert all(index.size == rows for index in layer.selection.heads), f"seed {seed}: indexes miss rows"
            assert layer.selection.estimate.rows == rows and layer.selection.estimate_rows > rows // 2, f"seed {seed}"
    before = [(id(getattr(layer.selection, "estimate", None)), layer.store.length) for layer in cache.layers]
    builds = []
    for policy_object in {id(layer.policy): layer.policy for layer in cache.layers}.values():
        policy_object.build = lambda view, build=policy_object.build: builds.append(1) or build(view)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        logits = model(ids[:, -1:], attention_mask=step_mask, past_key_values=cache, use_cache=True).logits
    assert torch.isfinite(logits).all()
    assert not builds, "the first decode step rebuilt a state"
    for (estimate, rows), layer in zip(before, cache.layers):
        assert id(getattr(layer.selection, "estimate", None)) == estimate, "the first decode step rebuilt the estimate"
        assert layer.store.length - rows <= 1, "the prefill left a chunk for the first decode step to offload"
    lckv.disable(model)


@pytest.mark.parametrize("probe", [0, 2])
def test_per_query_picks_search_with_the_policy_probe(probe):
    """Each query head's own picks are its index search with ``probe_supers =
    prefill_query_probe`` and the ``prefill_query_scan`` pool, query head by query head (here over
    super-clusters: 4 keys per cluster, 8 clusters per super)."""
    gen, seed = fresh_generator()
    batch, kv_heads, group, head_dim, n, q_len = 1, 2, 2, 8, 1200, 20
    policy = resolve_policy("retrieval", sink=2, window=6, budget=1.0, prefill="retrieval", prefill_select=8,
                            prefill_block=4, prefill_per_query=3, prefill_query_scan=24, prefill_query_probe=probe,
                            index_params={"cluster_size": 4, "segment": 128, "super_size": 8, "super_span": 64},
                            cluster_size=4)
    layer = LckvCacheLayer(policy, 0)
    for rows in (n, q_len):  # the second chunk spills the first to the store
        layer.update(*torch.randn(2, batch, kv_heads, rows, head_dim, generator=gen))
    queries = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=gen)
    view = layer.view()
    state = policy.build(view)
    assert all(ix._core.n_supers > 0 for ix in state.heads), "the test needs super-clusters"
    rows = policy._per_query_rows(state, view, queries, m=q_len // 4)  # [batch, kv_heads, m, 4 * group * 3]
    for h, index in enumerate(state.indexes[0].heads):
        per_head = queries[0, h * group:(h + 1) * group].transpose(0, 1).reshape(-1, head_dim).contiguous()
        _, ids, _ = index.search(per_head, 3, scan=24 / 3, probe_supers=probe)
        assert torch.equal(rows[0, h].reshape(-1), ids.reshape(-1)), f"seed {seed}, kv head {h}"


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("share", [0.25, 0.6])
def test_per_query_share_searches_the_least_aligned_queries(share, per_head):
    """prefill_query_share < 1: in each block of queries only the ceil(share x searches) whose query
    is least aligned (cosine) with the block's mean query (that head's, or the group's summed means)
    search; their rows are their own top-k, every other search's rows are -1; the padded
    positions of a last partial block never search. Oracle: the cosines and flat top-k in float64."""
    gen, seed = fresh_generator()
    batch, kv_heads, group, head_dim, block, q_len, k = 2, 2, 3, 8, 4, 10, 3
    policy = resolve_policy("retrieval", sink=2, window=6, budget=1.0, prefill="retrieval", prefill_select=8,
                            prefill_block=block, prefill_per_query=k, prefill_per_head=per_head,
                            prefill_query_share=share, index="exact")
    layer = LckvCacheLayer(policy, 0)
    for rows in (200, q_len):  # the second chunk spills the first to the store
        layer.update(*torch.randn(2, batch, kv_heads, rows, head_dim, generator=gen))
    view = layer.view()
    queries = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=gen)
    m = -(-q_len // block)
    means = torch.randn(batch, kv_heads * group, m, head_dim, generator=gen)
    got = policy._per_query_rows(policy.build(view), view, queries, m, means)
    per_position = group if per_head else 1
    assert got.shape == (batch, kv_heads, m, block * per_position * k)
    got = got.view(batch, kv_heads, m, block, per_position, k)
    keys = view.keys.double()
    for b in range(batch):
        for h in range(kv_heads):
            heads = slice(h * group, (h + 1) * group)
            for j in range(m):
                units = []  # (cosine, position, head in group, query)
                for t in range(j * block, min(q_len, (j + 1) * block)):
                    for g in range(per_position):
                        q = queries[b, heads, t].double()
                        q = q[g] if per_head else q.sum(0)
                        ref = means[b, heads, j].double()
                        ref = ref[g] if per_head else ref.sum(0)
                        units.append((float(torch.nn.functional.cosine_similarity(q, ref, dim=0)), t, g, q))
                n_sel = math.ceil(share * block * per_position)
                ranked = sorted(units, key=lambda u: u[0])
                if n_sel < len(ranked) and ranked[n_sel][0] - ranked[n_sel - 1][0] < 1e-5:
                    continue  # float32 vs float64 could order the boundary either way
                chosen = ranked[:n_sel]
                searched = set()
                for _, t, g, q in chosen:
                    want = (keys[b, h] @ q).topk(k).indices
                    assert torch.equal(got[b, h, j, t - j * block, g].sort().values, want.sort().values), f"seed {seed}"
                    searched.add((t, g))
                for t in range(j * block, (j + 1) * block):
                    for g in range(per_position):
                        if (t, g) not in searched:
                            assert bool((got[b, h, j, t - j * block, g] == -1).all()), f"seed {seed}: {t} {g} searched"


@pytest.mark.parametrize("settings,match", [
    (dict(prefill="chunked"), "prefill must be one of"),
    (dict(prefill_select=0), "prefill_select must be an int >= 1"),
    (dict(prefill_block=2.5), "prefill_block must be an int"),
    (dict(prefill_block=-3), "prefill_block must be an int >= 1"),
    (dict(prefill_estimate=True, estimate_rest=False), "prefill_estimate needs estimate_rest"),
    (dict(prefill_per_query=-1), "prefill_per_query must be >= 0"),
    (dict(prefill_query_scan=1.5), "prefill_query_scan must be an int"),
    (dict(prefill_query_probe=-2), "prefill_query_probe must be >= 0"),
    (dict(prefill_query_share=0.0), "prefill_query_share must be a fraction in"),
    (dict(prefill_query_share=1.5), "prefill_query_share must be a fraction in"),
    (dict(search_params={"probe_supers": 4}), "probe_supers is set per use"),
    (dict(prefill_exact_tail=-1), "prefill_exact_tail must be an int >= 0"),
    (dict(prefill_exact_tail=True), "prefill_exact_tail must be an int"),
])
def test_bad_prefill_settings_raise(settings, match):
    with pytest.raises(PolicyConfigError, match=match):
        resolve_policy("retrieval", **settings)


def test_snapkv_refuses_retrieval_prefill():
    with pytest.raises(PolicyConfigError, match="SnapKVPolicy.prefill must be 'exact'"):
        resolve_policy("snapkv", prefill="retrieval")
    assert math.isclose(resolve_policy("snapkv").budget, 0.05)


# ----------------------------------------------------------------------------- 16-bit host KV
@pytest.mark.parametrize("host_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("policy,settings", [
    ("full", dict(sink=3, window=7)),
    ("retrieval", dict(sink=3, window=7, budget=24, prefill="retrieval", prefill_select=16, prefill_block=4)),
    ("retrieval", dict(sink=3, window=7, budget=24, index="flat")),  # the unfused decode path
    ("quest", dict(sink=3, window=7, budget=24)),
])
def test_host_dtype_store_equals_an_fp32_store_of_rounded_rows(host_dtype, policy, settings, monkeypatch):
    """Oracle: a 16-bit host store must behave as an fp32 store holding the same rounded keys and
    values (same selections, queries kept fp32), and hold half the bytes. The prompt goes in
    chunks, then 16 teacher-forced decode steps."""
    gen, seed = fresh_generator()
    model = _tiny("qwen2", 2, seed)
    ids = torch.randint(3, 97, (1, 136), generator=gen)
    half = getattr(torch, host_dtype)

    def run(dtype):
        lckv.enable(model, policy, host_dtype=dtype, **settings)
        cache = lckv.new_cache(model)
        with torch.no_grad():
            steps = [model(ids[:, lo:lo + 40], past_key_values=cache, use_cache=True).logits[:, -1]
                     for lo in range(0, 120, 40)]
            steps += [model(ids[:, p:p + 1], past_key_values=cache, use_cache=True).logits[:, -1]
                      for p in range(120, 136)]
        lckv.disable(model)
        return torch.stack(steps, 1), cache

    logits, cache = run(host_dtype)
    append = lckv.cache.HostKVStore.append
    monkeypatch.setattr(lckv.cache.HostKVStore, "append",
                        lambda self, k, v: append(self, k.to(half).float(), v.to(half).float()))
    ref_logits, ref_cache = run(None)
    assert cache.layers[0].store.keys.dtype == half and ref_cache.layers[0].store.keys.dtype == torch.float32
    assert 2 * cache.memory_report()["offloaded_bytes"] == ref_cache.memory_report()["offloaded_bytes"] > 0
    # every kernel converts 16-bit rows exactly and then runs the float32 arithmetic (the fused
    # decode step, sparse attention, the estimate and the group ranking read the 16-bit store in
    # place): the same numbers, bit for bit
    torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0, msg=f"seed {seed}")


def test_bad_host_dtype_raises():
    with pytest.raises(PolicyConfigError, match="host_dtype must be one of"):
        resolve_policy("retrieval", host_dtype="int8")


def test_unique_rows_keeps_each_row_once():
    gen, seed = fresh_generator()
    picks = torch.randint(-1, 40, (2, 3, 5, 60), generator=gen)  # many repeats and -1s
    got = unique_rows(picks)
    assert got.shape == picks.shape
    for row, out in zip(picks.reshape(-1, 60), got.reshape(-1, 60)):
        kept = out[out >= 0]
        assert kept.tolist() == sorted(set(row[row >= 0].tolist())), f"seed {seed}"
