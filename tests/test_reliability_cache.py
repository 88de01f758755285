"""Reliability of the LckvCache: failed calls, threads, the host-memory limit, save and load.

Oracle: the uninterrupted run -- the same model, the same calls, no failure, no restart -- on
tiny random decoders (fp32). A failed call must leave the cache as if it never ran, and a cache
loaded from a file must continue as the saved one does; in both cases the same deterministic
code runs on the same state, so the logits must agree to fp32 rounding (they agree bit for bit
here; the bound leaves room for kernels that reorder a sum). Each failure is injected where the
test says, and each test checks that the injection was reached.
"""
import contextlib
import os
import threading

import pytest
import torch

import lckv
from kernel_oracles import fresh_generator
from lckv.cache import ConcurrentCacheUseError, HostBudget, HostKVStore, HostMemoryLimitError, LckvCacheLayer
from lckv.persist import CacheFileError, CacheMismatchError, load_cache
from lckv.policies import PolicyConfigError, resolve_policy
from tiny_models import tiny_decoder

# end-to-end fp32 logits of two runs of the same code on the same state: rounding at most
LOGIT_ATOL, LOGIT_RTOL = 1e-5, 1e-5
CHUNKS = (40, 40, 20)  # the prompt, fed in chunks (forward calls on one cache)
STEPS = 8  # teacher-forced decode steps after it
CLUSTERED = dict(index_params=dict(cluster_size=4, segment=32))  # the ClusterIndex clusters at this size
SELECTING = dict(sink=3, window=7, budget=24)
POLICIES = {
    "full": ("full", dict(sink=3, window=7)),
    "streaming": ("streaming", dict(sink=3, window=7)),
    "retrieval-cluster": ("retrieval", dict(**SELECTING, **CLUSTERED)),
    "retrieval-flat": ("retrieval", dict(**SELECTING, index="flat")),
    "retrieval-prefill": ("retrieval", dict(**SELECTING, **CLUSTERED, prefill="retrieval", prefill_select=16,
                                            prefill_block=4)),
    "quest": ("quest", dict(**SELECTING, page_size=4)),
    "snapkv": ("snapkv", dict(**SELECTING, observation=5)),
    # its on_offload reads the recent queries: the cache keeps its state instead of replaying it
    "block": ("block", dict(**SELECTING, block_size=4, representatives=2, observation=5)),
    "retrolm": ("retrolm", dict(**SELECTING, page_size=4)),
}
SELECTION_POLICIES = [name for name in POLICIES if name not in ("full", "streaming")]
HOOKS = ("on_offload", "select")  # the selection hooks a test makes fail
# save/load also replays a k-means estimate (clusters=6), whose samples come from the global RNG
SAVED_POLICIES = {**POLICIES, "retrieval-kmeans": ("retrieval", dict(**SELECTING, index="flat", clusters=6))}


class InjectedError(RuntimeError):
    """The failure a test injects."""


def _model(seed: int):
    torch.manual_seed(seed)
    return tiny_decoder("qwen2", 2, max_positions=512)


def _calls(gen) -> list[torch.Tensor]:
    """The input ids of each call: the prompt's chunks, then one token per decode step."""
    ids = torch.randint(3, 97, (1, sum(CHUNKS) + STEPS), generator=gen)
    bounds = [0]
    for n in CHUNKS + (1,) * STEPS:
        bounds.append(bounds[-1] + n)
    return [ids[:, lo:hi] for lo, hi in zip(bounds, bounds[1:])]


def _enabled(model, name):
    policy, settings = SAVED_POLICIES[name]
    lckv.enable(model, policy, **settings)
    return lckv.new_cache(model)


def _step(model, cache, ids=None, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True, **inputs).logits[:, -1]


