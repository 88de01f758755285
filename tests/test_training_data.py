"""Data builder: dataset layouts, passage pool, BM25 hard negatives, fuzzy promotion, token cap,
seeded shuffling, parquet schema and the CLI, on the real HotpotQA rows."""
import json
import os
import random

import numpy as np
import pandas as pd
import pytest

from training import data as D
from training.prompts import FORMATS, format_document
from training.rewards import compute_score_id_c, compute_score_id_q


def _seed():
    return int.from_bytes(os.urandom(4), "little")


@pytest.fixture(scope="module")
def hotpot_rows(hotpotqa_file):
    return json.loads(hotpotqa_file.read_text())


@pytest.fixture(scope="module")
def hotpot_records(hotpotqa_file):
    return D.load_records([hotpotqa_file])


def _hf_layout(row):
    return {"id": row["_id"], "question": row["question"], "answer": row["answer"], "type": row["type"],
            "level": row["level"],
            "supporting_facts": {"title": [t for t, _ in row["supporting_facts"]],
                                 "sent_id": [s for _, s in row["supporting_facts"]]},
            "context": {"title": [t for t, _ in row["context"]], "sentences": [s for _, s in row["context"]]}}


def _musique_layout(row):
    support = {t for t, _ in row["supporting_facts"]}
    return {"id": row["_id"], "question": row["question"], "answer": row["answer"], "answer_aliases": ["alias x"],
            "paragraphs": [{"idx": i, "title": t, "paragraph_text": " ".join(s), "is_supporting": t in support}
                           for i, (t, s) in enumerate(row["context"])]}


def test_layouts_agree_on_real_rows(hotpot_rows, tmp_path):
    rows = hotpot_rows[:5]
    original = [D.parse_record(r) for r in rows]
    hf = [D.parse_record(_hf_layout(r)) for r in rows]
    wiki = [D.parse_record({**r, "evidences": []}) for r in rows]
    for a, b, c in zip(original, hf, wiki):
        assert a.passages == b.passages and a.answers == b.answers and a.id == b.id
        assert a.source == "hotpotqa" and c.source == "2wikimultihopqa" and a.passages == c.passages
        assert any(p.gold for p in a.passages)
    for row, rec in zip(rows, original):
        gold_titles = {p.title for p in rec.passages if p.gold}
        assert gold_titles == {t for t, _ in row["supporting_facts"]}
    mus = D.parse_record(_musique_layout(rows[0]))
    assert mus.source == "musique" and mus.answers == [rows[0]["answer"], "alias x"]
    assert {p.title for p in mus.passages if p.gold} == {t for t, _ in rows[0]["supporting_facts"]}
    # the same rows from .jsonl and .parquet
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(_hf_layout(r)) for r in rows))
    assert [r.passages for r in D.load_records([jsonl])] == [r.passages for r in original]


def test_bad_rows_and_files(tmp_path):
    with pytest.raises(D.DataFormatError, match="unrecognised row layout"):
        D.parse_record({"question": "q", "answer": "a"})
    with pytest.raises(D.DataFormatError, match="no answer"):
        D.parse_record({"_id": "1", "question": "q", "answer": "", "context": [], "supporting_facts": []})
    with pytest.raises(D.DataFormatError, match="does not match layout"):
        D.parse_record({"_id": "1", "question": "q", "answer": "a", "context": [["t"]], "supporting_facts": []})
    with pytest.raises(ValueError, match="layout must be one of"):
        D.parse_record({}, layout="squad")
    with pytest.raises(FileNotFoundError):
        D.load_records([tmp_path / "missing.json"])
    bad = tmp_path / "rows.csv"
    bad.write_text("a,b")
    with pytest.raises(D.DataFormatError, match=".json, .jsonl or .parquet"):
        D.load_records([bad])


