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

Stage 2 (``--stage 2``, :func:`train_stage2`): post-trains the model on the sparse KV the
``retrolm`` policy serves. An example is the same built prompt with the SFT baseline's target
(``The answer is: <answer>``, :func:`training.data.to_sft_rows`). The loss
(:func:`stage2_loss`) is the answer tokens' mean cross-entropy, computed the way the policy
serves them: the prompt is prefilled in chunks through an :class:`~lckv.cache.LckvCache` under
``lckv.enable(model, "retrolm", prefill="retrieval", ...)`` (pages retrieved by the bookmarks
during prefill, no gradients), then the answer is teacher forced as one more chunk with
gradients: sink, window and the chunk exactly, plus the ``prefill_select`` rows of the pages its
bookmark ranks best, merged by LSE (lckv.attention.attend_chunk_with_selection). Decoding attends
the pages each new token's bookmark picks (``budget``); the teacher-forced chunk picks one set of
pages per block of ``prefill_block`` tokens, and the prompt's keys and values get no gradient
(they were computed without one, as served). The bookmarks stay frozen; the parameters whose
names match ``--train-params`` (default: the attention projections) train with AdamW. The trained
parameters are written with the base model's fingerprint (:func:`save_post_trained`,
:func:`load_post_trained`). A YAML file of the same settings (``--config``, e.g.
``training/configs/retrolm_stage2.yaml``) is the run's configuration; flags override it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from lckv.retrolm import Bookmarks, info_nce, model_fingerprint, page_scores, read_state_file, write_state_file
from training.data import QARecord, build_examples, to_sft_rows
from training.prompts import build_messages

__all__ = ["PageExample", "make_examples", "example_from_text", "stage1_loss", "train_stage1", "AnswerExample",
           "make_answer_examples", "stage2_loss", "train_stage2", "save_post_trained", "load_post_trained", "STAGE2_FORMAT",
           "main"]

STAGE2_FORMAT = "lckv-retrolm-stage2/1"


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


def _built(tokenizer, records: list[QARecord], length: int, seed: int):
    """The data builder's examples of ``records`` fitting ``length`` tokens with room for 64 more."""
    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    return build_examples(records, max_tokens=length - 64, count_tokens=count, seed=seed)[0]


def make_examples(tokenizer, records: list[QARecord], length: int, page_size: int = 128, sink: int = 4,
                  seed: int = 0) -> list[PageExample]:
    """Stage-1 examples of ``records`` at ``length`` tokens (see the module docstring); rows
    without a gold page (gold passages cut away) are dropped."""
    built = _built(tokenizer, records, length, seed)
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
        with torch.no_grad():  # the keys and values only: no logits over the whole example
            out = model(torch.tensor([example.ids]), use_cache=True, logits_to_keep=1)
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


def evaluate(model, bookmarks, examples, page_size, sink, recall_at=4, query_tokens=64, progress: bool = False
             ) -> dict:
    if progress:
        from tqdm import tqdm

        examples = tqdm(examples, desc="retrolm stage 1, held-out", unit="example", file=sys.stderr)
    with torch.no_grad():
        results = [stage1_loss(model, bookmarks, ex, page_size, sink, recall_at, query_tokens=query_tokens)
                   for ex in examples]
    per_layer = [sum(r[1][layer] for r in results) / len(results) for layer in range(len(results[0][1]))]
    return {"loss": sum(float(r[0]) for r in results) / len(results), "recall_per_layer": per_layer,
            "recall": sum(per_layer) / len(per_layer)}


