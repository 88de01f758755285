"""The task-accuracy harness (benchmarks/bench_tasks.py) and its HotpotQA builder
(benchmarks/tasks_qa.py): document orders, lengths, SubEM on hand-made cases, the summary's
relative drop, resuming, and a tiny end-to-end run on stories260K."""
import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_tasks  # noqa: E402
import tasks_qa  # noqa: E402
from training.scorers import subem_score  # noqa: E402


@pytest.fixture(scope="module")
def stories_tokenizer(stories260k_files):
    from lckv.research.llama2c import load_tokenizer

    return load_tokenizer(stories260k_files[1])


@pytest.fixture(scope="module")
def corpus(hotpotqa_file):
    return tasks_qa.QACorpus.load(str(hotpotqa_file))


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------- HotpotQA builder
def test_order_documents():
    ranked = list("abcdefg")  # best first
    rng = __import__("random").Random(0)
    assert tasks_qa.order_documents(ranked, "retrieval", rng) == ranked
    assert tasks_qa.order_documents(ranked, "reversed", rng) == list("gfedcba")
    # best at both ends: ranks 1, 3, 5, 7 from the front, then 6, 4, 2 to the back
    assert tasks_qa.order_documents(ranked, "ends", rng) == list("acegfdb")
    shuffled = tasks_qa.order_documents(ranked, "shuffled", rng)
    assert sorted(shuffled) == ranked and shuffled != ranked
    with pytest.raises(ValueError, match="order must be one of"):
        tasks_qa.order_documents(ranked, "best", rng)


@pytest.mark.data
@pytest.mark.parametrize("length", [2048, 6000])
def test_hotpotqa_sample_gold_tags_length(length, stories_tokenizer, corpus, hotpotqa_file):
    rows = json.loads(Path(hotpotqa_file).read_text())
    for seed in (0, 7):
        s = tasks_qa.hotpotqa_sample(stories_tokenizer, length, seed, corpus=corpus)
        row = rows[seed]
        assert s.answers[0] == row["answer"] and row["question"] in s.question
        n = len(stories_tokenizer(s.prompt, add_special_tokens=False)["input_ids"])
        assert length * 0.98 <= n <= length
        tags = [int(i) for i in re.findall(r"^\[DOC (\d+)\] ", s.context, flags=re.M)]
        assert tags == list(range(s.metadata["n_documents"]))
        # every supporting title is a document, at the tag the metadata names
        blocks = re.split(r"\n\n(?=\[DOC \d+\] )", s.context.split("\n\n", 1)[1])
        titles = {int(re.match(r"\[DOC (\d+)\] (.*)", b).group(1)): re.match(r"\[DOC \d+\] (.*)", b).group(1)
                  for b in blocks}
        support = {t for t, _ in row["supporting_facts"]}
        assert {titles[i] for i in s.metadata["gold_ids"]} == support
        # the row's own paragraphs come first as padding: at 6000 tokens all ten are there
        if length == 6000:
            assert {t for t, _ in row["context"]} <= set(titles.values())
            assert len(titles) > len(row["context"])  # padded with other rows' passages
        assert s.metric == "subem"


@pytest.mark.data
def test_hotpotqa_orders_follow_bm25(stories_tokenizer, corpus):
    samples = {o: tasks_qa.hotpotqa_sample(stories_tokenizer, 3000, 3, order=o, corpus=corpus) for o in tasks_qa.ORDERS}
    best_first = sorted(samples["retrieval"].metadata["ranks"])
    assert samples["retrieval"].metadata["ranks"] == best_first
    assert samples["reversed"].metadata["ranks"] == best_first[::-1]
    assert samples["ends"].metadata["ranks"] == best_first[0::2] + best_first[1::2][::-1]
    assert sorted(samples["shuffled"].metadata["ranks"]) == best_first != samples["shuffled"].metadata["ranks"]
    # the same documents in every order, so the order's effect can be measured alone
    docs = {o: sorted(re.split(r"\n\n(?=\[DOC)", re.sub(r"\[DOC \d+\] ", "[DOC] ", s.context))[1:])
            for o, s in samples.items()}
    assert all(d == docs["retrieval"] for d in docs.values())
    # the independent check of the ranks: BM25 for the question, best first
    ranking = corpus.retriever.search(corpus.records[3].question, len(corpus.pool))
    first_title = corpus.pool.passages[ranking[0]].title
    assert samples["retrieval"].context.split("[DOC 0] ", 1)[1].startswith(first_title)
    assert samples["ends"].context.split("[DOC 0] ", 1)[1].startswith(first_title)


