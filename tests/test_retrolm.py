"""RetroLM bookmarks (lckv.retrolm) and the retrolm policy, against the model itself with the
bookmark tokens inserted into the sequence under the paper's mask."""
import pytest
import torch

import lckv
from lckv.policies import PolicyConfigError, RetroLMPolicy
from lckv.retrolm import BookmarkFileError, Bookmarks, info_nce, load_bookmarks, page_scores
from tiny_models import tiny_decoder

BOOKMARK_TOKEN = 5


def inserted_run(model, ids: list[int], sink: int, page: int, query_last: int | None = None, queries=()):
    """The model over ``ids`` with a bookmark token after each complete page (pages of ``page``
    tokens after the first ``sink``) at the next position, bookmarks attending their page and
    themselves, normal tokens attending normal tokens only (causal by position); plus, with
    ``query_last``, a final bookmark over the last ``query_last`` tokens, and one bookmark per
    ``(first, end)`` position span of ``queries`` at position ``end``. Returns the output (hidden
    states of every layer), the rows of the normal tokens and the bookmark rows (queries last)."""
    n = len(ids)
    seq, pos, span = [], [], []  # span: None for a normal token, (first, last+1) positions for a bookmark
    for i, token in enumerate(ids):
        seq.append(token), pos.append(i), span.append(None)
        if i >= sink and (i - sink + 1) % page == 0:
            seq.append(BOOKMARK_TOKEN), pos.append(i + 1), span.append((i + 1 - page, i + 1))
    if query_last:
        seq.append(BOOKMARK_TOKEN), pos.append(n), span.append((n - query_last, n))
    for first, end in queries:
        seq.append(BOOKMARK_TOKEN), pos.append(end), span.append((first, end))
    size = len(seq)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for a in range(size):
        for b in range(size):
            if span[a] is None:
                mask[a, b] = span[b] is None and pos[b] <= pos[a]
            else:
                mask[a, b] = a == b or (span[b] is None and span[a][0] <= pos[b] < span[a][1])
    out = model(torch.tensor([seq]), position_ids=torch.tensor([pos]), attention_mask=mask[None, None],
                output_hidden_states=True)
    normal = [i for i in range(size) if span[i] is None]
    marks = [i for i in range(size) if span[i] is not None]
    return out, normal, marks


@pytest.fixture
def model():
    torch.manual_seed(0)
    return tiny_decoder("llama", 2, 512)


def test_bookmark_stream_equals_inserted_tokens(model):
    """Bookmarks.step through every layer == the model's own hidden states at inserted bookmark
    tokens; the normal tokens' logits equal the model without bookmarks (positions kept)."""
    sink, page, n = 4, 16, 70
    ids = torch.randint(2, 97, (1, n), generator=torch.Generator().manual_seed(1))
    out, normal, marks = inserted_run(model, ids[0].tolist(), sink, page)
    plain = model(ids, use_cache=True)
    torch.testing.assert_close(out.logits[0, normal], plain.logits[0], rtol=1e-4, atol=1e-4)
    pages = (n - sink) // page
    bookmarks = Bookmarks(model, token_id=BOOKMARK_TOKEN)
    h = bookmarks.start(1, pages)
    layers = model.config.num_hidden_layers
    for layer in range(layers):
        k = plain.past_key_values.layers[layer].keys[:, :, sink:sink + pages * page]
        v = plain.past_key_values.layers[layer].values[:, :, sink:sink + pages * page]
        shape = (1, k.shape[1], pages, page, k.shape[-1])
        positions = sink + (torch.arange(pages) + 1) * page
        _, _, h = bookmarks.step(layer, h, k.reshape(shape), v.reshape(shape), None, positions)
        want = out.hidden_states[layer + 1][0, marks] if layer + 1 < layers else None
        if want is None:  # after the last layer transformers reports the final norm's output
            h, want = model.model.norm(h), out.hidden_states[-1][0, marks]
        torch.testing.assert_close(h[0], want, rtol=1e-4, atol=1e-4)


