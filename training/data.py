"""Data builder: multi-hop QA rows -> VERL GRPO parquet (one per reward format) and SFT parquet.

Pipeline, per question:

1. **Load** HotpotQA (original and HF ``hotpot_qa`` layouts), 2WikiMultihopQA or MuSiQue rows
   (``.json``, ``.jsonl`` or ``.parquet``) into :class:`QARecord`.
2. **Passage pool**: every paragraph of every row, split into passages of about
   ``passage_words`` words on sentence boundaries, deduplicated by normalised text. A passage is
   gold when it holds a supporting sentence (MuSiQue: any passage of a supporting paragraph).
3. **Hard negatives**: a retriever's top ``num_negatives`` pool passages for the question,
   gold excluded. :class:`BM25Retriever` (no model) is the default; :class:`EmbeddingRetriever`
   uses sentence-transformers. Any object with ``fit(texts)`` and ``search(query, k)`` works.
4. **False-negative promotion**: a negative whose :func:`~training.matching.passage_similarity`
   to a gold passage is >= ``promote_threshold`` (0.6) becomes relevant, optionally only if a
   ``confirm(question, answers, passage, gold_passages) -> bool`` callable agrees.
5. **Token cap**: relevant passages always stay; negatives are added in retrieval order while the
   whole prompt stays within ``max_tokens`` of the given token counter.
6. **Seeded shuffle** (per question: the same seed and id give the same order) and ``[DOC i]``
   tags, ``i`` from 0.

Output files in ``DIR``: ``{split}_{fmt}.parquet`` for each format (VERL's RL schema:
``data_source``, ``prompt`` (chat messages), ``ability``, ``reward_model {style, ground_truth}``,
``extra_info``), ``sft_{split}.parquet`` (``messages`` ending with the assistant's
``The answer is: ...``, for VERL's SFT trainer) and ``stats.json``.

CLI: ``python -m training.data --input FILE --output DIR [options]`` (``--help`` lists them).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.matching import normalize_answer, passage_similarity
from training.prompts import ANSWER_PREFIX, FORMATS, build_messages

__all__ = [
    "Passage", "QARecord", "Example", "load_records", "parse_record", "split_passages", "PassagePool",
    "BM25Retriever", "EmbeddingRetriever", "build_examples", "to_rl_rows", "to_sft_rows", "write_parquet",
    "make_token_counter", "DataFormatError", "LAYOUTS", "main",
]

logger = logging.getLogger("training.data")

LAYOUTS = ("auto", "hotpotqa", "hotpotqa_hf", "2wiki", "musique")
ABILITY = "in_context_retrieval"


class DataFormatError(ValueError):
    """An input row does not match the expected dataset layout."""


@dataclass(frozen=True)
class Passage:
    title: str
    text: str
    gold: bool = False

    @property
    def body(self) -> str:
        """What the prompt shows after the ``[DOC i]`` tag: ``title\\ntext``."""
        return f"{self.title}\n{self.text}"


@dataclass
class QARecord:
    id: str
    question: str
    answers: list[str]
    passages: list[Passage]
    source: str


@dataclass
class Example:
    """One built example: documents in prompt order and the ids of the relevant ones."""

    record: QARecord
    documents: list[Passage]
    gold_ids: list[int]
    promoted_ids: list[int] = field(default_factory=list)
    n_tokens: int = 0


# ----------------------------------------------------------------------------- loading
def _read_rows(path: Path) -> list[dict]:
    """The rows of one input file; a file that is not what its suffix says (truncated, corrupt,
    not UTF-8) raises :class:`DataFormatError` naming it."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl", ".parquet"):
        raise DataFormatError(f"input must be .json, .jsonl or .parquet, got {path.name!r}")
    if suffix == ".parquet":
        import pandas as pd

        try:
            return pd.read_parquet(path).to_dict(orient="records")
        except (ValueError, OSError) as exc:  # pyarrow: ArrowInvalid (a ValueError) or OSError
            raise DataFormatError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 text ({exc})") from None
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise DataFormatError(f"{path}: line {number} is not JSON ({exc})") from None
        return rows
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DataFormatError(f"{path}: not JSON ({exc})") from None
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def _tolist(x):
    return x.tolist() if isinstance(x, np.ndarray) else x


