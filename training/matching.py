"""Text normalisation and fuzzy matching shared by the data builder, the rewards and the scorers.

Answer normalisation follows SQuAD/HELMET: lowercase, drop punctuation, drop the articles
"a", "an", "the", collapse whitespace. Fuzzy similarities return floats in [0, 1]:

* :func:`jaccard` — word-set Jaccard of the normalised texts.
* :func:`char_f1` — character-level F1 of the longest common subsequence alignment
  (rapidfuzz's normalised Indel similarity, ``2 * matches / (len(a) + len(b))``).
* :func:`ngram_overlap` — shared word n-grams over the n-grams of the shorter text.
* :func:`partial_similarity` — best alignment of a short text inside a long one (quote checks).

Every function accepts empty strings (similarity 0, never a division by zero).
"""
from __future__ import annotations

import re
import string
from collections.abc import Iterable

from rapidfuzz import fuzz

__all__ = [
    "normalize_answer", "subem", "jaccard", "char_f1", "ngram_overlap", "passage_similarity",
    "partial_similarity", "word_count", "SIMILARITY_METHODS",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014")


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def subem(prediction: str, answers: Iterable[str]) -> float:
    """Sub-exact match (HELMET): 1.0 if a normalised gold alias is contained in the normalised
    prediction, else 0.0; max over aliases. Aliases that normalise to "" never match."""
    pred = normalize_answer(prediction)
    if not pred:
        return 0.0
    for answer in answers:
        gold = normalize_answer(answer)
        if gold and _contains_words(pred, gold):
            return 1.0
    return 0.0


def _contains_words(haystack: str, needle: str) -> bool:
    # Containment on word boundaries of the normalised text ("1" is not inside "1990").
    return f" {needle} " in f" {haystack} "


def word_count(text: str) -> int:
    return len(text.split())


def jaccard(a: str, b: str) -> float:
    sa, sb = set(normalize_answer(a).split()), set(normalize_answer(b).split())
    if not sa or not sb:
        return 0.0
    return len(sa & sb) / len(sa | sb)


def char_f1(a: str, b: str) -> float:
    na, nb = normalize_answer(a), normalize_answer(b)
    if not na or not nb:
        return 0.0
    return fuzz.ratio(na, nb) / 100.0


def ngram_overlap(a: str, b: str, n: int = 3) -> float:
    wa, wb = normalize_answer(a).split(), normalize_answer(b).split()
    ga = {tuple(wa[i:i + n]) for i in range(len(wa) - n + 1)}
    gb = {tuple(wb[i:i + n]) for i in range(len(wb) - n + 1)}
    if not ga or not gb:
        return 0.0
    return len(ga & gb) / min(len(ga), len(gb))


SIMILARITY_METHODS = {"jaccard": jaccard, "char_f1": char_f1, "ngram": ngram_overlap}


def passage_similarity(a: str, b: str, method: str = "mean") -> float:
    """Similarity of two passages for false-negative promotion.

    ``method`` is one of ``"jaccard"``, ``"char_f1"``, ``"ngram"``, ``"mean"`` (average of the
    three, the default) or ``"max"``. Unrelated English passages score high on ``char_f1`` alone
    (a long common subsequence always exists), which is why the default averages the three.
    """
    if method in SIMILARITY_METHODS:
        return SIMILARITY_METHODS[method](a, b)
    scores = [fn(a, b) for fn in SIMILARITY_METHODS.values()]
    if method == "mean":
        return sum(scores) / len(scores)
    if method == "max":
        return max(scores)
    raise ValueError(f"method must be one of {sorted(SIMILARITY_METHODS) + ['mean', 'max']}, got {method!r}")


def partial_similarity(short: str, long: str) -> float:
    """How well ``short`` occurs inside ``long`` (best-aligned substring), in [0, 1], on
    normalised text. An exact substring scores 1.0."""
    ns, nl = normalize_answer(short), normalize_answer(long)
    if not ns or not nl:
        return 0.0
    if ns in nl:
        return 1.0
    return fuzz.partial_ratio(ns, nl) / 100.0