def train_stage1(model, train: list[PageExample], held_out: list[PageExample], *, page_size: int = 128,
                 sink: int = 4, epochs: int = 1, lr: float = 1e-4, recall_at: int = 4, seed: int = 0,
                 query_tokens: int = 64, bookmarks: Bookmarks | None = None, progress: bool = True,
                 keep_best: bool = False, rank: int | None = None, anchor: float = 0.0
                 ) -> tuple[Bookmarks, list[dict]]:
    """Trains the bookmarks of ``model`` (backbone frozen) on ``train``; evaluates on ``held_out``
    before training and after every epoch. Returns the bookmarks and the history. With
    ``keep_best`` the bookmarks returned are those of the epoch with the best held-out gold-page
    recall (epoch 0: as given, untrained by default), and the history's last entry names it
    (``kept_epoch``): training can make the retriever worse (Qwen2.5-0.5B at 8K, lr 3e-3).

    Two regularisers against overfitting a few rows (the projections are ~25M parameters on
    Qwen2.5-0.5B): ``rank`` trains a low-rank delta ``B @ A`` of that rank on every bookmark
    projection's weight (biases and the copied weights frozen, the embedding trained; merged into
    the weights when training ends, so the file is the usual one), and ``anchor`` adds
    ``anchor * sum((p - p_initial)^2)`` over the trained parameters to every example's loss (an L2
    pull toward the starting point, not toward zero)."""
    if not train or not held_out:
        raise ValueError(f"train and held_out need examples, got {len(train)} and {len(held_out)}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    if not anchor >= 0.0:
        raise ValueError(f"anchor must be >= 0, got {anchor!r}")
    model.requires_grad_(False)
    bookmarks = bookmarks or Bookmarks(model)
    with _low_rank_deltas(bookmarks, rank, seed):
        trained = [p for p in bookmarks.parameters() if p.requires_grad]
        start_values = [p.detach().clone() for p in trained] if anchor > 0 else None
        optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
        history = [{"epoch": 0,
                    **evaluate(model, bookmarks, held_out, page_size, sink, recall_at, query_tokens, progress)}]
        best = (history[0]["recall"], 0, copy.deepcopy(bookmarks.state_dict())) if keep_best else None
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
                objective = loss
                if start_values is not None:
                    objective = loss + anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(trained, start_values))
                optimizer.zero_grad()
                objective.backward()
                optimizer.step()
                total += loss.item()
                if progress:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
            history.append({"epoch": epoch, "train_loss": total / len(order), "epoch_s": time.perf_counter() - start,
                            **evaluate(model, bookmarks, held_out, page_size, sink, recall_at, query_tokens, progress)})
            if best is not None and history[-1]["recall"] > best[0]:
                best = (history[-1]["recall"], epoch, copy.deepcopy(bookmarks.state_dict()))
        if best is not None:
            bookmarks.load_state_dict(best[2])
            history[-1]["kept_epoch"] = best[1]
    return bookmarks, history