def detect_layout(row: dict) -> str:
    """Which of the dataset layouts a row is in (raises :class:`DataFormatError` if none)."""
    if not isinstance(row, dict):
        raise DataFormatError(f"a row must be a JSON object, got {type(row).__name__}")
    if "paragraphs" in row:
        return "musique"
    context = row.get("context")
    if isinstance(context, dict):
        return "hotpotqa_hf"
    if isinstance(_tolist(context), list):
        return "2wiki" if ("evidences" in row or row.get("type") in ("compositional", "inference",
                                                                    "bridge_comparison")) else "hotpotqa"
    raise DataFormatError(f"unrecognised row layout with keys {sorted(row)}; expected one of {LAYOUTS[1:]}")


def _answers(row: dict) -> list[str]:
    aliases = _tolist(row.get("answer_aliases"))
    if isinstance(aliases, str):  # one alias, not its characters
        aliases = [aliases]
    if aliases is not None and not isinstance(aliases, (list, tuple)):
        raise DataFormatError(f"row {row.get('_id', row.get('id'))!r}: answer_aliases must be a list of strings, "
                              f"got {type(aliases).__name__}")
    answers = [row.get("answer")] + list(aliases or [])
    out = []
    for a in answers:
        if isinstance(a, str) and a.strip() and a not in out:
            out.append(a)
    if not out:
        raise DataFormatError(f"row {row.get('_id', row.get('id'))!r} has no answer string")
    return out