def test_corrupt_files_and_bad_settings_name_the_file_or_setting(tmp_path):
    """Truncated or non-UTF-8 .jsonl/.json and truncated .parquet files raise DataFormatError naming
    the file (before: JSONDecodeError, UnicodeDecodeError or ArrowInvalid without it); settings are
    checked even for an empty file (found by benchmarks/fuzz.py)."""
    import pandas as pd

    row = {"_id": "1", "question": "q", "answer": "a",
           "paragraphs": [{"idx": 0, "title": "t", "paragraph_text": "One. Two.", "is_supporting": True}]}
    good = tmp_path / "rows.jsonl"
    good.write_text(json.dumps(row) + "\n" + json.dumps(row))
    (tmp_path / "cut.jsonl").write_bytes(good.read_bytes()[:-7])
    (tmp_path / "latin.json").write_bytes(b'[{"question": "\xe9"}]')
    pd.DataFrame([row]).to_parquet(tmp_path / "rows.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "rows.parquet").read_bytes()[:200])
    assert len(D.load_records([tmp_path / "rows.parquet"])) == 1
    for name, message in [("cut.jsonl", "line 2 is not JSON"), ("latin.json", "not UTF-8"),
                          ("cut.parquet", "not a readable parquet file")]:
        with pytest.raises(D.DataFormatError, match=f"{name}.*{message}|{message}.*{name}"):
            D.load_records([tmp_path / name])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="layout must be one of"):
        D.load_records([tmp_path / "empty.jsonl"], layout="squad")
    with pytest.raises(ValueError, match="passage_words must be an int >= 1"):
        D.load_records([tmp_path / "empty.jsonl"], passage_words=0)
    assert D.load_records([good], limit=0) == []


def test_odd_field_types_are_row_errors():
    row = {"_id": "7", "question": "q", "answer": "a",
           "paragraphs": [{"idx": 0, "title": "t", "paragraph_text": "One.", "is_supporting": True}]}
    assert D.parse_record({**row, "answer_aliases": "Paris"}).answers == ["a", "Paris"]  # not ['P', 'a', ...]
    with pytest.raises(D.DataFormatError, match="row '7'.*answer_aliases"):
        D.parse_record({**row, "answer_aliases": 5})
    with pytest.raises(D.DataFormatError, match="row '7' does not match layout"):
        D.parse_record({**row, "paragraphs": [{"title": "t", "paragraph_text": 5}]})
    with pytest.raises(D.DataFormatError, match="must be a JSON object"):
        D.parse_record([row], layout="musique")


def test_split_passages_random():
    seed = _seed()
    rng = random.Random(seed)
    for _ in range(200):
        sents = [" ".join("w" for _ in range(rng.randint(1, 60))) + "." for _ in range(rng.randint(1, 12))]
        gold = set(rng.sample(range(len(sents)), rng.randint(0, len(sents))))
        limit = rng.randint(5, 120)
        out = D.split_passages(sents, gold, limit)
        # concatenation preserved, every passage within the limit unless it is one long sentence
        assert " ".join(t for t, _ in out).split() == " ".join(sents).split(), seed
        for text, _ in out:
            assert len(text.split()) <= limit or text.count(".") == 1, seed
        assert any(g for _, g in out) == bool(gold), seed
    with pytest.raises(ValueError, match="passage_words"):
        D.split_passages(["a."], set(), 0)


def test_bm25_ranks_like_a_direct_computation():
    """BM25Retriever against a direct Okapi BM25 formula on a random corpus."""
    seed = _seed()
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(30)]
    docs = [" ".join(rng.choice(vocab, rng.integers(3, 25))) for _ in range(60)]
    ret = D.BM25Retriever().fit(docs)
    toks = [d.split() for d in docs]
    avg = sum(map(len, toks)) / len(toks)
    present = sorted({w for t in toks for w in t})
    raw_idf = {w: np.log((len(toks) - sum(w in t for t in toks) + 0.5) / (sum(w in t for t in toks) + 0.5))
               for w in present}
    floor = 0.25 * np.mean(list(raw_idf.values()))  # Okapi with rank-bm25's floor for negative idf
    idf = {w: (v if v >= 0 else floor) for w, v in raw_idf.items()}
    for _ in range(10):
        query = list(rng.choice(vocab, 3))
        scores = []
        for t in toks:
            s = 0.0
            for q in query:
                f = t.count(q)
                s += idf.get(q, 0.0) * f * 2.5 / (f + 1.5 * (0.25 + 0.75 * len(t) / avg))
            scores.append(s)
        top = ret.search(" ".join(query), 5)
        assert len(top) == 5 and len(set(top)) == 5
        want = sorted(scores, reverse=True)[:5]
        assert [scores[i] for i in top] == pytest.approx(want, rel=1e-6), seed
    assert len(ret.search("w1", 1000)) == len(docs)