class _LowRankDelta(nn.Module):
    """``weight + B @ A`` (a parametrization of a linear layer's weight): ``B`` starts at zero, so
    the layer starts as it was."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator):
        super().__init__()
        bound = in_features ** -0.5
        self.A = nn.Parameter(torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.B @ self.A).to(weight.dtype)


@contextlib.contextmanager
def _low_rank_deltas(bookmarks: Bookmarks, rank: int | None, seed: int):
    """Inside: every bookmark projection frozen, its weight given a trainable :class:`_LowRankDelta`
    (nothing changes when ``rank`` is None). On exit, also on an error, the deltas are folded into
    the weights, plain trainable parameters again as :class:`Bookmarks` makes them, so the state and
    the file have the usual names."""
    linears = [linear for projections in (bookmarks.q, bookmarks.k, bookmarks.v) for linear in projections]
    if rank is None:
        yield
        return
    generator = torch.Generator().manual_seed(seed)
    for linear in linears:
        linear.requires_grad_(False)
        delta = _LowRankDelta(linear.out_features, linear.in_features, rank, generator)
        parametrize.register_parametrization(linear, "weight", delta.to(linear.weight.dtype))
    try:
        yield
    finally:
        for linear in linears:
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
            linear.requires_grad_(True)


# ----------------------------------------------------------------------------------- stage 2
@dataclass
class AnswerExample:
    """One stage-2 input: the rendered prompt's token ids and the target answer's."""

    prompt_ids: list[int]
    answer_ids: list[int]
    record_id: str = ""


def make_answer_examples(tokenizer, records: list[QARecord], length: int, seed: int = 0) -> list[AnswerExample]:
    """Stage-2 examples of ``records``: the training prompt of :func:`make_examples` (answer-only
    format, chat template, up to ``length`` tokens with the answer) and the SFT target."""
    out = []
    for row in to_sft_rows(_built(tokenizer, records, length, seed)):
        messages = row["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        whole = tokenizer.apply_chat_template(messages, tokenize=False)
        if not whole.startswith(prompt):
            raise ValueError(f"the chat template renders the prompt of {row['extra_info']['id']} differently "
                             "with and without the answer; stage 2 needs the answer to extend the prompt")
        out.append(AnswerExample(tokenizer.encode(prompt, add_special_tokens=False),
                                 tokenizer.encode(whole[len(prompt):].rstrip("\n"), add_special_tokens=False),
                                 row["extra_info"]["id"]))
    return out


def _serving_policy(cache):
    from lckv.policies.selection import SelectionPolicy

    policy = cache.layers[0].policy if cache.layers else None
    if not (isinstance(policy, SelectionPolicy) and policy.prefill == "retrieval"):
        raise ValueError("stage 2 trains on the sparse KV of a selection policy with prefill='retrieval': call "
                         "lckv.enable(model, 'retrolm', prefill='retrieval', ...) first "
                         f"(the model's policy is {policy!r})")
    return policy


def stage2_loss(model, example: AnswerExample, chunk: int = 2048) -> torch.Tensor:
    """The answer tokens' mean cross-entropy under the model's enabled policy (see the module
    docstring): the prompt prefilled through a new LckvCache without gradients in chunks of
    ``chunk`` tokens, then its last token and the answer but its last token as one chunk with
    gradients. The cache is told where the prompt ends (:attr:`lckv.cache.LckvCache.prompt_end`), so
    the prompt's last ``prefill_exact_tail`` positions attend exactly and the answer attends as
    decoding would, as when serving. The answer needs at least 2 tokens (a chunk of one would take
    the decode path)."""
    import lckv

    if len(example.answer_ids) < 2 or not example.prompt_ids:
        raise ValueError(f"stage 2 needs a prompt and an answer of >= 2 tokens, got {len(example.prompt_ids)} and "
                         f"{len(example.answer_ids)}")
    cache = lckv.new_cache(model)
    _serving_policy(cache)
    cache.prompt_end = len(example.prompt_ids)
    prompt = torch.tensor([example.prompt_ids])
    n = prompt.shape[1] - 1
    with torch.no_grad():
        for lo in range(0, n, chunk):
            model(prompt[:, lo:min(n, lo + chunk)], past_key_values=cache, use_cache=True, logits_to_keep=1)
    forced = torch.tensor([example.prompt_ids[-1:] + example.answer_ids[:-1]])
    logits = model(forced, past_key_values=cache, use_cache=True).logits[0]
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(example.answer_ids))


def _trained_parameters(model, pattern: str) -> dict[str, torch.nn.Parameter]:
    chosen = {name: p for name, p in model.named_parameters() if re.search(pattern, name)}
    if not chosen:
        raise ValueError(f"train_params {pattern!r} matches no parameter of {type(model).__name__}")
    return chosen


def train_stage2(model, train: list[AnswerExample], held_out: list[AnswerExample], *, epochs: int = 1,
                 lr: float = 1e-5, train_params: str = r"self_attn\.", chunk: int = 2048, seed: int = 0,
                 max_steps: int | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Post-trains the parameters of ``model`` whose names match ``train_params`` (a regex; the
    rest and the bookmarks stay frozen) on ``train`` with :func:`stage2_loss`, one example per
    AdamW step, at most ``max_steps`` steps; evaluates on ``held_out`` before training and after
    every epoch. Returns the trained parameters (name -> tensor) and the history."""
    if not train or not held_out:
        raise ValueError(f"train and held_out need examples, got {len(train)} and {len(held_out)}")
    chosen = _trained_parameters(model, train_params)
    model.requires_grad_(False)
    for p in chosen.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(chosen.values(), lr=lr, weight_decay=0.0)

    def held_out_loss() -> float:
        with torch.no_grad():
            return sum(float(stage2_loss(model, ex, chunk)) for ex in held_out) / len(held_out)

    history = [{"epoch": 0, "loss": held_out_loss()}]
    rng, steps = random.Random(seed), 0
    for epoch in range(1, epochs + 1):
        order = list(train)
        rng.shuffle(order)
        if max_steps is not None:
            order = order[:max(0, max_steps - steps)]
        if not order:
            break
        start, total = time.perf_counter(), 0.0
        bar = order
        if progress:
            from tqdm import tqdm

            bar = tqdm(order, desc=f"retrolm stage 2, epoch {epoch}", unit="example", file=sys.stderr)
        for example in bar:
            loss = stage2_loss(model, example, chunk)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
            if progress:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch, "steps": steps, "train_loss": total / len(order),
                        "epoch_s": time.perf_counter() - start, "loss": held_out_loss()})
    model.requires_grad_(False)
    return {name: p.detach() for name, p in chosen.items()}, history


