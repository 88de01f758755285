"""Evaluation scorers: SubEM, relative drop under compression, attention-ranking NDCG@10.

* :func:`subem_score` — HELMET's sub-exact match of a prediction against gold aliases (no reward
  guards: the first ``The answer is:`` line if present, else the whole prediction).
* :func:`relative_drop` — percentage lost from a full-context score to a compressed-KV score.
* :func:`ndcg_at_k` and :func:`attention_ranking_ndcg` — rank the ``[DOC i]`` spans of a prompt
  by the attention they receive at prefill (:func:`lckv.research.analysis.received_attention`) and score
  the ranking with NDCG@k, gold documents having relevance 1.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from training.matching import subem
from training.prompts import build_messages, format_document

__all__ = ["subem_score", "mean_subem", "relative_drop", "ndcg_at_k", "attention_ranking_ndcg",
           "prompt_segments"]

_ANSWER = re.compile(r"the answer is\s*:\s*(.*)", re.IGNORECASE)


def subem_score(prediction: str, answers: Sequence[str] | str) -> float:
    """1.0 if a normalised gold alias is contained in the normalised predicted answer, else 0.0
    (a prediction that is not a string scores 0). ``answers``: one alias or a sequence of them;
    anything else raises TypeError."""
    if isinstance(answers, str):
        answers = [answers]
    if isinstance(answers, (bytes, dict)) or not isinstance(answers, Sequence) \
            or not all(isinstance(a, str) for a in answers):
        raise TypeError(f"answers must be a string or a sequence of strings, got {answers!r:.80}")
    if not isinstance(prediction, str):
        return 0.0
    match = _ANSWER.search(prediction)
    return subem(match.group(1) if match else prediction, answers)


def mean_subem(predictions: Sequence[str], answers: Sequence[Sequence[str] | str]) -> float:
    """Mean SubEM over a dataset, in [0, 1]."""
    if len(predictions) != len(answers):
        raise ValueError(f"predictions ({len(predictions)}) and answers ({len(answers)}) differ in length")
    if not predictions:
        raise ValueError("predictions is empty")
    return sum(subem_score(p, a) for p, a in zip(predictions, answers)) / len(predictions)


def relative_drop(full: float, compressed: float) -> float:
    """``100 * (full - compressed) / full``: percent of the full-context score lost under
    compression (negative when compression helps). ``full`` must be > 0; a drop beyond the
    float range (``full`` near 0, e.g. subnormal) raises ValueError naming ``full``."""
    for name, value in (("full", full), ("compressed", compressed)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if full <= 0:
        raise ValueError(f"full must be > 0 for a relative drop, got {full}")
    drop = 100.0 * (full - compressed) / full
    if not math.isfinite(drop):
        raise ValueError(f"full={full!r} is too close to 0: the drop of compressed={compressed!r} against it "
                         "is beyond the float range")
    return drop


def ndcg_at_k(scores: Sequence[float], relevance: Sequence[float], k: int = 10) -> float:
    """NDCG@k of the ranking by ``scores`` (descending; ties keep index order) against graded
    ``relevance`` (finite, >= 0), with gain ``rel / log2(rank + 1)``; in [0, 1]. Raises ValueError
    if nothing is relevant, for NaN scores, and for a ``k`` that is not an int >= 1 (TypeError)."""
    if len(scores) != len(relevance):
        raise ValueError(f"scores ({len(scores)}) and relevance ({len(relevance)}) differ in length")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not all(isinstance(r, (int, float)) and math.isfinite(r) and r >= 0 for r in relevance):
        raise ValueError("relevance must be finite numbers >= 0")
    if any(isinstance(x, float) and math.isnan(x) for x in scores):
        raise ValueError("scores contain NaN: the ranking is undefined")
    if not any(r > 0 for r in relevance):
        raise ValueError("relevance has no positive entry: NDCG is undefined")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    dcg = sum(relevance[i] / math.log2(rank + 2) for rank, i in enumerate(order[:k]))
    ideal = sorted(relevance, reverse=True)[:k]
    idcg = sum(r / math.log2(rank + 2) for rank, r in enumerate(ideal))
    return dcg / idcg


def prompt_segments(question: str, documents: Sequence[dict], fmt: str = "ao") -> tuple[list[str], list[int]]:
    """The user prompt of :func:`training.prompts.build_messages` cut into segments so that each
    ``[DOC i]`` block is one segment. Returns ``(segments, doc_segment_index)``; joining the
    segments gives exactly the user prompt."""
    text = build_messages(question, list(documents), fmt)[1]["content"]
    segments, doc_index, pos = [], [], 0
    for i, d in enumerate(documents):
        block = format_document(i, d.get("title", ""), d["text"])
        at = text.index(block, pos)
        segments.append(text[pos:at])
        doc_index.append(len(segments))
        segments.append(block)
        pos = at + len(block)
    segments.append(text[pos:])
    assert "".join(segments) == text
    return segments, doc_index


def attention_ranking_ndcg(model, tokenizer, question: str, documents: Sequence[dict], gold_ids: Sequence[int],
                           *, k: int = 10, fmt: str = "ao", query_chunk: int = 128) -> dict:
    """NDCG@k of the documents ranked by the prefill attention their ``[DOC i]`` spans receive.

    The prompt is the user prompt of format ``fmt`` (without chat markup), tokenised segment by
    segment with :func:`lckv.research.analysis.encode_segments`. Returns ``{"ndcg": float,
    "doc_attention": [float per document], "n_tokens": int}``.
    """
    from lckv.research.analysis import encode_segments, received_attention, span_sums

    if not documents:
        raise ValueError("documents must be non-empty")
    bad = [g for g in gold_ids if not 0 <= int(g) < len(documents)]
    if bad:
        raise ValueError(f"gold_ids {bad} are outside [0, {len(documents)})")
    segments, doc_index = prompt_segments(question, documents, fmt)
    ids, spans = encode_segments(tokenizer, segments)
    device = next(model.parameters()).device
    received = received_attention(model, torch.tensor(ids, dtype=torch.long, device=device), query_chunk=query_chunk)
    doc_attention = span_sums(received.cpu(), [spans[j] for j in doc_index])
    gold = {int(g) for g in gold_ids}
    relevance = [1.0 if i in gold else 0.0 for i in range(len(documents))]
    return {"ndcg": ndcg_at_k(doc_attention, relevance, k), "doc_attention": doc_attention, "n_tokens": len(ids)}