@pytest.mark.parametrize("prediction, answers, expected", [
    ("The answer is: Paris", ["Paris"], 1.0),
    ("The answer is: the Beatles.", ["Beatles"], 1.0),           # articles and punctuation normalised
    ("The answer is: Parisian food", ["Paris"], 0.0),            # whole words only
    ("Reasoning about Paris.\nThe answer is: London", ["Paris"], 0.0),  # the answer line is what counts
    (" Jack Owens wrote it", ["Jack Owens"], 1.0),               # no answer line: the whole reply
    ("The answer is: 1990s", ["1990"], 0.0),
    ("The answer is: yes", ["no", "yes"], 1.0),
])
def test_subem_hand_made(prediction, answers, expected):
    assert subem_score(prediction, answers) == expected
    assert bench_tasks.SCORERS["subem"](prediction, answers) == expected


# ----------------------------------------------------------------------------- harness pieces
@pytest.mark.parametrize("text, label", [("0.05", "0.05"), ("5%", "0.05"), ("256", "256"), ("1.0", "1.0")])
def test_budget_label(text, label):
    assert bench_tasks.budget_label(text) == label


@pytest.mark.parametrize("text", ["0", "1.5", "-3", "12.5%x", "150%"])
def test_budget_label_rejects(text):
    with pytest.raises(Exception, match="budget"):
        bench_tasks.budget_label(text)


@pytest.mark.parametrize("method,page,trained", [("retrolm", 128, False), ("retrolm-p32", 32, False),
                                                 ("retrolm-trained", 128, True), ("retrolm-trained-p32", 32, True)])
def test_retrolm_methods_set_page_size_and_bookmarks(method, page, trained, tmp_path):
    from lckv.policies import PolicyConfigError, RetroLMPolicy

    prompt = int(torch.randint(2000, 9000, (1,)))
    policy, keys = bench_tasks.make_policy(method, "0.05", prompt, str(tmp_path / "b.pt"))
    assert isinstance(policy, RetroLMPolicy) and policy.page_size == page
    assert policy.bookmarks == (str(tmp_path / "b.pt") if trained else None)
    assert keys == policy.budget_tokens(prompt + 1)
    if trained:
        with pytest.raises(PolicyConfigError, match=method):
            bench_tasks.make_policy(method, "0.05", prompt, None)


def test_summary_rescores_and_computes_relative_drop():
    def row(method, budget, sample, prediction, task="niah_single_repeat", answers=("1234567",)):
        return {"model": "m", "task": task, "length": 1000, "method": method, "budget": budget, "sample": sample,
                "prompt_tokens": 1000, "budget_tokens": None if budget is None else 50, "answers": list(answers),
                "metric": "all", "prediction": prediction, "score": 0.123}  # a stale score must be recomputed

    rows = [row("full", None, 0, "1234567"), row("full", None, 1, "1234567"),
            row("retrieval", "0.05", 0, "1234567"), row("retrieval", "0.05", 1, "7654321"),
            row("kvpress:SnapKVPress", "0.05", 0, "nope"), row("kvpress:SnapKVPress", "0.05", 1, "1234567"),
            row("full", None, 0, "A B", task="variable_tracking", answers=("A", "B", "C", "D")),
            row("retrieval", "0.05", 0, "A", task="variable_tracking", answers=("A", "B", "C", "D"))]
    summary = {(e["task"], e["method"], e["budget"]): e for e in bench_tasks.summarize(rows)}
    assert summary[("niah_single_repeat", "full", None)]["score"] == 1.0
    assert summary[("niah_single_repeat", "retrieval", "0.05")]["score"] == 0.5
    assert summary[("niah_single_repeat", "retrieval", "0.05")]["drop_pct"] == pytest.approx(50.0)
    assert summary[("niah_single_repeat", "kvpress:SnapKVPress", "0.05")]["drop_pct"] == pytest.approx(50.0)
    assert summary[("niah_single_repeat", "retrieval", "0.05")]["budget_fraction"] == pytest.approx(0.05)
    # variable tracking: full finds 2 of 4 names (0.5), retrieval 1 of 4 (0.25): a 50% drop
    assert summary[("variable_tracking", "retrieval", "0.05")]["drop_pct"] == pytest.approx(50.0)
    # the mean over tasks: full (1.0 + 0.5) / 2, retrieval (0.5 + 0.25) / 2
    assert summary[("all", "full", None)]["score"] == pytest.approx(0.75)
    assert summary[("all", "retrieval", "0.05")]["drop_pct"] == pytest.approx(50.0)
    # a mean over tasks needs more than one task of that method
    assert ("all", "kvpress:SnapKVPress", "0.05") not in summary