@contextlib.contextmanager
def _raising(owner, name: str, nth: int = 1, error: type[BaseException] = InjectedError):
    """``owner.name`` raises ``error`` on its ``nth`` call inside the block; yields the calls so far."""
    original = getattr(owner, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == nth:
            raise error(f"injected into {name}, call {nth}")
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(owner, name, failing)
        yield calls


def _state(cache) -> list:
    """What a layer holds, as plain data, to compare caches."""
    return [(layer.is_initialized, layer.total, layer.evicted, layer.store.length if layer.store is not None else None,
             layer.resident_length(), layer.log.build is not None, len(layer.log.offloads)) for layer in cache.layers]


# ----------------------------------------------------------------------------- A: failed calls
def _fail_layer(model, cache, ids):
    """The last decoder layer raises: layer 0 has appended its K/V (and built its state) by then."""
    with _raising(model.model.layers[-1], "forward") as calls:
        with pytest.raises(InjectedError):
            _step(model, cache, ids)
    assert calls, "the injected layer was not reached"


def _fail_interrupt(model, cache, ids):
    with _raising(model.model.layers[-1], "forward", error=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            _step(model, cache, ids)


def _fail_nan(model, cache, ids):
    embeds = model.get_input_embeddings()(ids).detach()
    embeds[0, -1, 5] = float("nan")
    with pytest.raises(ValueError, match="layer 0: the new key_states hold NaN or inf"):
        _step(model, cache, inputs_embeds=embeds)


def _fail_shape(model, cache, ids):
    with pytest.raises(ValueError, match=r"layer 0: key_states of shape \(2,"):
        _step(model, cache, ids.expand(2, -1))


@pytest.mark.parametrize("name,failure,at", [(name, _fail_layer, at) for name in POLICIES for at in (2, 5)] + [
    ("full", _fail_interrupt, 6), ("retrieval-cluster", _fail_interrupt, 6), ("full", _fail_nan, 4),
    ("quest", _fail_nan, 4), ("retrieval-prefill", _fail_nan, 4), ("streaming", _fail_shape, 7),
    ("retrieval-flat", _fail_shape, 7)])
def test_a_failed_call_changes_nothing(name, failure, at):
    """Call ``at`` (2: the prompt's last chunk, else a decode step) fails once, then runs again;
    every logit and the final layout equal those of the run without the failure."""
    gen, seed = fresh_generator()
    model, calls = _model(seed), _calls(gen)
    cache = _enabled(model, name)
    ref = torch.stack([_step(model, cache, ids) for ids in calls])
    ref_state = _state(cache)
    cache = lckv.new_cache(model)
    got = []
    for i, ids in enumerate(calls):
        if i == at:
            before = _state(cache)
            failure(model, cache, ids)
            assert _state(cache) == before, f"seed {seed}: the failed call changed the cache"
        got.append(_step(model, cache, ids))
    torch.testing.assert_close(torch.stack(got), ref, atol=LOGIT_ATOL, rtol=LOGIT_RTOL, msg=f"seed {seed}")
    assert _state(cache) == ref_state, f"seed {seed}"


@pytest.mark.parametrize("name,hook,at", [(name, hook, 4) for name in SELECTION_POLICIES for hook in HOOKS]
                         + [("retrieval-prefill", "on_offload", 2)])
def test_a_failing_selection_hook_changes_nothing(name, hook, at, monkeypatch):
    """The policy's hook fails at layer 1 of call ``at`` (a decode step; 2: the prompt's last
    chunk, whose state a retrieval prefill built). ``on_offload`` fails in the call's commit, after
    layer 0's index and estimate took the call's rows: the rollback remakes layer 0's state from
    its log (checked: the replay ran). ``select`` (the index search, or the fused step that holds
    it) fails inside the call, which changed no state."""
    gen, seed = fresh_generator()
    model, calls = _model(seed), _calls(gen)
    cache = _enabled(model, name)
    ref = torch.stack([_step(model, cache, ids) for ids in calls])
    policy = model.lckv_binding.policy
    replays = []
    replay = LckvCacheLayer.replay_selection
    monkeypatch.setattr(LckvCacheLayer, "replay_selection", lambda self: replays.append(self.layer_idx) or replay(self))
    cache = lckv.new_cache(model)
    got = []
    for i, ids in enumerate(calls):
        if i == at:
            before = _state(cache)
            names = [hook] if hook == "on_offload" else ["select", "fused_step"]
            with contextlib.ExitStack() as stack:  # the 2nd call of the hook this call makes: layer 1's
                reached = [stack.enter_context(_raising(policy, n, nth=2)) for n in names]
                with pytest.raises(InjectedError):
                    _step(model, cache, ids)
            assert any(len(r) >= 2 for r in reached), f"the {hook} failure was not reached"  # (+ the replay's calls)
            assert _state(cache) == before, f"seed {seed}: the failed call changed the cache"
            if hook == "on_offload":
                assert replays[:1] == [0], "layer 0's state should have been remade"
        got.append(_step(model, cache, ids))
    torch.testing.assert_close(torch.stack(got), ref, atol=LOGIT_ATOL, rtol=LOGIT_RTOL, msg=f"seed {seed}")


@pytest.mark.parametrize("policy", ["quest", "retrieval"])
def test_a_failure_after_a_window_shrinking_chunk_remakes_the_state(policy):
    """A chunk that crosses the budget shrinks the resident window (16 -> 24 // 2 - 3 = 9): its
    update offloads rows into the already built selection state inside the call; when the call
    then fails, the state is remade from the log and the run continues as without the failure."""
    gen, seed = fresh_generator()
    model = _model(seed)
    settings = dict(sink=3, window=16, budget=24, prefill="retrieval", prefill_select=2, prefill_block=4)
    settings.update(dict(page_size=4) if policy == "quest" else CLUSTERED)
    ids = torch.randint(3, 97, (1, 41), generator=gen)
    # 21 tokens: 3 rows offloaded; 2 more: the state is built (3 rows > prefill_select); 10 more: 33 > 24
    calls = [ids[:, :21], ids[:, 21:23], ids[:, 23:33]] + [ids[:, p:p + 1] for p in range(33, 41)]
    lckv.enable(model, policy, **settings)
    cache = lckv.new_cache(model)
    ref = torch.stack([_step(model, cache, c) for c in calls])
    cache = lckv.new_cache(model)
    got = [_step(model, cache, c) for c in calls[:2]]
    layer0 = cache.layers[0]
    state, offloads = layer0.selection, len(layer0.log.offloads)
    assert state is not None, "the chunks should have built the state"
    with _raising(model.model.layers[-1], "forward"):
        with pytest.raises(InjectedError):
            _step(model, cache, calls[2])
    assert len(layer0.log.offloads) == offloads, f"seed {seed}: the log was not rolled back"
    assert layer0.selection is not state, "layer 0's state should have been remade"
    got += [_step(model, cache, c) for c in calls[2:3]]
    # inside the call: 15 - (9 - 1) = 7 rows; its commit: 18 - 8 = 10
    assert [n for n, _, _ in layer0.log.offloads[offloads:]] == [7, 10], f"seed {seed}: {layer0.log.offloads}"
    got += [_step(model, cache, c) for c in calls[3:]]
    torch.testing.assert_close(torch.stack(got), ref, atol=LOGIT_ATOL, rtol=LOGIT_RTOL, msg=f"seed {seed}")


def test_a_enable_wraps_forward_and_disable_removes_it():
    """The transaction wrapper keeps forward's signature (generate inspects it) and goes with disable."""
    import inspect

    gen, seed = fresh_generator()
    model = _model(seed)
    signature = inspect.signature(model.forward)
    _enabled(model, "full")
    _enabled(model, "quest")  # enabling again wraps once
    assert "forward" in vars(model) and inspect.signature(model.forward) == signature
    assert model.forward.lckv_previous is None  # not a wrapper of our wrapper
    lckv.disable(model)
    assert "forward" not in vars(model)


# ----------------------------------------------------------------------------- B: one thread
def test_b_a_second_thread_is_refused_and_changes_nothing(tmp_path):
    gen, seed = fresh_generator()
    model, calls = _model(seed), _calls(gen)
    cache = _enabled(model, "retrieval-cluster")
    ref = torch.stack([_step(model, cache, ids) for ids in calls])
    cache = lckv.new_cache(model)
    got = [_step(model, cache, ids) for ids in calls[:4]]
    inside, release = threading.Event(), threading.Event()
    layer = model.model.layers[-1]
    original = layer.forward

    def blocking(*args, **kwargs):  # the worker's call waits inside the model; any later call goes through
        if not inside.is_set():
            inside.set()
            assert release.wait(120), "the main thread never released the worker"
        return original(*args, **kwargs)

    result = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layer, "forward", blocking)
        worker = threading.Thread(target=lambda: result.append(_step(model, cache, calls[4])))
        worker.start()
        try:
            assert inside.wait(120), "the worker never entered the model"
            before = _state(cache)
            with pytest.raises(ConcurrentCacheUseError, match="one thread at a time"):
                _step(model, cache, calls[4])
            with pytest.raises(ConcurrentCacheUseError):
                cache.save(tmp_path / "busy.lckv")
            k = torch.randn(1, 2, 1, 12, generator=gen)
            with pytest.raises(ConcurrentCacheUseError):
                cache.update(k, k, 0)
            assert _state(cache) == before and not os.listdir(tmp_path)
        finally:
            release.set()
            worker.join(120)
    got += result + [_step(model, cache, ids) for ids in calls[5:]]
    torch.testing.assert_close(torch.stack(got), ref, atol=LOGIT_ATOL, rtol=LOGIT_RTOL, msg=f"seed {seed}")


# ----------------------------------------------------------------------------- C: host memory
def test_c_store_growth_past_the_limit_raises_before_allocating():
    """HostKVStore alone: a growth doubles while it fits, takes only the rows it needs near the
    limit (the old buffers count until the copy is done), and raises past it, unchanged."""
    gen, seed = fresh_generator()
    row = 2 * 2 * 8 * 4  # K and V, 2 heads, head_dim 8, float32
    limit = 1400
    store = HostKVStore(1, 2, 8, torch.float32, capacity=0)
    store.budget = HostBudget(lambda: limit, store.allocated_bytes)
    k, v = torch.randn(2, 1, 2, 9, 8, generator=gen)
    store.append(k[:, :, :4], v[:, :, :4])  # 0 -> 4 rows
    store.append(k[:, :, 4:5], v[:, :, 4:5])  # doubling to 8: 4 + 8 rows > 1400 B; 4 + 5 rows fit
    assert store.capacity == 5, f"expected the exact growth near the limit, got capacity {store.capacity}"
    buffers = store._k, store._v
    with pytest.raises(HostMemoryLimitError, match="max_host_bytes=1400") as err:
        store.append(k[:, :, 5:7], v[:, :, 5:7])
    assert (err.value.limit, err.value.in_use, err.value.requested) == (limit, 5 * row, 7 * row)
    assert isinstance(err.value, MemoryError)
    assert store.length == 5 and (store._k, store._v) == buffers
    assert torch.equal(store.keys, k[:, :, :5]) and torch.equal(store.values, v[:, :, :5]), f"seed {seed}"


@pytest.mark.parametrize("name", ["full", "retrieval-cluster", "quest"])
def test_c_host_limit_fails_each_growing_call_cleanly(name, monkeypatch):
    """Before every call the cache's limit is set to the bytes it holds: a call whose store must
    grow raises HostMemoryLimitError before allocating and changes nothing; the limit is then lifted
    and the call runs again. Every logit equals the unlimited run's."""
    gen, seed = fresh_generator()
    model, calls = _model(seed), _calls(gen)
    cache = _enabled(model, name)
    ref = torch.stack([_step(model, cache, ids) for ids in calls])
    allocations = []  # host buffers allocated (of at least one row)
    empty_host = lckv.cache.empty_host

    def counting(shape, dtype):
        if shape[2]:
            allocations.append(shape)
        return empty_host(shape, dtype)

    monkeypatch.setattr(lckv.cache, "empty_host", counting)
    cache = lckv.new_cache(model)
    got, refused = [], 0
    for ids in calls:
        cache.max_host_bytes = in_use = cache.host_bytes()
        before, allocated = _state(cache), len(allocations)
        try:
            got.append(_step(model, cache, ids))
            assert len(allocations) == allocated, "a store grew past the limit"
        except HostMemoryLimitError as err:
            refused += 1
            # in use at the refusal: what the cache held plus what the call added before it (recorded queries)
            assert err.limit == in_use <= err.in_use < err.in_use + err.requested
            assert len(allocations) == allocated, "the refused growth allocated"
            assert _state(cache) == before and cache.host_bytes() == in_use, f"seed {seed}: the cache changed"
            cache.max_host_bytes = None
            got.append(_step(model, cache, ids))
    assert refused >= 3, f"expected the stores to grow on several calls, {refused} refused"
    torch.testing.assert_close(torch.stack(got), ref, atol=LOGIT_ATOL, rtol=LOGIT_RTOL, msg=f"seed {seed}")


def test_c_limit_is_a_validated_policy_setting():
    assert resolve_policy("retrieval", max_host_bytes=1 << 30).max_host_bytes == 1 << 30
    for bad in (0, -5, 2.5, True, "1GB"):
        with pytest.raises(PolicyConfigError, match="max_host_bytes must be None"):
            resolve_policy("quest", max_host_bytes=bad)
    gen, seed = fresh_generator()
    model, calls = _model(seed), _calls(gen)
    lckv.enable(model, "full", sink=3, window=7, max_host_bytes=1000)
    cache = lckv.new_cache(model)
    assert cache.max_host_bytes == 1000
    with pytest.raises(HostMemoryLimitError, match="max_host_bytes=1000"):  # 40 tokens: 30 rows to offload
        _step(model, cache, calls[0])
    assert cache.get_seq_length() == 0 and not cache.layers[0].is_initialized


def test_c_host_bytes_count_the_index_and_estimate():
    gen, seed = fresh_generator()
    model, calls = _model(seed), _calls(gen)
    cache = _enabled(model, "retrieval-cluster")
    for ids in calls:
        _step(model, cache, ids)
    stores = sum(layer.store.allocated_bytes() for layer in cache.layers)
    state = sum(ix.memory_bytes() for layer in cache.layers for ix in layer.selection.heads)
    state += sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.selection.estimate.step_state())
    assert cache.host_bytes() >= stores + state > stores, f"seed {seed}"