def save_post_trained(path: str | Path, fingerprint: dict, state: dict) -> Path:
    """Writes stage 2's trained parameters keyed to the base model's ``fingerprint``
    (:func:`lckv.retrolm.model_fingerprint` taken before training), atomically."""
    return write_state_file(path, STAGE2_FORMAT, fingerprint, state)


def load_post_trained(model, path: str | Path) -> list[str]:
    """Loads stage 2's parameters into the base ``model`` they were trained from; returns their
    names. Raises :class:`lckv.retrolm.StateFileError` for a corrupt file, another format or
    model, or names/shapes the model does not have."""
    from lckv.retrolm import StateFileError

    state = read_state_file(path, STAGE2_FORMAT, model_fingerprint(model), "stage-2 parameters")
    own = dict(model.named_parameters())
    wrong = sorted(name for name, t in state.items() if name not in own or own[name].shape != t.shape)
    if wrong:
        raise StateFileError(f"stage-2 parameters: {path} holds parameters this model lacks or shapes it does not "
                             f"have: {', '.join(wrong[:5])}")
    with torch.no_grad():
        for name, t in state.items():
            own[name].copy_(t)
    return sorted(state)


def _rows(spec: str, n: int) -> range:
    first, _, last = spec.partition(":")
    return range(int(first or 0), min(n, int(last) if last else n))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="RetroLM stage 1 (bookmark projections, backbone frozen) and "
                                                 "stage 2 (post-training on the policy's sparse KV)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1)
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file of these settings (keys as the flags, with _); flags given override it")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a lckv.models registry name")
    parser.add_argument("--length", type=int, default=4096, help="tokens per example")
    parser.add_argument("--page-size", type=int, default=128)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--train-rows", default="0:16", help="HotpotQA rows to train on, first:last")
    parser.add_argument("--eval-rows", default="80:88", help="held-out rows, first:last")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--keep-best", action="store_true",
                        help="stage 1: keep the epoch with the best held-out gold-page recall (0: untrained)")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-4 (stage 1), 1e-5 (stage 2)")
    parser.add_argument("--recall-at", type=int, default=4, help="stage 1: pages for the gold-page recall")
    parser.add_argument("--rank", type=int, default=None,
                        help="stage 1: train low-rank deltas of this rank on the projections (default: full)")
    parser.add_argument("--anchor", type=float, default=0.0,
                        help="stage 1: L2 pull toward the initial bookmarks (weight of sum((p - p0)^2))")
    parser.add_argument("--query-tokens", type=int, default=None,
                        help="stage 1: tokens the query bookmark reads (default: what the policy's query "
                             "bookmark reads at decode time, its resident window of 64 or the page size if smaller)")
    parser.add_argument("--bookmarks", type=Path, default=None,
                        help="stage 2: the stage-1 bookmarks file (default: untrained bookmarks)")
    parser.add_argument("--budget", default="0.05", help="stage 2: the policy's decode budget (fraction or count)")
    parser.add_argument("--window", type=int, default=64, help="stage 2: the policy's resident window")
    parser.add_argument("--prefill-select", type=int, default=512, help="stage 2: rows each block attends")
    parser.add_argument("--chunk", type=int, default=2048, help="stage 2: prefill chunk")
    parser.add_argument("--train-params", default=r"self_attn\.", help="stage 2: regex of the parameters to train")
    parser.add_argument("--max-steps", type=int, default=None, help="stage 2: stop after this many examples")
    parser.add_argument("--out", type=Path, default=None,
                        help="output file (default ~/.cache/lckv/retrolm/<model>_p<page>.pt, stage 2: "
                             "<model>_p<page>_stage2.pt)")
    return parser