def test_build_examples_on_real_data(hotpot_records):
    seed = _seed()
    examples, stats = D.build_examples(hotpot_records, num_negatives=30, max_tokens=3000, seed=seed)
    assert stats["examples"] == len(examples) == len(hotpot_records)
    for ex in examples:
        assert ex.gold_ids, ex.record.id
        assert 0 < len(ex.documents) <= 30 + len(ex.gold_ids)
        assert ex.n_tokens <= 3000
        bodies = [d.text for d in ex.documents]
        assert len(set(bodies)) == len(bodies)  # no duplicate passage in one context
        gold_texts = {p.text for p in ex.record.passages if p.gold}
        assert gold_texts <= {ex.documents[i].text for i in ex.gold_ids}
        assert set(ex.promoted_ids) <= set(ex.gold_ids)
    # hard negatives come from the retriever: the record's own distractors are mostly among them
    own = [sum(p.text in {d.text for d in ex.documents} for p in ex.record.passages if not p.gold)
           / max(1, sum(not p.gold for p in ex.record.passages)) for ex in examples]
    assert np.mean(own) > 0.5


def test_shuffle_is_seeded_per_question(hotpot_records):
    seed = _seed()
    recs = hotpot_records[:8]
    a, _ = D.build_examples(recs, num_negatives=10, max_tokens=None, seed=seed)
    b, _ = D.build_examples(list(reversed(recs)), num_negatives=10, max_tokens=None, seed=seed)
    c, _ = D.build_examples(recs, num_negatives=10, max_tokens=None, seed=seed + 1)
    by_id = {ex.record.id: ex for ex in b}
    for ex in a:
        assert [d.text for d in ex.documents] == [d.text for d in by_id[ex.record.id].documents], seed
    assert any([d.text for d in x.documents] != [d.text for d in y.documents] for x, y in zip(a, c)), seed
    # gold positions are spread, not always first
    assert len({tuple(ex.gold_ids) for ex in a}) > 1


def test_token_cap_with_the_stories_tokenizer(hotpot_records, stories260k_files):
    from training.prompts import build_messages

    _, tok_path = stories260k_files
    count = D.make_token_counter(f"llama2c:{tok_path}")
    capped, _ = D.build_examples(hotpot_records[:6], num_negatives=40, max_tokens=5000, count_tokens=count)
    uncapped, _ = D.build_examples(hotpot_records[:6], num_negatives=40, max_tokens=None, count_tokens=count)
    for ex, full in zip(capped, uncapped):
        for fmt in FORMATS:
            msgs = build_messages(ex.record.question, [{"title": d.title, "text": d.text} for d in ex.documents], fmt)
            assert sum(count(m["content"]) for m in msgs) <= 5000
        # the cap keeps every relevant passage and drops negatives from the end of the ranking
        assert {ex.documents[i].text for i in ex.gold_ids} == {full.documents[i].text for i in full.gold_ids}
        assert {d.text for d in ex.documents} <= {d.text for d in full.documents}
    assert all(len(ex.documents) > len(ex.gold_ids) for ex in capped)
    assert any(len(ex.documents) < len(full.documents) for ex, full in zip(capped, uncapped))
    # a cap smaller than the relevant passages skips the question, with a count
    examples, stats = D.build_examples(hotpot_records[:3], num_negatives=5, max_tokens=50, count_tokens=count)
    assert examples == [] and stats["skipped_over_cap"] == 3


def test_false_negative_promotion():
    seed = _seed()
    rng = random.Random(seed)
    words = [f"tok{i}" for i in range(400)]
    gold_text = " ".join(rng.choice(words) for _ in range(60)) + "."
    near_dup = gold_text.replace(".", " extra words here.")
    distract = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(20)]
    rec = D.QARecord("q1", " ".join(gold_text.split()[:6]), ["ans"],
                     [D.Passage("G", gold_text, True)] + [D.Passage(f"D{i}", t) for i, t in enumerate(distract)], "hotpotqa")
    other = D.QARecord("q2", "unrelated", ["x"], [D.Passage("Dup", near_dup)], "hotpotqa")
    examples, stats = D.build_examples([rec, other], num_negatives=25, max_tokens=None, seed=seed)
    ex = examples[0]
    promoted = [ex.documents[i].text for i in ex.promoted_ids]
    assert promoted == [near_dup], seed
    assert stats["promoted"] == 1
    # a confirming judge that says no keeps it a negative
    examples, _ = D.build_examples([rec, other], num_negatives=25, max_tokens=None, seed=seed,
                                   confirm=lambda *a: False)
    assert examples[0].promoted_ids == [] and near_dup in [d.text for d in examples[0].documents]
    with pytest.raises(ValueError, match="promote_threshold"):
        D.build_examples([rec], promote_threshold=0.0)


