"""Evaluation scorers (SubEM, relative drop, NDCG@k) and lckv.research.analysis.received_attention against
an eager-attention oracle, plus the attention-ranking NDCG@10 smoke run on stories260K."""
import itertools
import math
import os
import random

import pytest
import torch

from lckv.research.analysis import encode_segments, received_attention, span_sums
from training.scorers import (attention_ranking_ndcg, mean_subem, ndcg_at_k, prompt_segments, relative_drop,
                              subem_score)


def _seed():
    return int.from_bytes(os.urandom(4), "little")


def test_subem_score():
    assert subem_score("Reasoning...\nThe answer is: The Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert subem_score("It is the Eiffel Tower in Paris", "eiffel tower") == 1.0
    assert subem_score("The answer is: Louvre", ["Eiffel Tower", "Louvre Museum"]) == 0.0
    assert subem_score(None, ["x"]) == 0.0
    assert mean_subem(["The answer is: x", "y"], [["x"], ["z"]]) == 0.5
    with pytest.raises(ValueError, match="differ in length"):
        mean_subem(["a"], [])


def test_scorers_refuse_bad_arguments_by_name():
    """Found by benchmarks/fuzz.py: a non-string alias raised AttributeError deep in the
    normaliser, a k of None/2.5 a TypeError from a comparison or a slice, and NaN/inf relevance
    returned NaN for a score documented in [0, 1]."""
    with pytest.raises(TypeError, match="answers must be a string or a sequence of strings"):
        subem_score("The answer is: x", [None, 3])
    with pytest.raises(TypeError, match="answers"):
        subem_score("x", 5)
    for k in (None, 2.5, "3"):
        with pytest.raises(TypeError, match="k must be an int"):
            ndcg_at_k([1.0, 2.0], [1.0, 0.0], k)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="relevance must be finite numbers >= 0"):
            ndcg_at_k([1.0, 2.0], [1.0, bad])
    with pytest.raises(ValueError, match="scores contain NaN"):
        ndcg_at_k([float("nan"), 2.0], [1.0, 0.0])
    assert ndcg_at_k([float("inf"), 2.0], [1.0, 0.0]) == 1.0


def test_relative_drop():
    assert relative_drop(0.5, 0.4) == pytest.approx(20.0)
    assert relative_drop(0.5, 0.6) == pytest.approx(-20.0)
    with pytest.raises(ValueError, match="full must be > 0"):
        relative_drop(0.0, 0.1)
    with pytest.raises(ValueError, match="finite"):
        relative_drop(float("nan"), 0.1)
    with pytest.raises(ValueError, match="full=.* too close to 0"):  # the drop overflows (found by fuzzing)
        relative_drop(2.225073858507203e-309, 103)
    assert relative_drop(1e-300, 1e-300) == 0.0  # tiny but representable