# ----------------------------------------------------------------------------- D: save and load
def _greedy(model, cache, token, steps: int):
    logits = []
    for _ in range(steps):
        logits.append(_step(model, cache, token))
        token = logits[-1].argmax(-1, keepdim=True)
    return torch.stack(logits)


@pytest.mark.parametrize("name", list(SAVED_POLICIES))
def test_d_a_loaded_cache_continues_like_the_saved_one(name, tmp_path):
    """Prefill and a few decode steps, save; a new model instance with the same weights loads the
    file; greedy generation from both gives the same logits (and tokens)."""
    gen, seed = fresh_generator()
    model, calls = _model(seed), _calls(gen)
    cache = _enabled(model, name)
    for ids in calls:
        _step(model, cache, ids)
    path = tmp_path / "context.lckv"
    cache.save(path)
    assert os.listdir(tmp_path) == ["context.lckv"], "the temporary file must be gone"
    restarted = _model(seed)
    _enabled(restarted, name)
    loaded = load_cache(path, restarted)
    assert _state(loaded) == _state(cache), f"seed {seed}"
    for a, b in zip(cache.layers, loaded.layers):
        if a.store is not None:
            assert torch.equal(a.store.keys, b.store.keys) and torch.equal(a.store.values, b.store.values)
        if a.selection is not None and hasattr(a.selection, "heads"):
            assert [ix.size for ix in a.selection.heads] == [ix.size for ix in b.selection.heads]
    token = calls[-1][:, -1:]
    want, got = _greedy(model, cache, token, 16), _greedy(restarted, loaded, token, 16)
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=LOGIT_RTOL, msg=f"seed {seed}")