# ----------------------------------------------------------------------------- end to end on stories260K
TINY = ["--model", "stories260K", "--tasks", "niah_single_repeat", "variable_tracking", "--lengths", "384", "512",
        "--samples", "2", "--methods", "full", "retrieval", "--budgets", "0.1", "1024", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def tiny_run(stories260k_files, tmp_path_factory):
    results = tmp_path_factory.mktemp("bench_tasks")
    start = time.perf_counter()
    out = bench_tasks.main(TINY + ["--results", str(results), "--name", "tiny"])
    return results, out, time.perf_counter() - start


def test_end_to_end_tiny(tiny_run):
    results, out, seconds = tiny_run
    print(f"tiny end-to-end run: {seconds:.1f} s")
    rows = _rows(results / "tiny.jsonl")
    assert out["computed"] == len(rows) == 2 * 2 * 2 * 3  # tasks x lengths x samples x (full + 2 budgets)
    for r in rows:
        assert r["prediction"] is not None and r.get("error") is None
        assert 0.97 * r["length"] <= r["prompt_tokens"] <= r["length"]
        assert r["score"] == bench_tasks.SCORERS[r["metric"]](r["prediction"], r["answers"])
        assert r["first_step_s"] > 0 and r["prefill_s"] > 0
    by_key = {(r["task"], r["length"], r["sample"], r["method"], r["budget"]): r for r in rows}
    for (task, length, sample, method, budget), r in by_key.items():
        full = by_key[(task, length, sample, "full", None)]
        assert r["prefill_s"] == full["prefill_s"]  # one shared prefill per sample
        if budget == "1024":  # a budget above the whole sequence must reproduce full exactly
            assert r["prediction"] == full["prediction"]
        if budget == "0.1":  # 10% of the context at the first decode step: the prompt and the first token
            assert r["budget_tokens"] == -(-(r["prompt_tokens"] + 1) // 10)
    summary = json.loads((results / "tiny.json").read_text())["summary"]
    entries = {(e["task"], e["length"], e["method"], e["budget"]) for e in summary}
    for task in ("niah_single_repeat", "variable_tracking", "all"):
        for length in (384, 512):
            assert {(task, length, "full", None), (task, length, "retrieval", "0.1"),
                    (task, length, "retrieval", "1024")} <= entries
    assert (results / "tiny.png").stat().st_size > 10_000


def test_resume_skips_finished_rows(tiny_run):
    results = tiny_run[0]
    path = results / "tiny.jsonl"
    before = path.read_text()
    again = bench_tasks.main(TINY + ["--results", str(results), "--name", "tiny"])
    assert again["computed"] == 0 and again["skipped"] == 24
    assert path.read_text() == before
    # the summary JSON keeps every row: a clone without the JSONL recomputes nothing, loses nothing
    summary_path = results / "tiny.json"
    summary = json.loads(summary_path.read_text())
    assert {bench_tasks.row_key(r) for r in summary["samples"]} == {bench_tasks.row_key(r) for r in _rows(path)}
    path.unlink()
    again = bench_tasks.main(TINY + ["--results", str(results), "--name", "tiny"])
    assert again["computed"] == 0 and again["skipped"] == 24
    assert json.loads(summary_path.read_text())["summary"] == summary["summary"]
    path.write_text(before)
    # an interrupted run (and no summary yet): the last row lost and the one before it cut mid-line
    summary_path.unlink()
    lines = before.splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-2][:40])
    again = bench_tasks.main(TINY + ["--results", str(results), "--name", "tiny"])
    assert again["computed"] == 2 and again["skipped"] == 22
    after = _rows(path)
    assert len(after) == 24
    lost = [json.loads(line) for line in lines[-2:]]
    redone = {bench_tasks.row_key(r): r for r in after[-2:]}
    for r in lost:  # greedy decoding recomputes the same answers
        assert redone[bench_tasks.row_key(r)]["prediction"] == r["prediction"]


