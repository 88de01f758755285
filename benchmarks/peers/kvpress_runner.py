"""NVIDIA kvpress presses on the prompts of ``bench_tasks.py --export-prompts``, as peer rows for
``bench_tasks.py --peer-results`` (the JSONL schema of docs/tasks.md).

Runs with the python of the kvpress environment (``benchmarks/peers/kvpress_env.sh``: kvpress
0.5.5 pins transformers < 5.3, lckv needs >= 5.5.3). The model is the same GGUF file lckv loads
(``python -m lckv.models path NAME`` in lckv's environment gives the directory), loaded with
transformers' own GGUF loader, dequantised to fp32.

Protocol per prompt and press, kvpress's own (``KVPressTextGenerationPipeline._forward``): a fresh
``DynamicCache``; the context (the exported ``input_ids`` up to where ``context_text`` ends: chat
template head and task text) is prefilled in one pass inside ``with press(model):``, which
compresses each layer's cache once at the end of that pass; the question (end of the user turn,
assistant header, answer prefix) is then run over the compressed cache uncompressed, at its
original positions, and its last logits give the first answer token; greedy decoding follows until
EOS or the prompt's ``max_new_tokens`` (the loop of ``generate_answer``, timed per step). A press
never revisits what it evicted, and it scores the context without seeing the question.

Budget mapping (:func:`kept_context_tokens`): a fraction ``b`` keeps ``ceil(b * context_tokens)``
context keys, a token budget ``B`` keeps ``min(B, context_tokens)``; kvpress is given the
``compression_ratio`` whose ``int(n * (1 - ratio))`` is that count (ratio ~ ``1 - b``). The question
and the answer tokens are added on top, so ``budget_tokens`` in a row (keys a query attends at the
first decode step: kept context + question + first answer token, averaged over layers and heads)
is larger than lckv's, whose budget covers the whole prompt. The ``none`` press (method
``kvpress:none``, budget null) is the same loop without compression: its predictions should equal
lckv's ``full``.

Rows stream to ``--out`` (key: model, task, length, method, budget, sample); a rerun skips finished
rows (rows with an ``error`` too, unless ``--retry-errors``) and drops a line cut by an
interruption. A press that cannot run (a missing dependency, weights it downloads, CUDA) leaves a
row with its ``error`` per sample and is listed at the end.

    PY=$(bash benchmarks/peers/kvpress_env.sh | tail -1)
    $PY benchmarks/peers/kvpress_runner.py --budgets 0.1 \\
        --prompts benchmarks/results/bench_tasks_smollm2-135m-instruct_prompts.jsonl \\
        --model-dir "$(python -m lckv.models path smollm2-135m-instruct)"
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared row format
from task_rows import budget_label, eos_ids, read_rows, row_key  # noqa: E402

DEFAULT_PRESSES = ("StreamingLLMPress", "SnapKVPress", "ExpectedAttentionPress", "TOVAPress", "PyramidKVPress",
                   "KVzipPress", "FastKVzipPress")
NO_PRESS = "none"
SOURCE = "kvpress"


# ----------------------------------------------------------------------------- budgets
def kept_context_tokens(budget: str, context_tokens: int) -> int:
    """Context keys a press keeps under ``budget`` (a label of :func:`budget_label`): a fraction
    ``b`` keeps ``ceil(b * n)`` (lckv's rounding), a count ``B`` keeps ``B``; at least 1, at most
    ``n``."""
    if context_tokens < 1:
        raise ValueError(f"context_tokens must be >= 1, got {context_tokens}")
    keep = math.ceil(float(budget) * context_tokens) if "." in budget else int(budget)
    return min(context_tokens, max(1, keep))


def compression_ratio(budget: str, context_tokens: int) -> float:
    """kvpress ``compression_ratio`` that keeps :func:`kept_context_tokens` of ``context_tokens``:
    kvpress keeps ``int(n * (1 - ratio))`` (``kvpress.utils.compute_n_kept``), so the ratio aims
    half a token above the count; 0 (no compression) when everything is kept."""
    keep = kept_context_tokens(budget, context_tokens)
    return 0.0 if keep >= context_tokens else 1.0 - (keep + 0.5) / context_tokens


def method_name(press: str) -> str:
    return f"{SOURCE}:{press}"


# ----------------------------------------------------------------------------- results file
def finished_keys(path: Path, retry_errors: bool = False) -> set[tuple]:
    """Keys of the rows already in ``path``. Rows with an ``error`` count as finished, unless
    ``retry_errors``: then they are removed from the file, to be run again."""
    rows = read_rows(path)
    if retry_errors and any(r.get("error") for r in rows):
        rows = [r for r in rows if not r.get("error")]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {row_key(r) for r in rows}


def grid(presses: list[str], budgets: list[str]) -> list[tuple[str, str | None]]:
    """Every (press, budget) to run: ``none`` once without a budget, every press at every budget."""
    return [(p, b) for p in presses for b in ([None] if p == NO_PRESS else budgets)]


def base_row(prompt: dict, press: str, budget: str | None) -> dict:
    """The fields of a row that come from the exported prompt and the method."""
    return {"model": prompt["model"], "task": prompt["task"], "length": prompt["length"], "sample": prompt["sample"],
            "seed": prompt.get("seed"), "method": method_name(press), "source": SOURCE, "budget": budget,
            "prompt_tokens": len(prompt["input_ids"]), "answers": prompt["answers"], "metric": prompt["metric"]}


def result_row(prompt: dict, press: str, budget: str | None, *, prediction: str, new_tokens: int,
               context_tokens: int, kept_context: float, question_tokens: int, compression_ratio: float | None,
               prefill_s: float, compression_s: float, question_s: float, steps: list[float]) -> dict:
    """A finished row of the docs/tasks.md schema. ``score`` stays null: the summary scores every
    row from its ``prediction`` with lckv's scorers. ``budget_tokens``: keys a query attends at the
    first decode step (kept context + question + the first answer token)."""
    return {**base_row(prompt, press, budget), "prediction": prediction, "score": None, "new_tokens": new_tokens,
            "budget_tokens": round(kept_context) + question_tokens + 1, "context_tokens": context_tokens,
            "kept_context_tokens": kept_context, "question_tokens": question_tokens,
            "compression_ratio": compression_ratio, "prefill_s": prefill_s, "compression_s": compression_s,
            "question_s": question_s, "first_step_s": steps[0] if steps else None,
            "decode_tokens_per_s": (len(steps) - 1) / sum(steps[1:]) if len(steps) > 1 else None}


def error_row(prompt: dict, press: str, budget: str | None, error: BaseException | str) -> dict:
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {**base_row(prompt, press, budget), "prediction": None, "score": None, "error": message}


def context_split(input_ids: list[int], encoded_ids: list[int], offsets: list[tuple[int, int]], cut: int) -> int:
    """Tokens of the context in ``input_ids``: those whose text ends by character ``cut`` (the
    length of ``context_text``). ``encoded_ids`` and ``offsets`` are the prompt's ``text`` encoded
    with offsets in this environment; they must equal ``input_ids`` so that the press reads lckv's
    tokens. (Tokenizing ``context_text`` alone is not the same: a trailing ``"\n\n"`` is one token
    there and two before the question.) A token across the cut goes with the question."""
    if list(encoded_ids) != list(input_ids):
        raise ValueError("the prompt text does not tokenize to its input_ids in this environment "
                         "(different tokenizer?)")
    n = sum(1 for _, end in offsets if end <= cut)
    if not 0 < n < len(input_ids):
        raise ValueError(f"no context/question split: {n} of {len(input_ids)} tokens end within the context")
    return n


def split_prompt(tokenizer, prompt: dict) -> int:
    """:func:`context_split` of an exported prompt."""
    encoded = tokenizer(prompt["text"], add_special_tokens=False, return_offsets_mapping=True)
    return context_split(prompt["input_ids"], encoded["input_ids"], encoded["offset_mapping"],
                         len(prompt["context_text"]))


# ----------------------------------------------------------------------------- model and presses
def load(model_dir: Path, gguf_file: str | None):
    """``(model, tokenizer)`` from the GGUF file lckv uses (the only ``*.gguf`` of ``model_dir``
    unless named), fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    if gguf_file is None:
        found = sorted(p.name for p in model_dir.glob("*.gguf"))
        if len(found) != 1:
            raise SystemExit(f"{model_dir}: expected one *.gguf file, found {found}; pass --gguf-file")
        gguf_file = found[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32,
                                                 local_files_only=True)
    return model.eval(), tokenizer


def make_press(name: str, ratio: float):
    """The kvpress press ``name`` at ``compression_ratio=ratio`` (None for ``none``)."""
    if name == NO_PRESS:
        return None
    import kvpress

    cls = getattr(kvpress, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, kvpress.BasePress):
        raise ValueError(f"kvpress has no press {name!r}")
    return cls(compression_ratio=ratio)


class PressTimer:
    """Sums the seconds a press spends in its own ``compress`` calls (they run inside the hooked
    prefill forward)."""

    def __init__(self, press):
        self.seconds = 0.0
        if press is not None and hasattr(press, "compress"):
            inner = press.compress

            def timed(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return inner(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            press.compress = timed


def kept_keys(model, cache) -> float:
    """Context keys the cache holds after the press, averaged over layers and KV heads: the cache
    length, less the keys masked per head by presses that evict by masking (AdaKV, KVzip: kvpress's
    ``masked_key_indices``)."""
    import torch

    layers = model.model.layers
    kept = []
    for index, layer in enumerate(layers):
        keys = cache.layers[index].keys
        heads, length = keys.shape[1], keys.shape[2]
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        dropped = torch.zeros(heads)
        if masked is not None:
            dropped = torch.bincount(masked[1].cpu(), minlength=heads).float()
        kept.append((length - dropped).mean().item())
    return sum(kept) / len(kept)


def shares_prefill(press) -> bool:
    """Whether ``press`` compresses only through kvpress's own ``BasePress.forward_hook`` (every
    ScorerPress: StreamingLLM, SnapKV, ExpectedAttention, TOVA, PyramidKV, ...). Such a hook runs
    after layer i's attention, leaves that layer's output unchanged and rewrites only layer i's
    cache, so layer i+1 sees the hidden states of an uncompressed prefill: the hook can be replayed
    on a copy of one shared uncompressed prefill (:class:`SharedPrefill`) with the inputs it would
    have received, and gives the same cache. Presses with their own ``__call__`` or hook (KVzip
    reruns the model, DMS, Finch, ...) prefill on their own."""
    if press is None:
        return True
    from kvpress import BasePress

    return type(press).forward_hook is BasePress.forward_hook and type(press).__call__ is BasePress.__call__


class SharedPrefill:
    """One uncompressed prefill of a prompt's context and, per attention module, the keyword
    arguments and attention weights its forward got and returned (what ``BasePress.forward_hook``
    reads). :meth:`compressed_cache` replays a press's hook on a copy of the cache."""

    def __init__(self, model, context):
        import torch
        from transformers import DynamicCache

        self.model, self.inputs = model, {}

        def record(module, args, kwargs, output):
            self.inputs[module.layer_idx] = (dict(kwargs), output[1] if isinstance(output, tuple) else None)

        modules = [layer.self_attn for layer in model.model.layers]
        hooks = [m.register_forward_hook(record, with_kwargs=True) for m in modules]
        self.cache = DynamicCache()
        try:
            with torch.no_grad():
                start = time.perf_counter()
                model.model(input_ids=context, past_key_values=self.cache)
                self.seconds = time.perf_counter() - start
        finally:
            for hook in hooks:
                hook.remove()
        if len(self.inputs) != len(modules):
            raise RuntimeError(f"recorded {len(self.inputs)} of {len(modules)} attention modules")

    def compressed_cache(self, press):
        """``(cache, seconds)``: a copy of the prefilled cache after ``press``'s forward hook ran on
        every layer with the recorded inputs (the cache itself for no press)."""
        import copy

        if press is None:
            return copy.deepcopy(self.cache), 0.0
        cache = copy.deepcopy(self.cache)
        start = time.perf_counter()
        press.post_init_from_model(self.model)  # what press(model) does before registering the hooks,
        for layer in self.model.model.layers:
            layer.self_attn.rotary_emb = self.model.model.rotary_emb  # ... and on each attention module
        for layer in self.model.model.layers:
            kwargs, weights = self.inputs[layer.self_attn.layer_idx]
            press.forward_hook(layer.self_attn, (), {**kwargs, "past_key_values": cache}, (None, weights))
        return cache, time.perf_counter() - start


def run_press(model, tokenizer, press, ids: list[int], n_context: int, max_new_tokens: int, eos: set[int],
              shared: dict | None = None) -> dict:
    """kvpress's protocol on one prompt (see the module docstring); returns the tokens, the kept
    context keys and the timings. With ``shared`` (a dict kept per prompt by the caller), a press
    that :func:`shares_prefill` replays its hook on the prompt's one :class:`SharedPrefill`
    (``prefill_s`` is that shared prefill's time, ``compression_s`` the press's own); other presses
    prefill with ``press(model)``."""
    import contextlib

    import torch

    for layer in model.model.layers:  # a masking press leaves its indices on the modules
        layer.self_attn.masked_key_indices = None
    context = torch.tensor([ids[:n_context]])
    question = torch.tensor([ids[n_context:]])
    with torch.no_grad():
        if shared is not None and shares_prefill(press):
            if "prefill" not in shared:
                shared["prefill"] = SharedPrefill(model, context)
            cache, compression_s = shared["prefill"].compressed_cache(press)
            prefill_s = shared["prefill"].seconds + compression_s
        else:
            from transformers import DynamicCache

            cache = DynamicCache()
            timer = PressTimer(press)
            start = time.perf_counter()
            with press(model) if press is not None else contextlib.nullcontext():
                entered = time.perf_counter()
                model.model(input_ids=context, past_key_values=cache)
                forward_done = time.perf_counter()
            prefill_s = time.perf_counter() - start  # KVzip scores and evicts when its context exits
            compression_s = timer.seconds + (entered - start) + (start + prefill_s - forward_done)
        kept = kept_keys(model, cache)

        start = time.perf_counter()
        positions = torch.arange(n_context, len(ids)).unsqueeze(0)
        logits = model(input_ids=question, past_key_values=cache, position_ids=positions, logits_to_keep=1).logits
        question_s = time.perf_counter() - start
        tokens, steps, position = [int(logits[0, -1].argmax())], [], len(ids)
        while len(tokens) < max_new_tokens and tokens[-1] not in eos:
            start = time.perf_counter()
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                           position_ids=torch.tensor([[position]])).logits
            tokens.append(int(logits[0, -1].argmax()))
            steps.append(time.perf_counter() - start)
            position += 1
    return {"tokens": tokens, "kept": kept, "prefill_s": prefill_s, "compression_s": compression_s,
            "question_s": question_s, "steps": steps, "cache": cache}


def pipeline_answer(model, tokenizer, press, ids: list[int], n_context: int, max_new_tokens: int) -> str:
    """The answer of kvpress's own pipeline (``KVPressTextGenerationPipeline._forward``) on the same
    tokens, for ``--check``."""
    import torch
    from kvpress import KVPressTextGenerationPipeline

    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    with torch.no_grad():
        answers = pipe._forward({"context_ids": torch.tensor([ids[:n_context]]),
                                 "questions_ids": [torch.tensor([ids[n_context:]])]},
                                max_new_tokens=max_new_tokens, press=press)
    return answers[0]


# ----------------------------------------------------------------------------- driver
def read_prompts(path: Path) -> list[dict]:
    prompts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"{path}: no prompts (write them with bench_tasks.py --export-prompts)")
    return prompts


def run(args) -> dict:
    """Runs every missing (prompt, press, budget) row; returns counts and the failures per press."""
    import torch

    prompts = read_prompts(args.prompts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh and args.out.exists():
        args.out.unlink()
    done = finished_keys(args.out, args.retry_errors)
    todo = [(p, press, b) for p in prompts for press, b in grid(args.presses, args.budgets)
            if row_key(base_row(p, press, b)) not in done]
    stats = {"computed": 0, "skipped": len(prompts) * len(grid(args.presses, args.budgets)) - len(todo),
             "failed": {}}
    if not todo:
        return stats
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, tokenizer = load(args.model_dir, args.gguf_file)
    eos = eos_ids(model, tokenizer)
    splits = {}
    with tempfile.TemporaryDirectory() as scratch, args.out.open("a") as sink:
        point_name_or_path_at_tokenizer(model, tokenizer, Path(scratch))
        shared, shared_key = {}, None
        for number, (prompt, press_name, budget) in enumerate(todo, 1):
            key = (prompt["task"], prompt["length"], prompt["sample"])
            if key != shared_key:  # todo runs prompt by prompt: one shared prefill alive at a time
                shared, shared_key = {}, key
            label = f"{prompt['task']} {prompt['length']} #{prompt['sample']} {press_name} {budget or ''}"
            try:
                if key not in splits:
                    splits[key] = split_prompt(tokenizer, prompt)
                n_context = splits[key]
                ratio = None if budget is None else compression_ratio(budget, n_context)
                press = make_press(press_name, ratio)
                out = run_press(model, tokenizer, press, prompt["input_ids"], n_context, prompt["max_new_tokens"], eos,
                                shared=None if args.own_prefill else shared)
            except Exception as exc:  # recorded with its error: the press is reported, not dropped
                row = error_row(prompt, press_name, budget, exc)
                stats["failed"].setdefault(press_name, row["error"])
                print(f"[{number}/{len(todo)}] {label}: FAILED {row['error']}", file=sys.stderr)
            else:
                row = result_row(prompt, press_name, budget, prediction=tokenizer.decode(out["tokens"],
                                 skip_special_tokens=True), new_tokens=len(out["tokens"]), context_tokens=n_context,
                                 kept_context=out["kept"], question_tokens=len(prompt["input_ids"]) - n_context,
                                 compression_ratio=ratio, prefill_s=out["prefill_s"],
                                 compression_s=out["compression_s"], question_s=out["question_s"], steps=out["steps"])
                print(f"[{number}/{len(todo)}] {label}: kept {row['kept_context_tokens']:.0f}/{n_context} "
                      f"context keys, prefill {row['prefill_s']:.2f} s, {row['prediction']!r}", file=sys.stderr)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            stats["computed"] += 1
    return stats


def point_name_or_path_at_tokenizer(model, tokenizer, directory: Path) -> None:
    """Presses that rebuild the tokenizer from ``model.config.name_or_path`` (KVzip reads the chat
    template there) cannot load a GGUF directory: save the GGUF tokenizer to ``directory`` (a
    scratch directory of the run) and point ``name_or_path`` there. Presses that look weights up by that name
    (FastKVzip gates, DuoAttention patterns) still find none for these models and fail."""
    tokenizer.save_pretrained(directory)
    model.config.name_or_path = str(directory)


def check(args) -> None:
    """On the first prompt, per press: the runner's decoding on the shared prefill, on the press's
    own hooked prefill and kvpress's pipeline must give the same answer, and the two runner paths
    bit-identical caches."""
    import torch

    prompt = read_prompts(args.prompts)[0]
    model, tokenizer = load(args.model_dir, args.gguf_file)
    scratch = tempfile.TemporaryDirectory()
    point_name_or_path_at_tokenizer(model, tokenizer, Path(scratch.name))
    eos = eos_ids(model, tokenizer)
    ids = prompt["input_ids"]
    n_context = split_prompt(tokenizer, prompt)
    bad, shared = [], {}
    for press_name, budget in grid(args.presses, args.budgets[:1]):
        ratio = None if budget is None else compression_ratio(budget, n_context)
        try:  # kvpress's own way first: a press that cannot run there is reported, not failed
            theirs = pipeline_answer(model, tokenizer, make_press(press_name, ratio), ids, n_context,
                                     prompt["max_new_tokens"])
        except Exception as exc:
            print(f"--check {press_name}: cannot run ({type(exc).__name__}: {exc})")
            continue
        for layer in model.model.layers:
            layer.self_attn.__dict__.pop("rotary_emb", None)
            layer.self_attn._modules.pop("rotary_emb", None)
        try:
            answers = [run_press(model, tokenizer, make_press(press_name, ratio), ids, n_context,
                                 prompt["max_new_tokens"], eos, shared=way) for way in (shared, None)]
        except Exception as exc:  # kvpress ran it, the runner did not
            print(f"--check {press_name:24s} DIFFERENT: the runner failed ({type(exc).__name__}: {exc})")
            bad.append(press_name)
            continue
        on_shared, on_own = (tokenizer.decode(a["tokens"], skip_special_tokens=True) for a in answers)
        same_cache = all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)  # prompt and answer included
                         for a, b in zip(answers[0]["cache"].layers, answers[1]["cache"].layers, strict=True))
        same = on_shared == on_own == theirs and same_cache
        print(f"--check {press_name:24s} {'same' if same else 'DIFFERENT'}: {on_shared!r}"
              + ("" if same else f" vs own prefill {on_own!r} (caches equal: {same_cache}), pipeline {theirs!r}"))
        if not same:
            bad.append(press_name)
    if bad:
        raise SystemExit(f"--check failed: the runner's paths and kvpress's pipeline differ for {bad}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, required=True,
                        help="<name>_prompts.jsonl of bench_tasks.py --export-prompts")
    parser.add_argument("--model-dir", type=Path, required=True,
                        help="`python -m lckv.models path NAME` of the prompts' model")
    parser.add_argument("--gguf-file", default=None, help="default: the only *.gguf in --model-dir")
    parser.add_argument("--presses", nargs="+", default=[NO_PRESS, *DEFAULT_PRESSES],
                        help=f"kvpress press class names, and `{NO_PRESS}` for no compression")
    parser.add_argument("--budgets", type=budget_label, nargs="+", default=["0.02", "0.05", "0.1"],
                        help="fractions of the context (0.05 or 5%%) or context token counts (256)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSONL (default: kvpress_<model>.jsonl beside --prompts)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--fresh", action="store_true", help="discard earlier rows instead of resuming")
    parser.add_argument("--own-prefill", action="store_true",
                        help="every press prefills on its own with press(model), none shares the uncompressed prefill")
    parser.add_argument("--retry-errors", action="store_true", help="run again the rows that failed before")
    parser.add_argument("--check", action="store_true",
                        help="compare the runner's decoding with kvpress's pipeline on the first prompt, write nothing")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: a press that downloads fails at once
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bar
    if args.out is None:
        model = json.loads(args.prompts.open().readline())["model"]
        args.out = args.prompts.with_name(f"kvpress_{model.lower()}.jsonl")
    if args.check:
        check(args)
        return {}
    stats = run(args)
    print(f"# {stats['computed']} rows computed, {stats['skipped']} already in {args.out}")
    for press, error in stats["failed"].items():
        print(f"# {method_name(press)} failed: {error}")
    return stats


if __name__ == "__main__":
    main()