def parse_record(row: dict, layout: str = "auto", passage_words: int = 100) -> QARecord:
    """One dataset row as a :class:`QARecord` with passages already split."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(row, dict):
        raise DataFormatError(f"a row must be a JSON object, got {type(row).__name__}")
    layout = detect_layout(row) if layout == "auto" else layout
    try:
        question = row["question"]
        rid = str(row.get("_id", row.get("id")))
        if layout == "musique":
            passages = []
            for p in _tolist(row["paragraphs"]):
                sents = _sentences(p["paragraph_text"])
                passages += [Passage(p["title"], t, bool(p.get("is_supporting"))) for t, _ in
                             split_passages(sents, set(), passage_words)]
            source = "musique"
        else:
            if layout == "hotpotqa_hf":
                ctx, sf = row["context"], row["supporting_facts"]
                sentences_key = "sentences" if "sentences" in ctx else "content"
                paragraphs = list(zip(_tolist(ctx["title"]), _tolist(ctx[sentences_key])))
                facts = list(zip(_tolist(sf["title"]), _tolist(sf["sent_id"])))
            else:
                paragraphs = [(p[0], p[1]) for p in _tolist(row["context"])]
                facts = [(f[0], f[1]) for f in _tolist(row["supporting_facts"])]
            support: dict[str, set[int]] = {}
            for title, sid in facts:
                support.setdefault(title, set()).add(int(sid))
            passages = []
            for title, sents in paragraphs:
                sents = [str(s) for s in _tolist(sents)]
                passages += [Passage(title, t, gold) for t, gold in
                             split_passages(sents, support.get(title, set()), passage_words)]
            source = "2wikimultihopqa" if layout == "2wiki" else "hotpotqa"
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as exc:
        raise DataFormatError(f"row {row.get('_id', row.get('id'))!r} does not match layout {layout!r}: {exc!r}") from None
    return QARecord(rid, str(question), _answers(row), passages, source)


def _sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", paragraph.strip()) if s]


def split_passages(sentences: Sequence[str], gold_sentences: set[int], passage_words: int = 100
                   ) -> list[tuple[str, bool]]:
    """Pack consecutive sentences into passages of at most ``passage_words`` words (a longer
    sentence is a passage of its own). Returns ``[(text, holds_a_gold_sentence), ...]``."""
    if passage_words < 1:
        raise ValueError(f"passage_words must be >= 1, got {passage_words}")
    out, cur, cur_words, cur_gold = [], [], 0, False
    for i, sent in enumerate(sentences):
        n = len(sent.split())
        if cur and cur_words + n > passage_words:
            out.append((" ".join(s.strip() for s in cur), cur_gold))
            cur, cur_words, cur_gold = [], 0, False
        cur.append(sent)
        cur_words += n
        cur_gold |= i in gold_sentences
    if cur and cur_words:
        out.append((" ".join(s.strip() for s in cur), cur_gold))
    return out


def load_records(paths: Sequence[str | Path], layout: str = "auto", passage_words: int = 100,
                 limit: int | None = None) -> list[QARecord]:
    """Rows of every input file as :class:`QARecord`, in file order (at most ``limit``). The
    settings are checked first (ValueError naming them), then each file (FileNotFoundError, or
    :class:`DataFormatError` naming the file or the row)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(passage_words, bool) or not isinstance(passage_words, int) or passage_words < 1:
        raise ValueError(f"passage_words must be an int >= 1, got {passage_words!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    records = []
    if limit == 0:
        return records
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist")
        for row in _read_rows(path):
            records.append(parse_record(row, layout, passage_words))
            if limit is not None and len(records) >= limit:
                return records
    return records


# ----------------------------------------------------------------------------- retrieval
class PassagePool:
    """All passages of all records, deduplicated by normalised text."""

    def __init__(self, records: Sequence[QARecord]):
        self.passages: list[Passage] = []
        self._index: dict[str, int] = {}
        for record in records:
            for p in record.passages:
                self.add(p)

    def add(self, passage: Passage) -> int:
        key = normalize_answer(passage.text)
        if key not in self._index:
            self._index[key] = len(self.passages)
            self.passages.append(Passage(passage.title, passage.text))
        return self._index[key]

    def id_of(self, passage: Passage) -> int:
        return self._index[normalize_answer(passage.text)]

    def __len__(self):
        return len(self.passages)


def _bm25_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


class BM25Retriever:
    """Okapi BM25 over title + text (rank-bm25), no model needed."""

    def __init__(self, k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self._bm25 = None

    def fit(self, texts: Sequence[str]) -> "BM25Retriever":
        from rank_bm25 import BM25Okapi

        if not texts:
            raise ValueError("texts must be a non-empty sequence of passages")
        self._bm25 = BM25Okapi([_bm25_tokens(t) or [""] for t in texts], k1=self.k1, b=self.b)
        self._n = len(texts)
        return self

    def search(self, query: str, k: int) -> list[int]:
        """Indices of the ``min(k, n)`` best passages, best first."""
        if self._bm25 is None:
            raise RuntimeError("call fit() before search()")
        scores = self._bm25.get_scores(_bm25_tokens(query))
        k = min(k, self._n)
        top = np.argpartition(-scores, k - 1)[:k] if k < self._n else np.arange(self._n)
        return [int(i) for i in top[np.argsort(-scores[top], kind="stable")]]


class EmbeddingRetriever:
    """Dense retrieval: inner product of normalised embeddings.

    ``model`` is a sentence-transformers model name (needs ``pip install sentence-transformers``
    and the model available locally or from its hub) or any object with
    ``encode(texts, batch_size=..., normalize_embeddings=True, convert_to_numpy=True)``
    returning an ``[n, dim]`` array.
    """

    def __init__(self, model, batch_size: int = 64, device: str | None = None):
        if isinstance(model, str):
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise ImportError("EmbeddingRetriever needs sentence-transformers: "
                                  "pip install sentence-transformers") from exc
            model = SentenceTransformer(model, device=device)
        if not callable(getattr(model, "encode", None)):
            raise TypeError(f"model must be a model name or have an encode() method, got {type(model).__name__}")
        self.model = model
        self.batch_size = batch_size
        self._emb = None

    def fit(self, texts: Sequence[str]) -> "EmbeddingRetriever":
        self._emb = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                      convert_to_numpy=True)
        return self

    def search(self, query: str, k: int) -> list[int]:
        if self._emb is None:
            raise RuntimeError("call fit() before search()")
        q = self.model.encode([query], batch_size=1, normalize_embeddings=True, convert_to_numpy=True)[0]
        scores = self._emb @ q
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        return [int(i) for i in top[np.argsort(-scores[top], kind="stable")]]


# ----------------------------------------------------------------------------- tokens
def make_token_counter(spec: str | None) -> Callable[[str], int]:
    """A ``text -> number of tokens`` function.

    ``spec``: None or ``"words"`` (whitespace words, a rough stand-in), ``"llama2c:<tok512.bin>"``
    (the stories260K tokenizer), or a local Hugging Face tokenizer directory.
    """
    if spec is None or spec == "words":
        return lambda text: len(text.split())
    if spec.startswith("llama2c:"):
        from lckv.research.llama2c import load_tokenizer

        tok = load_tokenizer(spec[len("llama2c:"):])
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def _prompt_tokens(count: Callable[[str], int], messages: list[dict]) -> int:
    # Chat-template markup adds a few tokens per message; 8 is a safe margin for common templates.
    return sum(count(m["content"]) + 8 for m in messages)


# ----------------------------------------------------------------------------- building
def build_examples(records: Sequence[QARecord], *, retriever=None, num_negatives: int = 500,
                   promote_threshold: float = 0.6, similarity: str = "mean",
                   confirm: Callable[..., bool] | None = None, max_tokens: int | None = 32768,
                   count_tokens: Callable[[str], int] | None = None, seed: int = 0,
                   progress: bool = False) -> tuple[list[Example], dict]:
    """Build one :class:`Example` per record (records whose relevant passages alone exceed
    ``max_tokens`` are skipped). Returns ``(examples, stats)``."""
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    if not 0.0 < promote_threshold <= 1.0:
        raise ValueError(f"promote_threshold must be in (0, 1], got {promote_threshold}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    count_tokens = count_tokens or make_token_counter(None)
    pool = PassagePool(records)
    retriever = retriever if retriever is not None else BM25Retriever()
    retriever.fit([p.body for p in pool.passages])
    stats = {"records": len(records), "pool_passages": len(pool), "examples": 0, "skipped_over_cap": 0,
             "promoted": 0, "documents": 0}
    examples = []
    iterator = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc="building examples", unit="question")
    longest_fmt = max(FORMATS, key=lambda f: len(build_messages("", [], f)[1]["content"]))
    for record in iterator:
        gold = [p for p in record.passages if p.gold]
        gold_ids = {pool.id_of(p) for p in gold}
        relevant = [pool.passages[i] for i in dict.fromkeys(pool.id_of(p) for p in gold)]
        negatives, promoted = [], []
        for pid in retriever.search(record.question, num_negatives + len(gold_ids)):
            if pid in gold_ids:
                continue
            cand = pool.passages[pid]
            if any(passage_similarity(cand.text, g.text, similarity) >= promote_threshold for g in gold) and (
                    confirm is None or confirm(record.question, record.answers, cand, gold)):
                promoted.append(cand)
            elif len(negatives) < num_negatives:
                negatives.append(cand)
        relevant += promoted
        docs = list(relevant)
        n_tokens = _prompt_tokens(count_tokens, build_messages(record.question, docs, longest_fmt))
        if max_tokens is not None and n_tokens > max_tokens:
            stats["skipped_over_cap"] += 1
            logger.warning("question %s: relevant passages alone take %d > %d tokens; skipped",
                           record.id, n_tokens, max_tokens)
            continue
        for neg in negatives:
            cost = count_tokens(f"[DOC {len(docs)}] {neg.body}") + 2
            if max_tokens is not None and n_tokens + cost > max_tokens:
                break
            docs.append(neg)
            n_tokens += cost
        if max_tokens is not None:  # per-block counts are not exactly additive: re-check the whole
            while len(docs) > len(relevant):
                n_tokens = _prompt_tokens(count_tokens, build_messages(record.question, docs, longest_fmt))
                if n_tokens <= max_tokens:
                    break
                docs.pop()
        rng = random.Random(f"{seed}:{record.id}")
        order = list(range(len(docs)))
        rng.shuffle(order)
        shuffled = [docs[i] for i in order]
        position = {orig: new for new, orig in enumerate(order)}
        examples.append(Example(record, shuffled, sorted(position[i] for i in range(len(relevant))),
                                sorted(position[i] for i in range(len(relevant) - len(promoted), len(relevant))),
                                n_tokens))
        stats["examples"] += 1
        stats["promoted"] += len(promoted)
        stats["documents"] += len(docs)
    return examples, stats


def _doc_dicts(example: Example) -> list[dict]:
    return [{"title": d.title, "text": d.text} for d in example.documents]


def to_rl_rows(examples: Sequence[Example], fmt: str, split: str = "train") -> list[dict]:
    """VERL RL rows for reward format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    rows = []
    for index, ex in enumerate(examples):
        rows.append({
            "data_source": ex.record.source,
            "prompt": build_messages(ex.record.question, _doc_dicts(ex), fmt),
            "ability": ABILITY,
            "reward_model": {"style": "rule",
                             "ground_truth": {"answers": list(ex.record.answers), "gold_ids": list(ex.gold_ids)}},
            "extra_info": {"index": index, "id": ex.record.id, "split": split, "format": fmt,
                           "question": ex.record.question, "documents": [d.body for d in ex.documents],
                           "promoted_ids": list(ex.promoted_ids)},
        })
    return rows


def to_sft_rows(examples: Sequence[Example], split: str = "train") -> list[dict]:
    """SFT rows: the answer-only prompt plus the target ``The answer is: <answer>``."""
    rows = []
    for index, ex in enumerate(examples):
        messages = build_messages(ex.record.question, _doc_dicts(ex), "ao")
        messages.append({"role": "assistant", "content": f"{ANSWER_PREFIX} {ex.record.answers[0]}"})
        rows.append({"messages": messages, "data_source": ex.record.source,
                     "extra_info": {"index": index, "id": ex.record.id, "split": split}})
    return rows


def _schemas():
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    rl = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(message)),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.struct([
            ("answers", pa.list_(pa.string())), ("gold_ids", pa.list_(pa.int64()))]))])),
        ("extra_info", pa.struct([("index", pa.int64()), ("id", pa.string()), ("split", pa.string()),
                                  ("format", pa.string()), ("question", pa.string()),
                                  ("documents", pa.list_(pa.string())), ("promoted_ids", pa.list_(pa.int64()))])),
    ])
    sft = pa.schema([("messages", pa.list_(message)), ("data_source", pa.string()),
                     ("extra_info", pa.struct([("index", pa.int64()), ("id", pa.string()), ("split", pa.string())]))])
    return rl, sft


def write_parquet(rows: list[dict], path: str | Path, kind: str = "rl") -> Path:
    """Write rows with the fixed RL (``kind="rl"``) or SFT (``kind="sft"``) schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rl, sft = _schemas()
    if kind not in ("rl", "sft"):
        raise ValueError(f"kind must be 'rl' or 'sft', got {kind!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=rl if kind == "rl" else sft), path)
    return path


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, nargs="+", help="dataset file(s): .json, .jsonl or .parquet")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--layout", default="auto", choices=LAYOUTS)
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    p.add_argument("--retriever", default="bm25", choices=("bm25", "embedding"))
    p.add_argument("--embedding-model", default=None, help="sentence-transformers model for --retriever embedding")
    p.add_argument("--num-negatives", type=int, default=500)
    p.add_argument("--passage-words", type=int, default=100)
    p.add_argument("--promote-threshold", type=float, default=0.6)
    p.add_argument("--similarity", default="mean", choices=("mean", "max", "jaccard", "char_f1", "ngram"))
    p.add_argument("--confirm-with-judge", action="store_true",
                   help="confirm promotions with the LLM judge (LCKV_JUDGE_URL / LCKV_JUDGE_MODEL)")
    p.add_argument("--max-tokens", type=int, default=32768, help="prompt token cap (0: no cap)")
    p.add_argument("--tokenizer", default=None,
                   help="token counter: a local HF tokenizer dir, llama2c:<tok512.bin>, or 'words' (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    p.add_argument("--no-progress", action="store_true")
    return p


def _judge_confirm(client):
    def confirm(question, answers, passage, gold_passages) -> bool:
        gold = "\n\n".join(g.body for g in gold_passages)
        messages = [{"role": "user", "content": (
            f"Question: {question}\nAnswer: {answers[0]}\n\nKnown relevant passages:\n{gold}\n\n"
            f"Candidate passage:\n{passage.body}\n\nDoes the candidate passage contain the same "
            "information needed to answer the question as a known relevant passage? Reply "
            "\\boxed{yes} or \\boxed{no}.")}]
        reply = client.complete(messages) or ""
        return "\\boxed{yes}" in reply.replace(" ", "").lower()

    return confirm


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise SystemExit(f"--formats must be a comma-separated subset of {','.join(FORMATS)}, got {args.formats!r}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise SystemExit(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.retriever == "embedding":
        if not args.embedding_model:
            raise SystemExit("--retriever embedding needs --embedding-model NAME")
        retriever = EmbeddingRetriever(args.embedding_model)
    else:
        retriever = BM25Retriever()
    confirm = None
    if args.confirm_with_judge:
        from training.judge import JudgeClient

        confirm = _judge_confirm(JudgeClient())
    records = load_records(args.input, args.layout, args.passage_words, args.limit)
    examples, stats = build_examples(
        records, retriever=retriever, num_negatives=args.num_negatives, promote_threshold=args.promote_threshold,
        similarity=args.similarity, confirm=confirm, max_tokens=args.max_tokens or None,
        count_tokens=make_token_counter(args.tokenizer), seed=args.seed, progress=not args.no_progress)
    n_val = int(round(len(examples) * args.val_fraction))
    splits = {"train": examples[n_val:], "val": examples[:n_val]} if n_val else {"train": examples}
    out = Path(args.output)
    files = []
    for split, exs in splits.items():
        for fmt in formats:
            files.append(str(write_parquet(to_rl_rows(exs, fmt, split), out / f"{split}_{fmt}.parquet", "rl")))
        files.append(str(write_parquet(to_sft_rows(exs, split), out / f"sft_{split}.parquet", "sft")))
    stats.update({"files": [Path(f).name for f in files], "splits": {k: len(v) for k, v in splits.items()},
                  "settings": {k: v for k, v in vars(args).items() if k not in ("input", "output")}})
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps({k: stats[k] for k in ("records", "pool_passages", "examples", "promoted",
                                            "skipped_over_cap", "splits")}))
    return stats


if __name__ == "__main__":
    main()