def test_rl_rows_feed_the_rewards(hotpot_records):
    examples, _ = D.build_examples(hotpot_records[:4], num_negatives=8, max_tokens=None)
    for fmt in FORMATS:
        rows = D.to_rl_rows(examples, fmt)
        for row, ex in zip(rows, examples):
            assert row["reward_model"]["style"] == "rule" and row["extra_info"]["format"] == fmt
            content = row["prompt"][1]["content"]
            for i, d in enumerate(ex.documents):
                assert format_document(i, d.title, d.text) in content
    row, ex = D.to_rl_rows(examples, "id_c")[0], examples[0]
    gt, extra = row["reward_model"]["ground_truth"], row["extra_info"]
    perfect = "Relevant documents:\n" + "\n".join(f"[DOC {i}] {extra['documents'][i]}" for i in gt["gold_ids"])
    assert compute_score_id_c("hotpotqa", perfect + f"\nThe answer is: {gt['answers'][0]}", gt, extra) == pytest.approx(4.8)
    quote = " ".join(ex.documents[gt["gold_ids"][0]].text.split()[:10])
    text = f'Quote 1: "{quote}"\nRelevant Document IDs: [DOC {gt["gold_ids"][0]}]\nThe answer is: {gt["answers"][0]}'
    parts = compute_score_id_q("hotpotqa", text, gt, extra)
    assert parts >= 1 + 1 / len(gt["gold_ids"]) + 1 + 0.2


def test_cli_writes_verl_parquet(hotpotqa_file, tmp_path, capsys):
    out = tmp_path / "out"
    stats = D.main(["--input", str(hotpotqa_file), "--output", str(out), "--num-negatives", "12",
                    "--max-tokens", "2500", "--val-fraction", "0.1", "--formats", "ao,id_q", "--limit", "30"])
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["train_ao.parquet", "train_id_q.parquet", "val_ao.parquet", "val_id_q.parquet",
                            "sft_train.parquet", "sft_val.parquet", "stats.json"])
    assert stats["splits"] == {"train": 27, "val": 3}
    df = pd.read_parquet(out / "train_id_q.parquet")
    assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert (df["data_source"] == "hotpotqa").all()
    first = df.iloc[0]
    assert [m["role"] for m in first["prompt"]] == ["system", "user"]
    assert len(first["extra_info"]["documents"]) > max(first["reward_model"]["ground_truth"]["gold_ids"])
    sft = pd.read_parquet(out / "sft_train.parquet")
    assert [m["role"] for m in sft.iloc[0]["messages"]] == ["system", "user", "assistant"]
    assert sft.iloc[0]["messages"][-1]["content"].startswith("The answer is: ")
    assert json.loads((out / "stats.json").read_text())["examples"] == 30
    with pytest.raises(SystemExit):
        D.main(["--input", str(hotpotqa_file), "--output", str(out), "--formats", "ao,bogus"])


class _HashingEncoder:
    """A stand-in embedding model: normalised bag of hashed words (deterministic)."""

    def encode(self, texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True):
        out = np.zeros((len(texts), 64))
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w)) % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def test_embedding_retriever_with_a_given_encoder(hotpot_records):
    enc = _HashingEncoder()
    ret = D.EmbeddingRetriever(enc)
    texts = [p.body for r in hotpot_records[:10] for p in r.passages]
    ret.fit(texts)
    emb = enc.encode(texts)
    for r in hotpot_records[:5]:
        top = ret.search(r.question, 7)
        scores = emb @ enc.encode([r.question])[0]
        assert [scores[i] for i in top] == pytest.approx(sorted(scores, reverse=True)[:7])
    with pytest.raises(TypeError, match="encode"):
        D.EmbeddingRetriever(object())
    examples, _ = D.build_examples(hotpot_records[:3], retriever=D.EmbeddingRetriever(enc), num_negatives=5,
                                   max_tokens=None)
    assert all(len(ex.documents) == len(ex.gold_ids) + 5 for ex in examples)


def test_judge_confirmation_parses_the_reply():
    class Client:
        def __init__(self, reply):
            self.reply, self.seen = reply, []

        def complete(self, messages):
            self.seen.append(messages)
            return self.reply

    gold = [D.Passage("G", "gold text", True)]
    for reply, want in [("\\boxed{yes}", True), ("Sure. \\boxed{ Yes }", True), ("\\boxed{no}", False),
                        ("yes", False), (None, False)]:
        client = Client(reply)
        assert D._judge_confirm(client)("Q?", ["A"], D.Passage("C", "cand"), gold) is want, reply
        assert "cand" in client.seen[0][0]["content"] and "gold text" in client.seen[0][0]["content"]
