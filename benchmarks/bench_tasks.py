"""Task accuracy under KV compression: model x task x length x method x budget, greedy decoding,
scored against each task's gold answers, with the relative drop vs ``full`` (the paper's metric).

Tasks: the synthetic generators of :mod:`lckv.research.tasks` (needle in a haystack, variable
tracking, common/frequent words) and HotpotQA long-context QA (``tasks_qa``: ``hotpotqa`` with
shuffled documents, ``hotpotqa_retrieval`` / ``_reversed`` / ``_ends`` in BM25 orders). Each sample
is generated for the model's tokenizer so that the whole prompt (chat template, when the tokenizer
has one, and the answer prefix included) takes ``length`` tokens.

Protocol, per sample: one exact chunked prefill (policy ``full``, recording the prefill queries
each policy asks for); the first answer token comes from its logits. Each method then decodes
greedily from a copy of that cache laid out for its policy (:meth:`lckv.cache.LckvCache.from_cache`,
the same state a prefill under the policy leaves) with ``lckv.enable(model, policy)``, until EOS
or the task's token limit. So every method sees the same prompt and the same first token;
``streaming`` here is exact prefill then sink + window (as kvpress's StreamingLLM press does);
selection policies re-select per decode step (``retrieval`` from its index). Budgets count every
key a query attends (sink + window + selected): a fraction of the prompt (``0.05``, ``5%``) or a
token count (``256``); ``full`` has no budget.

Timings per row: ``prefill_s`` (the shared exact prefill), ``first_step_s`` (the first decode
step, which builds the policy's selection state), ``decode_tokens_per_s`` (steps 2..n).
HotpotQA rows of selection policies also carry ``gold_recall`` (:class:`GoldRecall`): the share of
the gold documents' offloaded tokens the policy attends exactly at the first decode step, per
layer and mean, a sharper comparison of retrievers at equal budget than SubEM on a small model.

Per-sample rows stream to ``results/<name>.jsonl`` (key: model, task, length, method, budget,
sample): a rerun skips finished rows and resumes where an interrupted run stopped. Rows of peer
methods (e.g. kvpress presses run in their own environment on the prompts of ``--export-prompts``)
follow the schema of ``docs/tasks.md`` and join the summary through ``--peer-results``. The
summary rescoring every row with one scorer goes to ``results/<name>.json`` (which keeps the rows
too, so a fresh clone resumes from the committed file) and ``.png`` and is printed as a table
(score, drop vs full, timings).

    python benchmarks/bench_tasks.py --check                     # budget >= context must equal full
    python benchmarks/bench_tasks.py --model stories260K --tasks niah_single_repeat variable_tracking \\
        --lengths 256 512 --samples 2 --budgets 0.1 64
    python benchmarks/bench_tasks.py --model smollm2-135m-instruct --lengths 1024 2048 --samples 4
    python benchmarks/bench_tasks.py --model qwen2.5-coder-0.5b-instruct --lengths 16384 32768 \\
        --budgets 0.02 0.05 --samples 10
    python benchmarks/bench_tasks.py --model ... --summary-only --peer-results results/kvpress_qwen.jsonl
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `training` (scorers, QA data builder)
from common import PREFILL_VARIANTS, RESULTS, Table, greedy, load_model, machine, prefill_in_chunks, progress  # noqa: E402
from task_rows import budget_label, eos_ids, read_rows, row_key  # noqa: E402
from tasks_qa import QA_TASKS  # noqa: E402

import lckv  # noqa: E402
from lckv.cache import LckvCache, QueryRecorder  # noqa: E402
from lckv.policies import FullPolicy, PolicyConfigError, SelectionPolicy, StreamingPolicy, get_policy  # noqa: E402
from lckv.research import tasks as synthetic  # noqa: E402
from training.scorers import relative_drop, subem_score  # noqa: E402

TASKS = {**synthetic.TASKS, **QA_TASKS}
DEFAULT_TASKS = [*synthetic.TASKS, "hotpotqa"]
METHODS = ("full", "streaming", "snapkv", "quest", "block", "retrieval", "retrolm")
#: shared-prefill variants of a policy: name -> (policy, settings); ``retrolm-trained*`` read the
#: bookmarks file of ``--retrolm-bookmarks`` (training/retrolm.py writes it); ``-p32``: pages of 32
#: tokens (the policy's default is RetroLM's 128; the bookmarks file holds projections, usable at
#: any page size, trained at one)
VARIANTS = {"retrolm-trained": ("retrolm", {}), "retrolm-p32": ("retrolm", {"page_size": 32}),
            "retrolm-trained-p32": ("retrolm", {"page_size": 32})}
TRAINED = "retrolm-trained"
#: methods that prefill on their own instead of sharing the exact prefill: name -> (policy, settings)
OWN_PREFILL = {f"retrieval-prefill{suffix}": ("retrieval", settings) for suffix, settings in PREFILL_VARIANTS.items()}
ALL_METHODS = (*METHODS, *VARIANTS, *OWN_PREFILL)
SCORERS = {"all": synthetic.string_match_all, "any": synthetic.string_match_any, "subem": subem_score}
STREAMING_SINK = 4


# ----------------------------------------------------------------------------- budgets and methods
def budget_value(label: str) -> float | int:
    return float(label) if "." in label else int(label)


def make_policy(method: str, budget: str | None, prompt_tokens: int, bookmarks: str | None = None):
    """The lckv policy of ``method`` at ``budget`` for a prompt of ``prompt_tokens`` tokens, and the
    keys a query attends at the first decode step (context: the prompt and the first answer token).
    ``bookmarks``: the trained RetroLM bookmarks file of the ``retrolm-trained*`` methods."""
    if method == "full":
        return FullPolicy(), None
    value = budget_value(budget)
    if method == "streaming":
        keys = value if isinstance(value, int) else max(1, math.ceil(value * (prompt_tokens + 1)))
        sink = min(STREAMING_SINK, keys - 1)
        return StreamingPolicy(sink=sink, window=keys - sink), keys
    name, settings = OWN_PREFILL.get(method) or VARIANTS.get(method) or (method, {})
    if method.startswith(TRAINED):
        if not bookmarks:
            raise PolicyConfigError(f"{method} needs --retrolm-bookmarks FILE (python -m training.retrolm)")
        settings = {**settings, "bookmarks": str(bookmarks)}
    policy = get_policy(name, budget=value, **settings)
    return policy, policy.budget_tokens(prompt_tokens + 1)


# ----------------------------------------------------------------------------- prompts
def render(tokenizer, sample: synthetic.TaskSample) -> tuple[list[int], str]:
    """``(input ids, text)`` of ``sample`` as the model reads it: the chat template (system message
    if any, user message, generation prompt) when the tokenizer has one, else BOS + plain text;
    then the answer prefix."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": sample.system}] if sample.system else []
        messages.append({"role": "user", "content": sample.prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text += sample.answer_prefix
    else:
        text = (f"{sample.system}\n\n" if sample.system else "") + f"{sample.prompt}\n\n{sample.answer_prefix}"
    return encode(tokenizer, text), text


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered ``text``: the chat template holds its special tokens already; without
    one the tokenizer adds BOS."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def make_sample(task: str, tokenizer, length: int, seed: int):
    """The sample of ``task`` whose rendered prompt takes ``length`` tokens (the generator is asked
    for ``length`` minus the template's and answer prefix's tokens)."""
    sample = TASKS[task](tokenizer, length, seed)
    ids, text = render(tokenizer, sample)
    overhead = len(ids) - sample.metadata["n_tokens"]
    if overhead > 0:
        sample = TASKS[task](tokenizer, length - overhead, seed)
        ids, text = render(tokenizer, sample)
    return sample, ids, text


# ----------------------------------------------------------------------------- gold-row recall
def gold_token_spans(tokenizer, sample: synthetic.TaskSample, text: str) -> list[tuple[int, int]] | None:
    """Token spans ``[lo, hi)`` of the sample's gold documents in the rendered prompt ``text``
    (:func:`render`), each from its ``[DOC i]`` tag to the next document's tag or the end of the
    documents; None when the sample names no gold documents (the synthetic tasks). Positions are
    the token counts of the text before each boundary (a token spanning one may shift it by one)."""
    gold = sample.metadata.get("gold_ids")
    if not gold:
        return None
    offset = text.index(sample.prompt)
    spans = []
    for j in gold:
        lo = sample.prompt.index(f"[DOC {j}] ")
        following = re.search(r"^\[DOC \d+\] ", sample.prompt[lo + 1:], flags=re.M)
        hi = len(sample.prompt) if following is None else lo + 1 + following.start()
        spans.append(tuple(len(encode(tokenizer, text[:offset + char])) for char in (lo, hi)))
    return spans


class GoldRecall:
    """Records, per layer, the share of the gold documents' offloaded rows a selection policy
    attends exactly at its first decode step (mean over kv heads; batch 1). A context manager:
    inside it the policy's ``select`` and ``fused_step`` are wrapped on the instance (whichever the
    step calls); on exit the wrappers are removed (they refer to the policy, and a policy left in
    that cycle would keep its cache's selection state alive until a full garbage collection: the
    harness ran out of memory after 20 Qwen samples at 8K). Rows the policy only estimates do not
    count. ``per_layer``: layer -> recall, None where no gold row was offloaded."""

    NAMES = ("select", "fused_step")

    def __init__(self, policy, spans: list[tuple[int, int]]):
        self.policy, self.spans, self.per_layer = policy, spans, {}

    def __enter__(self) -> "GoldRecall":
        self._own = {name: vars(self.policy)[name] for name in self.NAMES if name in vars(self.policy)}
        for name in self.NAMES:
            setattr(self.policy, name, self._recording(getattr(self.policy, name), fused=name == "fused_step"))
        return self

    def __exit__(self, *exc) -> None:
        for name in self.NAMES:  # the class's methods again (or the instance's own, if it had any)
            if name in self._own:
                setattr(self.policy, name, self._own[name])
            else:
                delattr(self.policy, name)
        self.policy = None

    def _recording(self, method, fused: bool):
        def recorded(state, view, q, n_select, scale=None):
            result = method(state, view, q, n_select, scale)
            if result is not None and view.layer_idx not in self.per_layer:
                self.per_layer[view.layer_idx] = self.recall(result[2] if fused else result, view)
            return result

        return recorded

    def recall(self, indices: torch.Tensor, view) -> float | None:
        n_rows, first = view.keys.shape[2], view.first_position
        gold = torch.zeros(n_rows, dtype=torch.bool)
        for lo, hi in self.spans:  # token positions -> store rows (row r holds slot first + r)
            gold[min(max(lo - first, 0), n_rows):min(max(hi - first, 0), n_rows)] = True
        total = int(gold.sum())
        if total == 0:
            return None
        heads = indices[0].cpu()
        hits = sum(int(gold[rows[rows >= 0].unique()].sum()) for rows in heads)
        return hits / (total * heads.shape[0])

    def summary(self) -> dict:
        layers = [self.per_layer.get(i) for i in range(max(self.per_layer, default=-1) + 1)]
        return {"gold_recall": _mean(layers), "gold_recall_layers": layers}


# ----------------------------------------------------------------------------- prefill and decode
class QueryTee:
    """Feeds the prefill queries to one :class:`~lckv.cache.QueryRecorder` per recording setting
    (``policy.recorded_queries()``), so one prefill serves every policy."""

    def __init__(self, settings):
        self.recorders = {s: QueryRecorder(*s) for s in settings}

    def add(self, query: torch.Tensor, sample: bool = True) -> None:
        for recorder in self.recorders.values():
            recorder.add(query, sample)


def prefill(model, ids: list[int], chunk: int, settings) -> tuple[LckvCache, torch.Tensor, list[QueryTee]]:
    """Exact chunked prefill; returns the cache, the last logits and each layer's query recorders."""
    lckv.enable(model, FullPolicy())
    cache = lckv.new_cache(model)
    tees = [QueryTee(settings) for _ in cache.layers]
    for layer, tee in zip(cache.layers, tees):
        layer.queries = tee
    device = next(model.parameters()).device
    logits, _ = prefill_in_chunks(model, torch.tensor([ids], device=device), cache, chunk)
    for layer in cache.layers:
        layer.queries = None  # from_cache must not copy the tee
    return cache, logits[0, -1], tees


def decode(model, prefill_cache: LckvCache, tees: list[QueryTee], policy, first_token: int, max_new_tokens: int,
           eos: set[int]) -> tuple[list[int], list[float]]:
    """Greedy decoding under ``policy`` from the shared prefill; returns the tokens (the first one
    given) and the seconds of each decode step."""
    lckv.enable(model, policy)
    cache = LckvCache.from_cache(prefill_cache, policy)
    wanted = policy.recorded_queries()
    for layer, tee in zip(cache.layers, tees):
        if wanted:
            layer.queries = copy.copy(tee.recorders[wanted])  # decode steps replace `recent`, not the tee's
    return greedy(model, cache, first_token, max_new_tokens, eos)


def prefill_and_decode(model, ids: list[int], chunk: int, policy, max_new_tokens: int,
                       eos: set[int]) -> tuple[list[int], list[float], float]:
    """A method with its own prefill (:data:`OWN_PREFILL`): the prompt in chunks under ``policy``
    (e.g. ``prefill="retrieval"``), its first answer token from its own last logits, then greedy
    decoding; returns the tokens, the decode step seconds and the prefill seconds."""
    lckv.enable(model, policy)
    cache = lckv.new_cache(model)
    device = next(model.parameters()).device
    logits, prefill_s = prefill_in_chunks(model, torch.tensor([ids], device=device), cache, chunk)
    tokens, steps = greedy(model, cache, int(logits[0, -1].argmax()), max_new_tokens, eos)
    return tokens, steps, prefill_s


# ----------------------------------------------------------------------------- results file
def grid(args) -> list[tuple[str, str | None]]:
    """Every (method, budget) to run: ``full`` once, every other method at every budget."""
    return [(m, b) for m in args.methods for b in ([None] if m == "full" else args.budgets)]


def run(args) -> dict:
    """Runs every missing row of the grid; returns ``{"computed": n, "skipped": n}``."""
    stream = args.results / f"{args.name}.jsonl"
    args.results.mkdir(parents=True, exist_ok=True)
    if args.fresh and stream.exists():
        stream.unlink()
    done = {row_key(r) for r in read_rows(stream)}
    if not args.fresh:  # rows the committed summary keeps count as done (a clone has no JSONL)
        done |= {row_key(r) for r in committed(args)[0]}
    methods = grid(args)
    units = [(t, n, i) for t in args.tasks for n in args.lengths for i in range(args.samples)]
    todo = {u: [(m, b) for m, b in methods if (args.model, u[0], u[1], m, b, u[2]) not in done] for u in units}
    stats = {"computed": 0, "skipped": sum(len(methods) - len(v) for v in todo.values())}
    if not any(todo.values()):
        return stats
    longest = max(args.lengths) + max(args.max_new_tokens or 0, 256)
    model, tokenizer = load_model(args.model, longest)
    eos = eos_ids(model, tokenizer)
    settings = {get_policy(m).recorded_queries() for m in args.methods if m in METHODS} - {None}
    trained = [m for m in args.methods if m.startswith(TRAINED)]
    if trained and not (args.retrolm_bookmarks and Path(args.retrolm_bookmarks).is_file()):
        raise SystemExit(f"{' '.join(trained)}: no bookmarks file {args.retrolm_bookmarks!r}; train one with "
                         "`python -m training.retrolm --model <model>` and pass --retrolm-bookmarks FILE")
    with stream.open("a") as sink:
        bar = progress([u for u in units if todo[u]], "samples")
        for task, length, index in bar:
            seed = args.seed + index
            base = {"model": args.model, "task": task, "length": length, "sample": index, "seed": seed,
                    "source": "lckv"}
            try:
                sample, ids, text = make_sample(task, tokenizer, length, seed)
                spans = gold_token_spans(tokenizer, sample, text)
            except synthetic.TaskTooShortError as exc:  # recorded, so a rerun does not try again
                print(f"# {task} at {length} tokens: {exc}", file=sys.stderr)
                for method, budget in todo[(task, length, index)]:
                    sink.write(json.dumps({**base, "method": method, "budget": budget, "prediction": None,
                                           "score": None, "error": str(exc)}) + "\n")
                    stats["computed"] += 1
                sink.flush()
                continue
            cache = tees = first = prefill_s = None
            if any(method not in OWN_PREFILL for method, _ in todo[(task, length, index)]):
                start = time.perf_counter()
                cache, logits, tees = prefill(model, ids, args.chunk, settings)
                prefill_s = time.perf_counter() - start
                first = int(logits.argmax())
            limit = args.max_new_tokens or sample.max_new_tokens
            for method, budget in todo[(task, length, index)]:
                bar.set_postfix_str(f"{task} {length} {method} {budget or ''}")
                row = {**base, "method": method, "budget": budget, "prompt_tokens": len(ids),
                       "answers": sample.answers, "metric": sample.metric, "prefill_s": prefill_s}
                try:
                    policy, keys = make_policy(method, budget, len(ids), args.retrolm_bookmarks)
                    if method in OWN_PREFILL:
                        tokens, steps, row["prefill_s"] = prefill_and_decode(model, ids, args.chunk, policy, limit, eos)
                    else:
                        # gold recall: HotpotQA rows of the policies that select rows per step
                        probe = GoldRecall(policy, spans) if spans and isinstance(policy, SelectionPolicy) else None
                        with probe or contextlib.nullcontext():
                            tokens, steps = decode(model, cache, tees, policy, first, limit, eos)
                        if probe is not None and probe.per_layer:
                            row.update(probe.summary())
                except PolicyConfigError as exc:  # e.g. a budget too small for this length
                    row.update(error=str(exc), prediction=None, score=None)
                else:
                    prediction = tokenizer.decode(tokens, skip_special_tokens=True)
                    row.update(
                        budget_tokens=keys, prediction=prediction, new_tokens=len(tokens),
                        score=SCORERS[sample.metric](prediction, sample.answers),
                        first_step_s=steps[0] if steps else None,
                        decode_tokens_per_s=(len(steps) - 1) / sum(steps[1:]) if len(steps) > 1 else None)
                row["metadata"] = sample.metadata
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                stats["computed"] += 1
            del cache, tees
    lckv.disable(model)
    return stats


def export_prompts(args) -> Path:
    """Writes every prompt of the grid (ids, text, the context/question split, answers) for peer
    runners; see docs/tasks.md."""
    _, tokenizer = load_model(args.model, max(args.lengths) + 256)
    path = args.results / f"{args.name}_prompts.jsonl"
    args.results.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for task in args.tasks:
            for length in args.lengths:
                for index in range(args.samples):
                    sample, ids, text = make_sample(task, tokenizer, length, args.seed + index)
                    cut = text.index(sample.question)
                    out.write(json.dumps({
                        "model": args.model, "task": task, "length": length, "sample": index, "seed": args.seed + index,
                        "input_ids": ids, "text": text, "context_text": text[:cut], "question_text": text[cut:],
                        "answers": sample.answers, "metric": sample.metric,
                        "max_new_tokens": args.max_new_tokens or sample.max_new_tokens}) + "\n")
    return path


# ----------------------------------------------------------------------------- summary
def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def committed(args) -> tuple[list[dict], list[dict]]:
    """What the summary JSON of an earlier run keeps: its per-sample rows, and the entries it
    carried without rows (a summary written before rows were kept in it carries all its entries)."""
    path = args.results / f"{args.name}.json"
    if not path.exists():
        return [], []
    payload = json.loads(path.read_text())
    if "samples" not in payload:
        return [], [e for e in payload["summary"] if e["task"] != "all"]
    return payload["samples"], payload.get("carried", [])


def setting(entry: dict) -> tuple:
    """The (task, length, method, budget) a row or a summary entry belongs to."""
    return entry["task"], entry["length"], entry["method"], entry["budget"]


def summarize(rows: list[dict], carried: list[dict] = ()) -> list[dict]:
    """One entry per (task, length, method, budget), plus task ``all`` (mean over tasks): mean
    score (every row rescored from its prediction), the full score on the same samples, the
    relative drop, and mean timings. ``carried``: entries of settings with no row here, kept as
    they are (they join the means over tasks)."""
    rows = [dict(r, score=SCORERS[r["metric"]](r["prediction"] or "", r["answers"])) for r in rows
            if r.get("prediction") is not None]
    full = {(r["model"], r["task"], r["length"], r["sample"]): r["score"] for r in rows if r["method"] == "full"}
    groups = defaultdict(list)
    for r in rows:
        groups[setting(r)].append(r)
    out = []
    for (task, length, method, budget), rs in groups.items():
        keys = [(r["model"], task, length, r["sample"]) for r in rs]
        matched = [full[k] for k in keys if k in full]
        entry = {"task": task, "length": length, "method": method, "budget": budget, "n": len(rs),
                 "score": _mean(r["score"] for r in rs),
                 "full_score": _mean(matched) if len(matched) == len(rs) else None,
                 "budget_tokens": _mean(r.get("budget_tokens") for r in rs),
                 "budget_fraction": _mean(r["budget_tokens"] / r["prompt_tokens"] for r in rs
                                          if r.get("budget_tokens") and r.get("prompt_tokens")),
                 "prefill_s": _mean(r.get("prefill_s") for r in rs),
                 "first_step_s": _mean(r.get("first_step_s") for r in rs),
                 "decode_tokens_per_s": _mean(r.get("decode_tokens_per_s") for r in rs),
                 "gold_recall": _mean(r.get("gold_recall") for r in rs)}
        out.append(entry)
    out += [dict(e) for e in carried]
    by_setting = defaultdict(list)
    for e in out:
        by_setting[(e["length"], e["method"], e["budget"])].append(e)
    for (length, method, budget), es in by_setting.items():
        if len({e["task"] for e in es}) > 1:
            out.append({"task": "all", "length": length, "method": method, "budget": budget,
                        **{k: _mean(e.get(k) for e in es) for k in ("score", "budget_tokens", "budget_fraction",
                                                                    "prefill_s", "first_step_s",
                                                                    "decode_tokens_per_s", "gold_recall")},
                        "n": sum(e["n"] for e in es),
                        "full_score": _mean(e["full_score"] for e in es) if all(e["full_score"] is not None for e in es)
                        else None})
    for e in out:
        e["drop_pct"] = relative_drop(e["full_score"], e["score"]) if e["full_score"] else None
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    out.sort(key=lambda e: (e["task"] == "all", e["task"], e["length"], order.get(e["method"], len(order)), e["method"],
                            e["budget_fraction"] or 0.0))
    return out


COLUMNS = [("task", "task", "s", 22), ("length", "tokens", "d", 6), ("method", "method", "s", 30),
           ("budget", "budget", "s", 6), ("budget_tokens", "keys", ".0f", 5), ("n", "n", "d", 3),
           ("score", "score", ".3f", 5), ("drop_pct", "drop %", ".1f", 6), ("gold_recall", "gold rec", ".3f", 8),
           ("prefill_s", "prefill s", ".2f", 0),
           ("first_step_ms", "1st step ms", ".1f", 0), ("decode_tokens_per_s", "tok/s", ".1f", 6)]


def plot(summary: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(e["task"] for e in summary))
    lengths = sorted({e["length"] for e in summary})
    fig, axes = plt.subplots(len(lengths), len(tasks), figsize=(3.2 * len(tasks), 2.8 * len(lengths)), squeeze=False)
    for row, length in enumerate(lengths):
        for col, task in enumerate(tasks):
            ax = axes[row][col]
            entries = [e for e in summary if e["task"] == task and e["length"] == length]
            for method in dict.fromkeys(e["method"] for e in entries):
                points = sorted((e["budget_fraction"], e["score"]) for e in entries
                                if e["method"] == method and e["budget_fraction"])
                if method == "full":
                    for e in entries:
                        if e["method"] == "full":
                            ax.axhline(e["score"], color="black", ls="--", lw=1, label="full")
                elif points:
                    ax.plot(*zip(*points), marker="o", label=method)
            ax.set(title=f"{task}, {length} tokens", xscale="log", ylim=(-0.02, 1.02), xlabel="budget (fraction)",
                   ylabel="score")
            ax.title.set_fontsize(8)
    labels = {}
    for ax in axes.flat:
        labels.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(labels.values()), list(labels), loc="upper right", fontsize=7)
    fig.suptitle(f"{model}: task score vs KV budget (one line per method)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main_name(model: str) -> str:
    """The results file name of a model's main grid (``--name`` left out)."""
    return f"bench_tasks_{model.lower()}"


def report(args) -> dict:
    """Summary of the main results file and any peer files: JSON, PNG and a printed table."""
    rows = read_rows(args.results / f"{args.name}.jsonl")
    peers = args.peer_results
    if peers is None and args.name == main_name(args.model):
        # the main file of a model: the kvpress runner's file for it, so that a run keeps its peers'
        # rows (a named grid, e.g. one task at one length, takes peers only when given)
        peers = [path for path in [args.results / f"kvpress_{args.model}.jsonl"] if path.exists()]
    for extra in peers or []:
        rows += read_rows(Path(extra))
    samples, carried = ([], []) if args.fresh else committed(args)
    have = {row_key(r) for r in rows}
    rows += [r for r in samples if row_key(r) not in have]
    rows = [r for r in rows if r["model"] == args.model]
    settings = {setting(r) for r in rows}
    replaced = sorted({setting(e) for e in carried if setting(e) in settings}, key=str)
    if replaced:
        print(f"# {len(replaced)} carried summary entries replaced by new rows: {replaced}", file=sys.stderr)
    carried = [e for e in carried if setting(e) not in settings]
    summary = summarize(rows, carried)
    table = Table(COLUMNS)
    for e in summary:
        table.row({**e, "budget": e["budget"] or "-",
                   "first_step_ms": None if e["first_step_s"] is None else 1e3 * e["first_step_s"]})
    payload = {"benchmark": "tasks", "machine": machine(), "model": args.model,
               "protocol": "exact chunked prefill shared by all methods, then greedy decoding per method",
               "rows": len(rows), "summary": summary, "samples": rows, "carried": carried}
    (args.results / f"{args.name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    if summary:
        plot(summary, args.results / f"{args.name}.png", args.model)
    print(f"wrote {args.results / (args.name + '.json')} and .png")
    return payload


def check(args) -> None:
    """At a budget at least the whole sequence every selection policy must decode exactly as full."""
    args.tasks, args.lengths, args.samples, args.fresh = ["niah_single_repeat", "variable_tracking"], [300], 2, True
    args.methods = ["full", "snapkv", "quest", "block", "retrieval", "retrolm", "retrieval-prefill"]
    args.budgets = [str(300 + 64)]
    args.name = f"{args.name}_check"
    run(args)
    path = args.results / f"{args.name}.jsonl"
    rows = read_rows(path)
    path.unlink()
    full = {(r["task"], r["sample"]): r["prediction"] for r in rows if r["method"] == "full"}
    bad = [r for r in rows if r["prediction"] != full[(r["task"], r["sample"])]]
    if bad or len(rows) != len(args.tasks) * args.samples * len(args.methods):
        raise SystemExit(f"--check failed: {len(bad)} of {len(rows)} rows differ from full: {bad[:2]}")
    print(f"--check: {len(rows)} rows, every policy at budget >= context decodes exactly as full")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a lckv.models registry name or stories260K")
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(TASKS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=ALL_METHODS,
                        help=f"default: {' '.join(METHODS)}; {' '.join(OWN_PREFILL)} prefills on its own "
                             "(chunked, retrieval-augmented) instead of sharing the exact prefill")
    parser.add_argument("--budgets", type=budget_label, nargs="+", default=["0.02", "0.05", "0.1"],
                        help="per-query key budgets: fractions (0.05 or 5%%) or token counts (256)")
    parser.add_argument("--samples", type=int, default=4, help="samples per task and length (seeds seed..seed+n-1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: each task's own limit")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk in tokens")
    parser.add_argument("--retrolm-bookmarks", default=None,
                        help="trained RetroLM bookmarks of the retrolm-trained* methods (python -m training.retrolm)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--name", default=None, help="result file name (default: bench_tasks_<model>)")
    parser.add_argument("--fresh", action="store_true", help="discard earlier rows instead of resuming")
    parser.add_argument("--summary-only", action="store_true", help="summarise the results file(s), run nothing")
    parser.add_argument("--peer-results", nargs="*", default=None,
                        help="JSONL files of peer methods (docs/tasks.md); default: kvpress_<model>.jsonl in the "
                             "results directory when it exists, for the default --name only; none: "
                             "--peer-results with no file")
    parser.add_argument("--export-prompts", action="store_true",
                        help="write the grid's prompts to <name>_prompts.jsonl for peer runners, run nothing")
    parser.add_argument("--check", action="store_true", help="verify the harness (budget >= context equals full)")
    args = parser.parse_args(argv)
    args.name = args.name or main_name(args.model)
    if args.check:
        return check(args)
    if args.export_prompts:
        print(f"wrote {export_prompts(args)}")
        return {}
    stats = {"computed": 0, "skipped": 0} if args.summary_only else run(args)
    if not args.summary_only:
        print(f"# {stats['computed']} rows computed, {stats['skipped']} already in {args.name}.jsonl")
    return {**stats, **report(args)}


if __name__ == "__main__":
    main()