@pytest.fixture
def saved(tmp_path):
    """A model, its cache and the file it was saved to."""
    gen, seed = fresh_generator()
    model, calls = _model(seed), _calls(gen)
    cache = _enabled(model, "retrieval-cluster")
    for ids in calls:
        _step(model, cache, ids)
    path = tmp_path / "context.lckv"
    cache.save(path)
    return model, cache, path, seed


def _rewrite(path, edit):
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(edit(data)))


def _flip(offset):
    def edit(data):
        data[offset if offset >= 0 else len(data) + offset] ^= 0x10
        return data
    return edit


@pytest.mark.parametrize("edit,match", [
    (lambda data: data[:len(data) // 2], "is truncated"),
    (lambda data: data[:30], "is truncated"),
    (lambda data: data[:5], "not an lckv cache file"),
    (lambda data: data + b"\0", "is truncated or extended"),
    (_flip(-1), "is corrupt: the sha256"),
    (_flip(4000), "is corrupt: the sha256"),
    (_flip(0), "not an lckv cache file"),
    (_flip(10), "format version"),
])
def test_d_damaged_files_raise_cache_file_error(saved, edit, match):
    model, _, path, seed = saved
    _rewrite(path, edit)
    with pytest.raises(CacheFileError, match=match):
        load_cache(path, model)


def test_d_missing_file_names_the_path(saved, tmp_path):
    model = saved[0]
    missing = tmp_path / "nowhere.lckv"
    with pytest.raises(FileNotFoundError, match="nowhere.lckv") as err:
        load_cache(missing, model)
    assert err.value.filename == str(missing)


def test_d_a_file_for_another_model_or_policy_raises(saved):
    model, _, path, seed = saved
    other = _model(seed + 1)  # same geometry, other weights
    _enabled(other, "retrieval-cluster")
    with pytest.raises(CacheMismatchError, match="another model.*k_proj_sha256"):
        load_cache(path, other)
    policy, settings = POLICIES["retrieval-cluster"]
    lckv.enable(model, policy, **{**settings, "window": 9})
    with pytest.raises(CacheMismatchError, match="policy of layer 0.*window: saved 7, here 9"):
        load_cache(path, model)
    lckv.enable(model, "quest", **SELECTING)
    with pytest.raises(CacheMismatchError, match="name: saved 'retrieval', here 'quest'"):
        load_cache(path, model)
    lckv.disable(model)
    with pytest.raises(ValueError, match="call lckv.enable"):
        load_cache(path, model)


def test_d_a_failed_save_leaves_no_partial_file(saved, monkeypatch):
    """The write fails half-way (disk full): no temporary file remains, and the file that was at
    the path is untouched and still loads."""
    model, cache, path, seed = saved
    good = path.read_bytes()
    real_save = torch.save
    calls = []

    def failing(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first layer's record: the metadata is written by then
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(OSError, match="No space left"):
        cache.save(path)
    new_path = path.parent / "new.lckv"
    calls.clear()
    with pytest.raises(OSError, match="No space left"):
        cache.save(new_path)
    monkeypatch.undo()
    assert sorted(os.listdir(path.parent)) == ["context.lckv"], "a partial file was left"
    assert path.read_bytes() == good
    load_cache(path, model)


def test_d_save_inside_a_model_call_raises(saved, tmp_path):
    model, cache, _, seed = saved
    layer = model.model.layers[-1]
    original = layer.forward
    errors = []

    def saving(*args, **kwargs):
        with pytest.raises(RuntimeError, match="inside a model call") as err:
            cache.save(tmp_path / "inside.lckv")
        errors.append(err)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layer, "forward", saving)
        _step(model, cache, torch.tensor([[5]]))
    assert errors and not (tmp_path / "inside.lckv").exists()
