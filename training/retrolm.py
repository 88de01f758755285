"""RetroLM stage 1: train the bookmark projections (:class:`lckv.retrolm.Bookmarks`) with the
backbone frozen, contrastively, on long contexts from the data builder.

An example is a HotpotQA row built by :func:`training.data.build_examples`: its gold passages
among BM25 hard negatives, shuffled, as ``[DOC i]`` blocks in the training prompt
(:func:`training.prompts.build_messages`, answer-only format, chat template), up to ``length``
tokens. The context is cut into pages of ``page_size`` tokens after the first ``sink`` (the
``retrolm`` policy's layout); the last ``query_tokens`` tokens (64: question and template tail,
what the policy's query bookmark reads at decode time, its resident window) form the query page.
A page is positive when it overlaps a gold passage's tokens.

Loss, per layer and kv head (RetroLM's page-level InfoNCE): the query page's bookmark query
scores every context page's bookmark key (:func:`lckv.retrolm.page_scores`) and
:func:`lckv.retrolm.info_nce` is taken over those scores with the gold pages as positives; the
loss is the mean over layers and kv heads. The backbone runs once per example without gradients
(its keys and values per layer are kept in memory, so later epochs skip it); gradients flow
through the bookmark stream into the bookmark projections and embedding only.

Measured per layer: gold-page recall@k (the share of gold pages among the ``k`` best-scored
pages, mean over kv heads and examples). ``python -m training.retrolm --help`` for the CLI; it
writes the bookmarks file (:meth:`lckv.retrolm.Bookmarks.save`) and a JSON history.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lckv.retrolm import Bookmarks, info_nce, page_scores
from training.data import QARecord, build_examples
from training.prompts import build_messages

__all__ = ["PageExample", "make_examples", "example_from_text", "stage1_loss", "train_stage1", "main"]


@dataclass
class PageExample:
    """One stage-1 input: token ids, the complete context pages and which of them hold gold text."""

    ids: list[int]
    positive: list[bool]  # per context page
    record_id: str = ""
    kv: list | None = None  # per layer (keys, values) of the frozen backbone, filled on first use


def _n_pages(n_tokens: int, page_size: int, sink: int) -> int:
    """Complete context pages before the query page (the last ``page_size`` tokens)."""
    return max(0, (n_tokens - page_size - sink) // page_size)


def example_from_text(tokenizer, text: str, gold_spans: list[tuple[int, int]], page_size: int, sink: int,
                      record_id: str = "") -> PageExample:
    """A :class:`PageExample` of ``text`` (rendered prompt) whose gold passages are the character
    spans ``gold_spans``; token positions of a span are the token counts of the text before its
    ends."""
    def count(prefix: str) -> int:
        return len(tokenizer.encode(prefix, add_special_tokens=False))

    ids = tokenizer.encode(text, add_special_tokens=False)
    pages = _n_pages(len(ids), page_size, sink)
    positive = [False] * pages
    for start, end in gold_spans:
        first, last = count(text[:start]), count(text[:end])
        for p in range(max(0, (first - sink) // page_size), min(pages, -(-(last - sink) // page_size))):
            positive[p] = True
    return PageExample(ids, positive, record_id)


def make_examples(tokenizer, records: list[QARecord], length: int, page_size: int = 128, sink: int = 4,
                  seed: int = 0) -> list[PageExample]:
    """Stage-1 examples of ``records`` at ``length`` tokens (see the module docstring); rows
    without a gold page (gold passages cut away) are dropped."""
    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    built, _ = build_examples(records, max_tokens=length - 64, count_tokens=count, seed=seed)
    out = []
    for example in built:
        messages = build_messages(example.record.question, example.documents, "ao")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        spans = []
        for j in example.gold_ids:
            start = text.index(f"[DOC {j}]")
            nxt = text.find(f"[DOC {j + 1}]", start)
            spans.append((start, nxt if nxt >= 0 else text.index("\n\nQuestion: ", start)))
        page_example = example_from_text(tokenizer, text, spans, page_size, sink, example.record.id)
        if any(page_example.positive):
            out.append(page_example)
    return out


def _backbone_kv(model, example: PageExample) -> list:
    if example.kv is None:
        with torch.no_grad():
            out = model(torch.tensor([example.ids]), use_cache=True)
        example.kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    return example.kv


def stage1_loss(model, bookmarks: Bookmarks, example: PageExample, page_size: int, sink: int,
                recall_at: int = 4, temperature: float = 1.0, query_tokens: int = 64
                ) -> tuple[torch.Tensor, list[float]]:
    """The example's loss (mean over layers and kv heads) and its gold-page recall@``recall_at``
    per layer. The query bookmark reads the last ``query_tokens`` tokens (at decode time the
    policy's query bookmark reads the resident window, 64 tokens by default)."""
    kv = _backbone_kv(model, example)
    pages, n = len(example.positive), len(example.ids)
    positive = torch.tensor(example.positive)
    h_pages, h_query = bookmarks.start(1, pages), bookmarks.start(1, 1)
    page_positions = sink + (torch.arange(pages) + 1) * page_size
    losses, recalls = [], []
    k_top = min(recall_at, pages)
    for layer, (keys, values) in enumerate(kv):
        batch, kv_heads, _, head_dim = keys.shape
        shape = (batch, kv_heads, pages, page_size, head_dim)
        span = slice(sink, sink + pages * page_size)
        _, k_pages, h_pages = bookmarks.step(layer, h_pages, keys[:, :, span].reshape(shape),
                                             values[:, :, span].reshape(shape), None, page_positions)
        tail = slice(n - query_tokens, n)
        q_query, _, h_query = bookmarks.step(layer, h_query, keys[:, :, tail][:, :, None], values[:, :, tail][:, :, None],
                                             None, torch.tensor([n]))
        scores = page_scores(q_query[:, 0], k_pages.transpose(1, 2), bookmarks.scaling)  # [1, kv_heads, pages]
        losses.append(info_nce(scores, positive.expand_as(scores), temperature))
        top = scores.topk(k_top, dim=-1).indices
        recalls.append(float(positive[top].float().sum(-1).mean() / positive.sum().clamp(max=k_top)))
    return torch.stack(losses).mean(), recalls


def evaluate(model, bookmarks, examples, page_size, sink, recall_at=4, query_tokens=64) -> dict:
    with torch.no_grad():
        results = [stage1_loss(model, bookmarks, ex, page_size, sink, recall_at, query_tokens=query_tokens)
                   for ex in examples]
    per_layer = [sum(r[1][layer] for r in results) / len(results) for layer in range(len(results[0][1]))]
    return {"loss": sum(float(r[0]) for r in results) / len(results), "recall_per_layer": per_layer,
            "recall": sum(per_layer) / len(per_layer)}


def train_stage1(model, train: list[PageExample], held_out: list[PageExample], *, page_size: int = 128,
                 sink: int = 4, epochs: int = 1, lr: float = 1e-4, recall_at: int = 4, seed: int = 0,
                 query_tokens: int = 64, bookmarks: Bookmarks | None = None, progress: bool = True
                 ) -> tuple[Bookmarks, list[dict]]:
    """Trains the bookmarks of ``model`` (backbone frozen) on ``train``; evaluates on ``held_out``
    before training and after every epoch. Returns the bookmarks and the history."""
    if not train or not held_out:
        raise ValueError(f"train and held_out need examples, got {len(train)} and {len(held_out)}")
    model.requires_grad_(False)
    bookmarks = bookmarks or Bookmarks(model)
    optimizer = torch.optim.AdamW(bookmarks.parameters(), lr=lr, weight_decay=0.0)
    history = [{"epoch": 0, **evaluate(model, bookmarks, held_out, page_size, sink, recall_at, query_tokens)}]
    rng = random.Random(seed)
    for epoch in range(1, epochs + 1):
        order = list(train)
        rng.shuffle(order)
        start, total = time.perf_counter(), 0.0
        bar = order
        if progress:
            from tqdm import tqdm

            bar = tqdm(order, desc=f"retrolm stage 1, epoch {epoch}", unit="example", file=sys.stderr)
        for example in bar:
            loss, _ = stage1_loss(model, bookmarks, example, page_size, sink, recall_at, query_tokens=query_tokens)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            if progress:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch, "train_loss": total / len(order), "epoch_s": time.perf_counter() - start,
                        **evaluate(model, bookmarks, held_out, page_size, sink, recall_at, query_tokens)})
    return bookmarks, history