def test_policy_page_scores_equal_inserted_tokens(model, monkeypatch):
    """At the first decode step every layer scores the complete pages with the bookmark keys and
    the query bookmark the inserted-token model gives (k_proj/q_proj of its hidden states)."""
    sink, page, n, window, budget = 4, 16, 70, 8, 40
    ids = torch.randint(2, 97, (1, n), generator=torch.Generator().manual_seed(2))
    policy = RetroLMPolicy(sink=sink, window=window, budget=budget, page_size=page)
    seen = []
    real = __import__("lckv.retrolm", fromlist=["page_scores"]).page_scores

    def spy(q, keys, scale):
        scores = real(q, keys, scale)
        seen.append(scores)
        return scores

    monkeypatch.setattr("lckv.retrolm.page_scores", spy)
    picked = []
    real_select = RetroLMPolicy.select
    monkeypatch.setattr(RetroLMPolicy, "select",
                        lambda self, *a, **k: picked.append((real_select(self, *a, **k), a[3])) or picked[-1][0])
    lckv.enable(model, policy)
    policy._module.embedding.data = model.model.embed_tokens.weight[BOOKMARK_TOKEN].clone()
    full = model.generate(ids, max_new_tokens=2, do_sample=False)
    layers = model.config.num_hidden_layers
    assert len(seen) == layers
    # first decode step: n + 1 slots, the resident window holds `window` recent tokens
    context = ids[0].tolist() + [int(full[0, n])]
    store = n + 1 - sink - window
    pages = store // page
    out, _, marks = inserted_run(lckv_off(model), context, sink, page, query_last=window)
    marks, query = marks[:pages], marks[-1]
    head_dim = model.config.head_dim
    for layer in range(layers):
        block = model.model.layers[layer]
        hidden = block.input_layernorm(out.hidden_states[layer][0])
        keys = block.self_attn.k_proj(hidden[marks]).view(pages, -1, head_dim).transpose(0, 1)[None]
        q = block.self_attn.q_proj(hidden[query]).view(1, -1, head_dim)
        want = page_scores(q, keys, head_dim ** -0.5)
        torch.testing.assert_close(seen[layer][..., :pages], want, rtol=1e-4, atol=1e-4)
        # the best pages by the oracle's scores (ties: recent first; the filling page last) are attended
        rows, n_select = picked[layer]
        assert torch.equal(rows, policy._best_rows(want, n_select, store))


def bookmark_stream(bookmarks, kv, spans):
    """Oracle: bookmarks over the position spans ``(first, end)`` (``end - first`` equal) through
    every layer, from each layer's keys/values ``kv`` of all positions; their queries and keys
    per layer."""
    out, h = [], bookmarks.start(1, len(spans))
    for layer, (keys, values) in enumerate(kv):
        rows = torch.stack([torch.arange(a, b) for a, b in spans])
        q, k, h = bookmarks.step(layer, h, keys[:, :, rows], values[:, :, rows], None,
                                 torch.tensor([b for _, b in spans]))
        out.append((q, k))
    return out


