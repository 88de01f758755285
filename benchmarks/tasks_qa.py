"""Long-context QA from real HotpotQA rows, at a requested token length.

A sample is one HotpotQA question (``../shared/data/hotpotqa``, read through
:mod:`lckv.research.data`) with its documents: its gold passages always, then, as padding until
the prompt reaches the length, its own distractor passages and then passages of the other rows,
each group in BM25 order for the question (hard negatives first; the pool, the passage split and
the retriever are the training data builder's: :class:`training.data.PassagePool`,
:class:`training.data.BM25Retriever`). The last padding passage is cut by words so the prompt
lands within a word of the length. Documents carry ``[DOC i]`` tags and the prompt is the
training prompt (:func:`training.prompts.build_messages`, answer-only format); the reply is
scored with the project's SubEM (:func:`training.scorers.subem_score`).

Document order (``order``):

* ``shuffled`` — seeded shuffle (the default);
* ``retrieval`` — by BM25 score, best first;
* ``reversed`` — by BM25 score, best last (next to the question);
* ``ends`` — best at both ends, worst in the middle (the retrieval reordering of "Long-Context
  LLMs Meet RAG"): ranks 1, 3, 5, ... from the front, then ..., 6, 4, 2 to the back.

Sample ``seed`` takes row ``seed % rows``. Imports :mod:`training` (the repository root must be on
``sys.path``, as it is for the benchmarks).
"""
from __future__ import annotations

import functools
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds `training`

from lckv.research.data import hotpotqa_path  # noqa: E402
from lckv.research.tasks import TaskSample, count_tokens, largest_fitting  # noqa: E402
from training.data import BM25Retriever, Passage, PassagePool, QARecord, load_records  # noqa: E402
from training.prompts import ANSWER_PREFIX, build_messages  # noqa: E402

__all__ = ["ORDERS", "QA_TASKS", "QACorpus", "task_name", "order_documents", "hotpotqa_sample"]

ORDERS = ("shuffled", "retrieval", "reversed", "ends")


@dataclass
class QACorpus:
    """The rows, their passage pool and a BM25 retriever fitted on it."""

    records: list[QARecord]
    pool: PassagePool
    retriever: BM25Retriever

    @classmethod
    @functools.lru_cache(maxsize=2)
    def load(cls, path: str | None = None, passage_words: int = 100) -> "QACorpus":
        records = load_records([Path(path) if path else hotpotqa_path()], passage_words=passage_words)
        pool = PassagePool(records)
        return cls(records, pool, BM25Retriever().fit([p.body for p in pool.passages]))

    def ranking(self, question: str) -> dict[int, int]:
        """Pool id -> BM25 rank for ``question`` (0 is best)."""
        return {pid: rank for rank, pid in enumerate(self.retriever.search(question, len(self.pool)))}


def task_name(order: str) -> str:
    return "hotpotqa" if order == "shuffled" else f"hotpotqa_{order}"


def order_documents(ranked: list, order: str, rng: random.Random) -> list:
    """``ranked`` (best first) in ``order`` (one of :data:`ORDERS`)."""
    if order == "retrieval":
        return list(ranked)
    if order == "reversed":
        return list(reversed(ranked))
    if order == "ends":
        return list(ranked[0::2]) + list(reversed(ranked[1::2]))
    if order == "shuffled":
        out = list(ranked)
        rng.shuffle(out)
        return out
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def hotpotqa_sample(tokenizer, length: int, seed: int = 0, *, order: str = "shuffled",
                    corpus: QACorpus | None = None) -> TaskSample:
    """The QA sample of row ``seed % rows`` at ``length`` tokens of ``sample.prompt`` (see the
    module docstring). ``metadata``: row id, order, documents, ``gold_ids`` (their ``[DOC i]``
    numbers), ``gold_depths`` (tokens before each gold tag / prompt tokens), ``ranks`` (BM25 rank
    of each document in prompt order). Raises :class:`~lckv.research.tasks.TaskTooShortError`
    when the gold passages alone exceed the length."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    corpus = corpus or QACorpus.load()
    record = corpus.records[seed % len(corpus.records)]
    rank = corpus.ranking(record.question)
    own = list(dict.fromkeys(corpus.pool.id_of(p) for p in record.passages))
    gold = list(dict.fromkeys(corpus.pool.id_of(p) for p in record.passages if p.gold))
    own_distractors = sorted((i for i in own if i not in gold), key=rank.__getitem__)
    others = sorted((i for i in rank if i not in set(own)), key=rank.__getitem__)
    padding = own_distractors + others
    padding_words = [len(corpus.pool.passages[i].text.split()) for i in padding]
    task = task_name(order)

    def documents(n_words: int) -> list[tuple[int, Passage]]:
        """Gold, then padding passages holding ``n_words`` words (the last one cut)."""
        docs = [(i, corpus.pool.passages[i]) for i in gold]
        for i, words in zip(padding, padding_words):
            if n_words <= 0:
                break
            passage = corpus.pool.passages[i]
            if words > n_words:
                passage = Passage(passage.title, " ".join(passage.text.split()[:n_words]))
            docs.append((i, passage))
            n_words -= words
        ranked = sorted(docs, key=lambda d: rank[d[0]])
        return order_documents(ranked, order, random.Random(f"{task}:{seed}"))

    def build(n_words: int) -> TaskSample:
        docs = documents(n_words)
        system, user = (m["content"] for m in build_messages(record.question, [d for _, d in docs], "ao"))
        cut = user.rindex("\n\nQuestion: ")
        sample = TaskSample(task, user[:cut], user[cut + 2:], list(record.answers), ANSWER_PREFIX, "subem", 32,
                            system=system)
        sample.metadata["documents"] = docs
        return sample

    sample = build(largest_fitting(lambda n: count_tokens(tokenizer, build(n).prompt), length, sum(padding_words)))
    docs = sample.metadata.pop("documents")
    n_tokens = count_tokens(tokenizer, sample.prompt)
    gold_ids = [j for j, (i, _) in enumerate(docs) if i in gold]
    sample.metadata = {
        "task": task, "length": length, "n_tokens": n_tokens, "seed": seed, "row": record.id, "order": order,
        "n_documents": len(docs), "gold_ids": gold_ids, "ranks": [rank[i] for i, _ in docs],
        "gold_depths": [count_tokens(tokenizer, sample.prompt[:sample.prompt.index(f"[DOC {j}]")]) / n_tokens
                        for j in gold_ids],
    }
    return sample


#: task name -> builder: ``hotpotqa`` (shuffled), ``hotpotqa_retrieval``, ``hotpotqa_reversed``, ``hotpotqa_ends``
QA_TASKS = {task_name(o): functools.partial(hotpotqa_sample, order=o) for o in ORDERS}