def test_summary_carries_entries_without_rows(tmp_path):
    """A summary written before rows were kept in it (aggregate entries only) keeps those entries
    through a later run of other settings, and they join the mean over tasks."""
    def entry(task, method, budget, score, full_score):
        return {"task": task, "length": 1000, "method": method, "budget": budget, "n": 1, "score": score,
                "full_score": full_score, "budget_tokens": None, "budget_fraction": None, "prefill_s": None,
                "first_step_s": None, "decode_tokens_per_s": None, "drop_pct": None}

    old = [entry("niah_single_repeat", "full", None, 1.0, 1.0), entry("niah_single_repeat", "retrieval", "0.05", 0.5, 1.0)]
    (tmp_path / "m.json").write_text(json.dumps({"summary": old + [entry("all", "full", None, 1.0, 1.0)]}))
    row = {"model": "m", "task": "variable_tracking", "length": 1000, "sample": 0, "prompt_tokens": 1000,
           "answers": ["A", "B"], "metric": "all"}
    rows = [dict(row, method="full", budget=None, prediction="A B"),
            dict(row, method="retrieval", budget="0.05", prediction="A")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench_tasks.main(["--model", "m", "--name", "m", "--results", str(tmp_path), "--summary-only"])
    payload = json.loads((tmp_path / "m.json").read_text())
    summary = {(e["task"], e["method"], e["budget"]): e for e in payload["summary"]}
    assert summary[("niah_single_repeat", "retrieval", "0.05")]["score"] == 0.5  # carried as it was
    assert summary[("variable_tracking", "retrieval", "0.05")]["score"] == 0.5  # from the new rows
    assert summary[("all", "retrieval", "0.05")]["score"] == pytest.approx(0.5)
    assert summary[("all", "full", None)]["score"] == pytest.approx(1.0)
    assert summary[("niah_single_repeat", "retrieval", "0.05")]["drop_pct"] == pytest.approx(50.0)
    assert len(payload["samples"]) == 2 and len(payload["carried"]) == 2
    # a second summary from the rows kept in the JSON alone gives the same table
    (tmp_path / "m.jsonl").unlink()
    bench_tasks.main(["--model", "m", "--name", "m", "--results", str(tmp_path), "--summary-only"])
    assert json.loads((tmp_path / "m.json").read_text())["summary"] == payload["summary"]


def test_own_prefill_method_covering_budget_decodes_as_full(stories260k_files, tmp_path):
    """``retrieval-prefill`` prefills on its own (chunked, retrieval-augmented); at a budget and a
    ``prefill_select`` covering the prompt it must answer exactly as the shared exact prefill."""
    bench_tasks.main(["--model", "stories260K", "--tasks", "niah_single_repeat", "variable_tracking", "--lengths", "384",
                      "--samples", "1", "--methods", "full", "retrieval-prefill", "--budgets", "1024",
                      "--max-new-tokens", "6", "--chunk", "100", "--results", str(tmp_path), "--name", "own"])
    rows = _rows(tmp_path / "own.jsonl")
    assert len(rows) == 4 and all(r.get("error") is None for r in rows)
    by = {(r["task"], r["method"]): r for r in rows}
    for task in ("niah_single_repeat", "variable_tracking"):
        own, full = by[(task, "retrieval-prefill")], by[(task, "full")]
        assert own["prediction"] == full["prediction"]
        assert own["prefill_s"] != full["prefill_s"], "the method must prefill on its own"


def test_export_prompts_for_peers(stories260k_files, tmp_path):
    bench_tasks.main(["--model", "stories260K", "--tasks", "niah_multikey", "--lengths", "400", "--samples", "2",
                      "--results", str(tmp_path), "--name", "peer", "--export-prompts"])
    rows = _rows(tmp_path / "peer_prompts.jsonl")
    assert [r["sample"] for r in rows] == [0, 1]
    for r in rows:
        assert r["context_text"] + r["question_text"] == r["text"]
        assert r["question_text"].startswith("What is the special magic number for ")
        assert 0.97 * 400 <= len(r["input_ids"]) <= 400 and r["metric"] == "all" and len(r["answers"]) == 1


# ----------------------------------------------------------------------------- gold-row recall
@pytest.mark.data
def test_gold_token_spans_cover_the_gold_documents(stories_tokenizer, hotpotqa_file):
    for seed in (0, 5):
        sample, ids, text = bench_tasks.make_sample("hotpotqa", stories_tokenizer, 1500, seed)
        spans = bench_tasks.gold_token_spans(stories_tokenizer, sample, text)
        assert len(spans) == len(sample.metadata["gold_ids"]) >= 2
        for j, (lo, hi) in zip(sample.metadata["gold_ids"], spans):
            assert 0 < lo < hi <= len(ids)
            block = re.search(rf"^\[DOC {j}\] .*?(?=\n\n\[DOC |\Z)", sample.context, flags=re.M | re.S).group(0)
            # the span holds its whole document and not the neighbours' tags (one token of slack each side)
            assert 0 <= stories_tokenizer.decode(ids[lo - 1:hi]).find(f"[DOC {j}]") <= 2
            assert block.split("\n", 1)[1][-40:] in stories_tokenizer.decode(ids[lo:hi + 1])
            assert len(re.findall(r"\[DOC \d+\]", stories_tokenizer.decode(ids[lo + 2:hi - 2]))) == 0
    synthetic_sample, _, text = bench_tasks.make_sample("niah_single_repeat", stories_tokenizer, 400, 0)
    assert bench_tasks.gold_token_spans(stories_tokenizer, synthetic_sample, text) is None


def test_gold_recall_hand_computed():
    """Store rows start at slot 4; gold tokens [10, 20) and [30, 35) are rows 6-15 and 26-30 (15
    rows). Head 0 attends rows 0-9 and 28 (5 gold), head 1 rows 14-29 and a padded -1 (6 gold):
    recall (5 + 6) / (2 * 15)."""
    from types import SimpleNamespace

    heads = [list(range(10)) + [28] + [-1] * 5, list(range(14, 30))]
    indices = torch.tensor([heads])
    calls = []

    def select(state, view, q, n_select, scale=None):
        calls.append("select")
        return indices if calls.count("select") == 1 else torch.full_like(indices, -1)

    def fused_step(state, view, q, n_select, scale=None):
        calls.append("fused")
        return None if view.layer_idx == 0 else ("out", "lse", indices[:, :1])

    policy = SimpleNamespace(select=select, fused_step=fused_step)
    probe = bench_tasks.GoldRecall(policy, [(10, 20), (30, 35)]).__enter__()
    view = SimpleNamespace(keys=torch.zeros(1, 2, 40, 8), first_position=4, layer_idx=0)
    assert policy.fused_step(None, view, None, 16) is None and probe.per_layer == {}
    policy.select(None, view, None, 16)
    assert probe.per_layer == {0: pytest.approx(11 / 30)}
    policy.select(None, view, None, 16)  # a later step of the same layer does not count
    assert probe.per_layer == {0: pytest.approx(11 / 30)}
    policy.fused_step(None, SimpleNamespace(keys=torch.zeros(1, 1, 40, 8), first_position=4, layer_idx=1), None, 16)
    assert probe.per_layer[1] == pytest.approx(5 / 15)  # a fused step's indices are its third output
    # no gold row offloaded (all before the store): None, and the layer mean skips it
    probe.per_layer[2] = probe.recall(indices, SimpleNamespace(keys=torch.zeros(1, 2, 40, 8), first_position=40))
    assert probe.summary() == {"gold_recall": pytest.approx((11 / 30 + 5 / 15) / 2),
                               "gold_recall_layers": [pytest.approx(11 / 30), pytest.approx(5 / 15), None]}
    probe.__exit__(None, None, None)
    assert policy.select is select and policy.fused_step is fused_step  # the instance's own functions back


def test_gold_recall_leaves_no_reference_cycle():
    """The wrappers refer to the policy; after the ``with`` block the policy must be freed by its
    reference count alone (a cycle kept every decoded policy's cache state alive: out of memory)."""
    import gc
    import weakref

    class Policy:
        def select(self, state, view, q, n_select, scale=None):
            return None

        def fused_step(self, state, view, q, n_select, scale=None):
            return None

    policy = Policy()
    with bench_tasks.GoldRecall(policy, [(0, 1)]):
        assert "select" in vars(policy)
    assert vars(policy) == {}
    dead = weakref.ref(policy)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del policy
        assert dead() is None
    finally:
        if enabled:
            gc.enable()


def test_gold_recall_sees_the_decode_step_of_a_real_cache():
    """A policy that attends scripted rows on a tiny model: the probe records, per layer, the
    first decode step's rows (mapped from token positions by the sink), not the later steps'."""
    from dataclasses import dataclass

    import lckv
    from lckv.policies.selection import SelectionPolicy
    from tiny_models import tiny_decoder

    @dataclass
    class ScriptedRows(SelectionPolicy):
        name = "scripted-rows"
        steps: int = 0

        def build(self, view):
            return None

        def on_offload(self, state, view, first_row, n_rows):
            pass

        def select(self, state, view, q, n_select, scale=None):
            self.steps += view.layer_idx == 0
            start = 0 if self.steps == 1 else view.length - 2 * n_select  # later steps: the store's end
            rows = torch.arange(start, start + 2 * n_select).view(1, 2, n_select)
            return rows.expand(q.shape[0], -1, -1).contiguous()

    torch.manual_seed(0)
    model = tiny_decoder("llama", kv_heads=2)
    policy = ScriptedRows(budget=40, window=8)
    n_select = policy.split_budget(121)[2]
    assert n_select == 28
    # gold tokens [20, 50) and [56, 62): store rows 16-45 and 52-57 (36); head 0 takes rows 0-27
    # (12 gold), head 1 rows 28-55 (18 + 4 gold)
    lckv.enable(model, policy)
    try:
        cache = lckv.new_cache(model)
        ids = torch.randint(2, 97, (1, 120))
        with torch.no_grad(), bench_tasks.GoldRecall(policy, [(20, 50), (56, 62)]) as probe:
            model(ids, past_key_values=cache, use_cache=True)
            assert probe.per_layer == {}  # the exact prefill selects nothing
            for token in (5, 6):
                model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    finally:
        lckv.disable(model)
    assert policy.steps == 2
    assert probe.per_layer == {0: pytest.approx(34 / 72), 1: pytest.approx(34 / 72)}


@pytest.mark.data
def test_gold_recall_rows_of_every_method_kind(stories260k_files, hotpotqa_file, tmp_path):
    """HotpotQA through the harness with a policy of each kind: `full` and `streaming` (no per-step
    selection) decode without a probe and carry no gold recall; `quest` carries one per layer."""
    bench_tasks.main(["--model", "stories260K", "--tasks", "hotpotqa", "--lengths", "1024", "--samples", "1",
                      "--methods", "full", "streaming", "quest", "--budgets", "0.1", "--max-new-tokens", "3",
                      "--results", str(tmp_path), "--name", "gold"])
    rows = {r["method"]: r for r in _rows(tmp_path / "gold.jsonl")}
    assert set(rows) == {"full", "streaming", "quest"} and all(r.get("error") is None for r in rows.values())
    assert "gold_recall" not in rows["full"] and "gold_recall" not in rows["streaming"]
    layers = rows["quest"]["gold_recall_layers"]
    assert len(layers) == 5 and all(0.0 <= x <= 1.0 for x in layers)  # stories260K: 5 layers, gold rows offloaded
    assert rows["quest"]["gold_recall"] == pytest.approx(sum(layers) / len(layers))