def _rows(spec: str, n: int) -> range:
    first, _, last = spec.partition(":")
    return range(int(first or 0), min(n, int(last) if last else n))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="RetroLM stage 1: train the bookmark projections (backbone frozen)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a lckv.models registry name")
    parser.add_argument("--length", type=int, default=4096, help="tokens per example")
    parser.add_argument("--page-size", type=int, default=128)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--train-rows", default="0:16", help="HotpotQA rows to train on, first:last")
    parser.add_argument("--eval-rows", default="80:88", help="held-out rows, first:last")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--recall-at", type=int, default=4, help="pages for the gold-page recall")
    parser.add_argument("--query-tokens", type=int, default=64,
                        help="tokens the query bookmark reads (the policy's resident window, 64 by default)")
    parser.add_argument("--out", type=Path, default=None,
                        help="bookmarks file (default ~/.cache/lckv/retrolm/<model>_p<page>.pt)")
    args = parser.parse_args(argv)
    from lckv.models import load
    from lckv.research.data import hotpotqa_path
    from training.data import load_records

    torch.manual_seed(0)
    model, tokenizer = load(args.model)
    records = load_records([hotpotqa_path()])
    train = make_examples(tokenizer, [records[i] for i in _rows(args.train_rows, len(records))], args.length,
                          args.page_size, args.sink)
    held_out = make_examples(tokenizer, [records[i] for i in _rows(args.eval_rows, len(records))], args.length,
                             args.page_size, args.sink, seed=1)
    bookmarks, history = train_stage1(model, train, held_out, page_size=args.page_size, sink=args.sink,
                                      epochs=args.epochs, lr=args.lr, recall_at=args.recall_at,
                                      query_tokens=args.query_tokens)
    out = args.out or Path.home() / ".cache" / "lckv" / "retrolm" / f"{args.model}_p{args.page_size}.pt"
    bookmarks.save(out)
    report = {"model": args.model, "length": args.length, "page_size": args.page_size, "sink": args.sink,
              "train_examples": len(train), "held_out_examples": len(held_out), "lr": args.lr,
              "recall_at": args.recall_at, "query_tokens": args.query_tokens, "bookmarks": str(out),
              "history": history}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    for entry in history:
        print(f"epoch {entry['epoch']}: held-out loss {entry['loss']:.4f}, gold-page recall@{args.recall_at} "
              f"{entry['recall']:.3f}" + (f", train loss {entry['train_loss']:.4f}, {entry['epoch_s']:.0f} s"
                                          if "train_loss" in entry else ""))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