def _ndcg_oracle(scores, relevance, k):
    """NDCG@k by brute force over the ideal permutation."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    dcg = sum((2 ** 0 * relevance[i]) / math.log2(r + 2) for r, i in enumerate(order[:k]))
    best = max(sum(relevance[i] / math.log2(r + 2) for r, i in enumerate(p[:k]))
               for p in itertools.permutations(range(len(scores))))
    return dcg / best


def test_ndcg_against_brute_force():
    seed = _seed()
    rng = random.Random(seed)
    for _ in range(40):
        n = rng.randint(1, 7)
        scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
        relevance = [float(rng.random() < 0.4) for _ in range(n)]
        if not any(relevance):
            relevance[rng.randrange(n)] = 1.0
        k = rng.randint(1, 8)
        assert ndcg_at_k(scores, relevance, k) == pytest.approx(_ndcg_oracle(scores, relevance, k)), seed
    assert ndcg_at_k([3, 2, 1], [1, 0, 0]) == 1.0
    assert ndcg_at_k([1, 2, 3], [1, 0, 0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no positive"):
        ndcg_at_k([1, 2], [0, 0])
    with pytest.raises(ValueError, match="differ in length"):
        ndcg_at_k([1], [1, 0])


def _tiny_llama(seed, layers=2, heads=4, kv_heads=2, head_dim=8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=heads * head_dim, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _oracle_received(model, ids, mask=None):
    """Per-key received attention from eager attention's full probability matrices."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    probs = torch.stack(out.attentions)  # [layers, B, H, Lq, Lk]
    if mask is not None:
        probs = probs * mask[None, :, None, :, None]
    return probs.sum(dim=3).mean(dim=(0, 2))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 8), (6, 3, 10), (7, 1, 16), (2, 2, 12)])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_received_attention_matches_eager(heads, kv_heads, head_dim, chunk):
    seed = _seed()
    model = _tiny_llama(seed, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    length = random.Random(seed).randint(5, 41)
    ids = torch.randint(0, 97, (3, length))
    got = received_attention(model, ids, query_chunk=chunk)
    want = _oracle_received(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    # each query row sums to one, so the received mass equals the number of queries
    torch.testing.assert_close(got.sum(-1), torch.full((3,), float(length)), rtol=1e-5, atol=1e-4)
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, "lckv_binding") and not any(hasattr(m, "lckv_binding") for m in model.modules())


def test_received_attention_with_padding_and_model_output_unchanged():
    seed = _seed()
    model = _tiny_llama(seed)
    ids = torch.randint(0, 97, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    got = received_attention(model, ids, mask, query_chunk=5)
    want = _oracle_received(model, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    assert float(got[1, 12:].abs().max()) == 0.0
    assert got[1].sum().item() == pytest.approx(12.0, rel=1e-5)
    single = received_attention(model, ids[0])
    assert single.shape == (19,)
    torch.testing.assert_close(single, got[0], rtol=1e-5, atol=1e-5)


def test_received_attention_bad_input():
    model = _tiny_llama(_seed())
    with pytest.raises(TypeError, match="input_ids"):
        received_attention(model, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="seq >= 1"):
        received_attention(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        received_attention(model, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5))
    with pytest.raises(ValueError, match="query_chunk"):
        received_attention(model, torch.zeros(1, 4, dtype=torch.long), query_chunk=0)
    with pytest.raises(ValueError, match="not a supported model"):  # lckv.enable refuses it
        received_attention(torch.nn.Linear(2, 2), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        span_sums(torch.ones(4), [(2, 5)])


def test_prompt_segments_and_spans(stories260k_files):
    from lckv.research.llama2c import load_tokenizer

    tok = load_tokenizer(stories260k_files[1])
    docs = [{"title": f"T{i}", "text": f"Story number {i} about a cat."} for i in range(4)]
    segments, doc_index = prompt_segments("Who?", docs)
    assert len(doc_index) == 4 and all(segments[j].startswith(f"[DOC {i}]") for i, j in enumerate(doc_index))
    ids, spans = encode_segments(tok, segments)
    assert ids[0] == tok.bos_token_id
    for (start, end), seg in zip(spans, segments):
        assert tok.decode(ids[start:end]).strip() == seg.strip() or seg.strip() == ""


def test_attention_ranking_ndcg_smoke_on_stories260k(stories260k_files, hotpotqa_file):
    """NDCG@10 on a real HotpotQA context with the real stories260K model (a smoke run: the
    model is a 260K-parameter TinyStories model, so only the plumbing and bounds are checked,
    plus agreement with the eager oracle on the per-document sums)."""
    import json

    from lckv.research.llama2c import load

    model, tok = load(*stories260k_files)
    row = json.loads(hotpotqa_file.read_text())[0]
    gold_titles = {t for t, _ in row["supporting_facts"]}
    others = [t for t, _ in row["context"] if t not in gold_titles][:3]
    docs = [{"title": t, "text": " ".join(s)[:70]} for t, s in row["context"] if t in gold_titles or t in others]
    gold = [i for i, d in enumerate(docs) if d["title"] in gold_titles]
    result = attention_ranking_ndcg(model, tok, row["question"], docs, gold, k=10, query_chunk=32)
    assert 0.0 < result["ndcg"] <= 1.0 and len(result["doc_attention"]) == len(docs) == 5
    assert result["n_tokens"] <= 512  # within the model's trained context
    segments, doc_index = prompt_segments(row["question"], docs)
    ids, spans = encode_segments(tok, segments)
    want = _oracle_received(model, torch.tensor([ids]))[0]
    want_docs = span_sums(want, [spans[j] for j in doc_index])
    assert result["doc_attention"] == pytest.approx(want_docs, rel=1e-4)
    with pytest.raises(ValueError, match="outside"):
        attention_ranking_ndcg(model, tok, "q", docs, [5])