def test_retrieval_prefill_blocks_rank_pages_by_their_own_bookmarks(model, monkeypatch):
    """prefill="retrieval": in a chunk, each block's bookmark (over the page_size tokens up to its
    last query) scores the store's complete pages at every layer as a batch computation of the
    same bookmarks over the cache's keys and values does (the layer math itself is checked
    against the model above); decoding follows."""
    sink, page, window, chunk, block, n = 4, 16, 8, 50, 25, 150
    ids = torch.randint(2, 97, (1, n), generator=torch.Generator().manual_seed(6))
    policy = RetroLMPolicy(sink=sink, window=window, budget=60, page_size=page, prefill="retrieval",
                           prefill_select=20, prefill_block=block, prefill_exact_tail=0)
    seen = []
    real = __import__("lckv.retrolm", fromlist=["page_scores"]).page_scores
    monkeypatch.setattr("lckv.retrolm.page_scores", lambda *a: seen.append(real(*a)) or seen[-1])
    lckv.enable(model, policy)
    cache = lckv.new_cache(model)
    with torch.no_grad():
        for lo in range(0, n, chunk):
            model(ids[:, lo:lo + chunk], past_key_values=cache, use_cache=True)
    layers = model.config.num_hidden_layers
    assert len(seen) == 2 * (n // chunk - 1) * layers  # chunks 2 and 3 select (2 blocks each), every layer
    # the last chunk (tokens 100..149): 89 store rows = 5 complete pages; blocks end at tokens 125 and 150
    pages = (100 - sink - (window - 1)) // page
    kv = [layer.kept_keys_values() for layer in cache.layers]
    with torch.no_grad():
        page_side = bookmark_stream(policy._module, kv, [(sink + p * page, sink + (p + 1) * page) for p in range(pages)])
        block_side = bookmark_stream(policy._module, kv, [(109, 125), (134, 150)])
    for layer in range(layers):
        keys = page_side[layer][1].transpose(1, 2)
        for j in range(2):
            want = page_scores(block_side[layer][0][:, j], keys, policy._module.scaling)
            torch.testing.assert_close(seen[-2 * layers + 2 * layer + j], want, rtol=1e-4, atol=1e-4)
    assert not bool((want == want[..., :1]).all())  # the pages score differently at the last layer
    with torch.no_grad():  # a decode step on the prefilled cache: its query bookmark chains through the layers
        logits = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    assert len(seen) == 2 * (n // chunk - 1) * layers + layers and bool(torch.isfinite(logits).all())


def lckv_off(model):
    lckv.disable(model)
    return model


@pytest.mark.parametrize("kind,kv_heads", [("llama", 2), ("qwen2", 1)])
def test_covering_budget_decodes_as_full(kind, kv_heads):
    torch.manual_seed(3)
    model = tiny_decoder(kind, kv_heads, 512)
    ids = torch.randint(2, 97, (1, 200), generator=torch.Generator().manual_seed(4))
    want = model.generate(ids, max_new_tokens=10, do_sample=False)
    lckv.enable(model, "retrolm", page_size=16, budget=260)  # the budget covers the whole context
    got = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want)


def test_small_budget_attends_whole_pages(model, monkeypatch):
    """Selections are whole complete pages (the last one cut to the budget), never the filling one."""
    picks = []
    policy = RetroLMPolicy(window=8, budget=60, page_size=16)
    real = RetroLMPolicy.select

    def spy(self, state, view, q, n_select, scale=None):
        rows = real(self, state, view, q, n_select, scale)
        picks.append((rows, n_select, view.length))
        return rows

    monkeypatch.setattr(RetroLMPolicy, "select", spy)
    lckv.enable(model, policy)
    model.generate(torch.randint(2, 97, (1, 150), generator=torch.Generator().manual_seed(5)), max_new_tokens=4,
                   do_sample=False)
    assert picks
    for rows, n_select, length in picks:
        complete = length // 16 * 16
        assert rows.shape[-1] == n_select and bool((rows >= 0).all())
        assert int(rows.max()) < complete
        for head_rows in rows.reshape(-1, n_select):
            pages, counts = torch.unique(head_rows // 16, return_counts=True)
            assert len(pages) == -(-n_select // 16)
            assert int((counts < 16).sum()) <= 1  # only the last page taken is cut to the budget


def test_policy_settings_and_missing_bookmarks(tmp_path):
    with pytest.raises(PolicyConfigError, match="page_size"):
        RetroLMPolicy(page_size=0)
    with pytest.raises(RuntimeError, match="lckv.enable"):
        RetroLMPolicy()._bookmarks()
    torch.manual_seed(0)
    model = tiny_decoder("llama", 2)
    with pytest.raises(FileNotFoundError, match="no file"):
        lckv.enable(model, "retrolm", bookmarks=str(tmp_path / "absent.pt"))


def test_bookmark_file_round_trip_and_bad_files(model, tmp_path):
    bookmarks = Bookmarks(model)
    with torch.no_grad():
        for p in bookmarks.parameters():
            p.add_(torch.randn_like(p))
    path = bookmarks.save(tmp_path / "b.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["b.pt"]  # no temporary file left
    loaded = load_bookmarks(path, model)
    for (name, a), (_, b) in zip(bookmarks.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(BookmarkFileError, match="not a readable"):
        load_bookmarks(tmp_path / "cut.pt", model)
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(BookmarkFileError, match="not a lckv-retrolm"):
        load_bookmarks(tmp_path / "other.pt", model)
    torch.manual_seed(1)
    other = tiny_decoder("llama", 2)
    with pytest.raises(BookmarkFileError, match="another model.*q_proj_sha1"):
        load_bookmarks(path, other)


def test_corrupt_parameters_and_odd_payloads_are_refused(model, tmp_path):
    """A flipped byte inside a saved tensor still loads with torch.load: the checksum saved with
    the parameters refuses it; fingerprints and states of the wrong type are refused by name, not
    with AttributeError (found by benchmarks/fuzz.py)."""
    bookmarks = Bookmarks(model)
    data = bytearray(bookmarks.save(tmp_path / "b.pt").read_bytes())
    raw = bookmarks.embedding.detach().numpy().tobytes()
    at = bytes(data).find(raw)
    assert at > 0
    data[at + len(raw) // 2] ^= 0x40
    (tmp_path / "flip.pt").write_bytes(bytes(data))
    assert torch.load(tmp_path / "flip.pt", weights_only=True)["state"]  # torch itself does not notice
    with pytest.raises(BookmarkFileError, match="fail the checksum"):
        load_bookmarks(tmp_path / "flip.pt", model)
    good = torch.load(tmp_path / "b.pt", weights_only=True)
    for payload, message in [({**good, "fingerprint": "x"}, "another model"),
                             ({**good, "fingerprint": [1]}, "another model"),
                             ({**good, "state": [1]}, "dict of parameter tensors"),
                             ({**good, "state": {**good["state"], "embedding": 3}}, "dict of parameter tensors")]:
        torch.save(payload, tmp_path / "odd.pt")
        with pytest.raises(BookmarkFileError, match=message):
            load_bookmarks(tmp_path / "odd.pt", model)


def test_interrupted_save_leaves_no_file(model, tmp_path, monkeypatch):
    bookmarks = Bookmarks(model)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        bookmarks.save(tmp_path / "b.pt")
    assert list(tmp_path.iterdir()) == []


def test_info_nce_hand_computed():
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.5, 0.5, 3.0]])
    positive = torch.tensor([[True, False, False], [False, True, True]])
    row0 = -torch.log(torch.exp(torch.tensor(2.0)) / torch.exp(torch.tensor([2.0, 0.0, 1.0])).sum())
    e = torch.exp(torch.tensor([0.5, 0.5, 3.0]))
    row1 = -torch.log((e[1] + e[2]) / e.sum())
    torch.testing.assert_close(info_nce(scores, positive), (row0 + row1) / 2)
    torch.testing.assert_close(info_nce(scores * 2, positive, temperature=2.0), (row0 + row1) / 2)
    with pytest.raises(ValueError, match="at least one positive"):
        info_nce(scores, torch.zeros_like(positive))


class CharTokenizer:
    """One token per character (ids 2..96), so token spans equal character spans."""

    def encode(self, text, add_special_tokens=False):
        return [2 + ord(c) % 95 for c in text]


def test_example_pages_mark_the_gold_spans():
    from training.retrolm import example_from_text

    text = "x" * 300
    example = example_from_text(CharTokenizer(), text, [(40, 60), (150, 151)], page_size=16, sink=4)
    assert len(example.ids) == 300
    assert len(example.positive) == (300 - 16 - 4) // 16
    # tokens 40..59 lie in pages 2 and 3 (rows 36..67), token 150 in page 9 (rows 148..163)
    assert [p for p, pos in enumerate(example.positive) if pos] == [2, 3, 9]


def _toy_examples(seed: int, count: int = 3):
    """``count`` stage-1 examples of 150 random tokens, pages of 16 after a sink of 4, one gold page each."""
    from training.retrolm import PageExample

    gen = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        ids = torch.randint(2, 97, (150,), generator=gen).tolist()
        positive = [False] * ((150 - 16 - 4) // 16)
        positive[int(torch.randint(0, len(positive), (1,), generator=gen))] = True
        examples.append(PageExample(ids, positive))
    return examples


def test_stage1_training_reduces_the_loss_on_a_fixed_toy_set(model):
    from training.retrolm import evaluate, train_stage1

    examples = _toy_examples(7)
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    bookmarks, history = train_stage1(model, examples, examples, page_size=16, sink=4, epochs=8, lr=3e-3,
                                      progress=False)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert all(torch.equal(v, backbone[k]) for k, v in model.state_dict().items())  # the backbone stayed frozen
    again = evaluate(model, bookmarks, examples, 16, 4)
    assert again["loss"] == pytest.approx(history[-1]["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="need examples"):
        train_stage1(model, [], examples)


def test_stage1_low_rank_deltas_train_only_a_low_rank_change_and_merge(model):
    """rank=r: every projection weight moves by a matrix of rank <= r, biases stay, the embedding
    trains, the loss falls, and the result has the plain Bookmarks parameters (same names: the
    file format is unchanged and it round-trips)."""
    from training.retrolm import train_stage1

    examples = _toy_examples(int(torch.randint(0, 2**31, (1,))))
    start = Bookmarks(model).state_dict()
    bookmarks, history = train_stage1(model, examples, examples, page_size=16, sink=4, epochs=8, lr=3e-2,
                                      progress=False, rank=2)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    state = bookmarks.state_dict()
    assert sorted(state) == sorted(start)
    assert all(p.requires_grad for p in bookmarks.parameters())
    moved = set()
    for name, value in state.items():
        delta = (value - start[name]).double()
        if name.endswith(".weight"):
            assert torch.linalg.matrix_rank(delta, atol=1e-5 * float(start[name].abs().max())) <= 2, name
            if delta.abs().max() > 0:
                moved.add(name)
        elif name.endswith(".bias"):
            assert torch.equal(value, start[name]), name
    last = len(bookmarks.q) - 1  # the last layer's bookmark values feed nothing: no gradient
    assert moved == {f"{kind}.{layer}.weight" for kind in "qkv" for layer in range(last + 1)} - {f"v.{last}.weight"}
    assert not torch.equal(state["embedding"], start["embedding"])
    with pytest.raises(ValueError, match="rank"):
        train_stage1(model, examples, examples, rank=0, progress=False)


def test_stage1_low_rank_deltas_are_merged_when_training_fails(model, monkeypatch):
    """An error mid-training still leaves the caller's bookmarks plain (deltas merged, the usual
    parameter names), not half-parametrized."""
    import training.retrolm as stage1

    examples = _toy_examples(int(torch.randint(0, 2**31, (1,))))
    bookmarks = Bookmarks(model)
    names = sorted(bookmarks.state_dict())
    calls, real = [], stage1.stage1_loss

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > len(examples) + 1:  # the held-out pass, then one training step
            raise RuntimeError("stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(stage1, "stage1_loss", failing)
    with pytest.raises(RuntimeError, match="stopped"):
        stage1.train_stage1(model, examples, examples, page_size=16, sink=4, epochs=2, lr=3e-2, progress=False,
                            rank=2, bookmarks=bookmarks)
    assert sorted(bookmarks.state_dict()) == names
    assert not any(hasattr(linear, "parametrizations") for linear in [*bookmarks.q, *bookmarks.k, *bookmarks.v])


def test_stage1_anchor_pulls_the_parameters_toward_the_start(model):
    """anchor > 0 adds an L2 pull toward the initial parameters: the same run ends nearer the
    start than without it; a negative anchor is refused."""
    from training.retrolm import train_stage1

    examples = _toy_examples(int(torch.randint(0, 2**31, (1,))))
    start = Bookmarks(model).state_dict()

    def distance(anchor: float) -> float:
        bookmarks, _ = train_stage1(model, examples, examples, page_size=16, sink=4, epochs=3, lr=1e-2,
                                    progress=False, anchor=anchor)
        return sum(float(((v - start[k]) ** 2).sum()) for k, v in bookmarks.state_dict().items())

    free, pulled = distance(0.0), distance(10.0)
    assert 0 < pulled < 0.5 * free
    with pytest.raises(ValueError, match="anchor"):
        train_stage1(model, examples, examples, anchor=-1.0, progress=False)


@pytest.mark.parametrize("recalls,kept", [((0.2, 0.5, 0.3), 1), ((0.4, 0.3, 0.1), 0), ((0.1, 0.2, 0.3), 2),
                                          ((0.5, 0.5, 0.2), 0)])
def test_stage1_keep_best_returns_the_best_held_out_epoch(model, monkeypatch, recalls, kept):
    """keep_best: the bookmarks returned are those evaluated at the epoch with the best held-out
    recall (scripted here; the first of equals), epoch 0 being the untrained ones."""
    import training.retrolm as stage1
    from training.retrolm import PageExample, train_stage1

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    ids = torch.randint(2, 97, (150,), generator=gen).tolist()
    examples = [PageExample(ids, [True] + [False] * 7)]
    seen, real = [], stage1.evaluate

    def scripted(model, bookmarks, *args, **kwargs):
        seen.append({k: v.clone() for k, v in bookmarks.state_dict().items()})
        return {**real(model, bookmarks, *args, **kwargs), "recall": recalls[len(seen) - 1]}

    monkeypatch.setattr(stage1, "evaluate", scripted)
    bookmarks, history = train_stage1(model, examples, examples, page_size=16, sink=4, epochs=2, lr=3e-2,
                                      progress=False, keep_best=True)
    assert history[-1]["kept_epoch"] == kept
    assert any(not torch.equal(seen[0][k], seen[2][k]) for k in seen[0])  # training moved the bookmarks
    assert all(torch.equal(v, seen[kept][k]) for k, v in bookmarks.state_dict().items())
    seen.clear()
    bookmarks, history = train_stage1(model, examples, examples, page_size=16, sink=4, epochs=2, lr=3e-2,
                                      progress=False)
    assert "kept_epoch" not in history[-1]
    assert all(torch.equal(v, seen[2][k]) for k, v in bookmarks.state_dict().items())  # the last epoch's


def test_equal_page_scores_prefer_recent_pages():
    policy = RetroLMPolicy(page_size=2)
    scores = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [5.0, 1.0, 3.0, 1.0]]])
    rows = policy._best_rows(scores, 4, 9)  # 4 complete pages and row 8 still filling
    assert rows.tolist() == [[[4, 5, 6, 7], [0, 1, 4, 5]]]
    assert policy._best_rows(scores, 9, 9).tolist() == [[list(range(9))] * 2]  # the filling page taken last


# ----------------------------------------------------------------------------------- stage 2
def _answer_examples(n: int, prompt: int, answer: int, seed: int):
    from training.retrolm import AnswerExample

    gen = torch.Generator().manual_seed(seed)
    return [AnswerExample(torch.randint(2, 97, (prompt,), generator=gen).tolist(),
                          torch.randint(2, 97, (answer,), generator=gen).tolist()) for _ in range(n)]


def test_stage2_loss_and_gradients_equal_the_model_when_the_selection_covers(model):
    """With prefill_select covering the store, stage 2's loss path (prompt prefilled through the
    LckvCache without gradients, the answer teacher forced with them) gives the plain model's
    loss and gradients for the same split (prompt under no_grad, answer with gradients): against
    the plain model in float64, its gradients err at most 2x what the plain fp32 model's do."""
    import copy

    from transformers import DynamicCache
    from training.retrolm import stage2_loss

    example = _answer_examples(1, 281, 20, seed=5)[0]

    def plain(m):
        cache = DynamicCache()
        with torch.no_grad():
            m(torch.tensor([example.prompt_ids[:-1]]), past_key_values=cache, use_cache=True)
        forced = torch.tensor([example.prompt_ids[-1:] + example.answer_ids[:-1]])
        logits = m(forced, past_key_values=cache, use_cache=True).logits[0]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(example.answer_ids))
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in m.named_parameters()}

    gold_loss, gold = plain(copy.deepcopy(model).double())
    want_loss, want = plain(copy.deepcopy(model))
    lckv.enable(model, "retrolm", page_size=16, window=32, budget=400, prefill="retrieval", prefill_select=4096)
    got = stage2_loss(model, example, chunk=64)
    got.backward()
    assert float(got.detach()) == pytest.approx(gold_loss, rel=1e-5)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        ours, theirs = (float((g.double() - gold[name]).norm()) for g in (p.grad, want[name]))
        # normwise (the max of one element is noisy at fp32 roundoff), plus ~8 fp32 eps of the norm
        assert ours <= 2 * theirs + 1e-6 * float(gold[name].norm()), (name, ours, theirs)


def test_stage2_selects_pages_and_refuses_what_it_cannot_train(model):
    from training.retrolm import AnswerExample, stage2_loss

    example = _answer_examples(1, 281, 20, seed=5)[0]
    lckv.enable(model, "retrolm", page_size=16, window=32, budget=400, prefill="retrieval", prefill_select=4096)
    with torch.no_grad():
        covering = float(stage2_loss(model, example, chunk=64))
        lckv.enable(model, "retrolm", page_size=16, window=32, budget=400, prefill="retrieval", prefill_select=32)
        assert abs(float(stage2_loss(model, example, chunk=64)) - covering) > 1e-3  # sparse KV: another loss
    with pytest.raises(ValueError, match=">= 2 tokens"):
        stage2_loss(model, AnswerExample(example.prompt_ids, example.answer_ids[:1]))
    lckv.enable(model, "retrolm", page_size=16, window=32, budget=400)  # prefill="exact"
    with pytest.raises(ValueError, match="prefill='retrieval'"):
        stage2_loss(model, example)


def test_stage2_training_reduces_the_loss_and_trains_only_the_chosen_parameters(model, tmp_path):
    from lckv.retrolm import StateFileError, model_fingerprint
    from training.retrolm import load_post_trained, save_post_trained, train_stage2

    examples = _answer_examples(2, 200, 6, seed=9)
    base = model_fingerprint(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lckv.enable(model, "retrolm", page_size=16, window=32, budget=120, prefill="retrieval", prefill_select=32)
    policy = model.model.layers[0].self_attn.lckv_binding.policy_for(0)
    bookmarks = {k: v.clone() for k, v in policy._bookmarks().state_dict().items()}
    state, history = train_stage2(model, examples, examples, epochs=6, lr=3e-3, train_params=r"self_attn\.o_proj",
                                  chunk=64, progress=False)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert sorted(state) == [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(2)]
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) != (name in state), name  # exactly the chosen ones moved
    assert all(torch.equal(v, bookmarks[k]) for k, v in policy._bookmarks().state_dict().items())  # frozen
    path = save_post_trained(tmp_path / "s2.pt", base, state)
    torch.manual_seed(0)
    fresh = tiny_decoder("llama", 2, 512)  # the fixture's base model again
    assert load_post_trained(fresh, path) == sorted(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(StateFileError, match="another model"):
        load_post_trained(tiny_decoder("llama", 2, 512), path)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:200])
    with pytest.raises(StateFileError, match="not a readable"):
        load_post_trained(fresh, tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="matches no parameter"):
        train_stage2(model, examples, examples, train_params="nothing_like_this", progress=False)


def test_stage2_runs_end_to_end_on_smollm2(smollm2, hotpotqa_file, tmp_path):
    """The stage-2 configuration runs on the CPU: one step on a real model and real rows, then the
    trained parameters load back into the base model."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from lckv.retrolm import model_fingerprint, read_state_file
    from training.retrolm import STAGE2_FORMAT

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "s2.pt"
    done = subprocess.run([sys.executable, "-m", "training.retrolm", "--config",
                           str(root / "training" / "configs" / "retrolm_stage2.yaml"), "--length", "768",
                           "--train-rows", "0:1", "--eval-rows", "80:81", "--max-steps", "1", "--prefill-select", "128",
                           "--chunk", "512", "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["stage"] == 2 and report["history"][-1]["steps"] == 1
    assert all(entry["loss"] > 0 for entry in report["history"])
    model, _ = smollm2  # the base model (the run trained its own copy)
    state = read_state_file(out, STAGE2_FORMAT, model_fingerprint(model))
    own = dict(model.named_parameters())
    assert sorted(state) == sorted(name for name in own if ".self_attn." in name)
    assert any(not torch.equal(t, own[name].detach()) for name, t in state.items())  # one step moved them


def test_a_decode_step_under_autograd_is_refused(model):
    """The decode path's sparse kernels have no backward: a one-token step with gradients raises
    instead of returning an output whose gradient misses the selected rows."""
    lckv.enable(model, "retrolm", page_size=16, window=32, budget=80)
    cache = lckv.new_cache(model)
    ids = torch.randint(2, 97, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(NotImplementedError, match="no backward"):
        model(ids[:, :1], past_key_values=cache, use_cache=True)
    with torch.no_grad():  # the cache is as it was: the same step still runs
        model(ids[:, :1], past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("argv,query_tokens", [([], 64), (["--page-size", "32"], 32), (["--page-size", "256"], 64),
                                               (["--page-size", "32", "--query-tokens", "48"], 48)])
def test_stage1_cli_query_tokens_follow_what_the_policy_reads(argv, query_tokens):
    """The query page defaults to what the policy's query bookmark reads at decode time: its
    resident window (64) or the page size if smaller; a flag overrides it."""
    from training.retrolm import _args

    assert _args(argv).query_tokens == query_tokens