def _args(argv) -> argparse.Namespace:
    """The flags over the ``--config`` file's settings over the defaults."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        import yaml

        if not args.config.is_file():
            raise SystemExit(f"--config: no file at {args.config}")
        settings = yaml.safe_load(args.config.read_text()) or {}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(settings) - known)
        if not isinstance(settings, dict) or unknown:
            raise SystemExit(f"--config {args.config}: unknown settings {unknown or settings!r}; known: {sorted(known)}")
        parser.set_defaults(**settings)
        args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-4 if args.stage == 1 else 1e-5
    if args.query_tokens is None:
        args.query_tokens = min(64, args.page_size)
    return args


def main(argv=None) -> dict:
    args = _args(argv)
    from lckv.models import load
    from lckv.research.data import hotpotqa_path
    from training.data import load_records

    torch.manual_seed(0)
    model, tokenizer = load(args.model)
    records = load_records([hotpotqa_path()])
    train_records = [records[i] for i in _rows(args.train_rows, len(records))]
    eval_records = [records[i] for i in _rows(args.eval_rows, len(records))]
    suffix = "" if args.stage == 1 else "_stage2"
    out = args.out or Path.home() / ".cache" / "lckv" / "retrolm" / f"{args.model}_p{args.page_size}{suffix}.pt"
    report = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.stage == 1:
        train = make_examples(tokenizer, train_records, args.length, args.page_size, args.sink)
        held_out = make_examples(tokenizer, eval_records, args.length, args.page_size, args.sink, seed=1)
        bookmarks, history = train_stage1(model, train, held_out, page_size=args.page_size, sink=args.sink,
                                          epochs=args.epochs, lr=args.lr, recall_at=args.recall_at,
                                          query_tokens=args.query_tokens, keep_best=args.keep_best,
                                          rank=args.rank, anchor=args.anchor)
        bookmarks.save(out)
    else:
        import lckv

        train = make_answer_examples(tokenizer, train_records, args.length)
        held_out = make_answer_examples(tokenizer, eval_records, args.length, seed=1)
        base = model_fingerprint(model)
        budget = float(args.budget) if "." in str(args.budget) else int(args.budget)
        lckv.enable(model, "retrolm", page_size=args.page_size, sink=args.sink, window=args.window, budget=budget,
                    prefill="retrieval", prefill_select=args.prefill_select,
                    bookmarks=str(args.bookmarks) if args.bookmarks else None)
        state, history = train_stage2(model, train, held_out, epochs=args.epochs, lr=args.lr,
                                      train_params=args.train_params, chunk=args.chunk, max_steps=args.max_steps)
        save_post_trained(out, base, state)
    report.update(train_examples=len(train), held_out_examples=len(held_out), written=str(out), history=history)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    for entry in history:
        line = f"epoch {entry['epoch']}: held-out loss {entry['loss']:.4f}"
        if "recall" in entry:
            line += f", gold-page recall@{args.recall_at} {entry['recall']:.3f}"
        if "train_loss" in entry:
            line += f", train loss {entry['train_loss']:.4f}, {entry['epoch_s']:.0f} s"
        if "kept_epoch" in entry:
            line += f"; kept the bookmarks of epoch {entry['kept_epoch']}"
        print(line)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
