"""Main job: a real model answers a question about a long real document, with full and with compressed KV.

    python -m lckv                                   # SmolLM2-135M-Instruct, ~3000-token document, retrieval 5%
    python -m lckv --policy quest --budget 0.1 --tokens 6000
    python -m lckv --model stories260K               # offline: the tiny llama2.c model continues a story

The document is HotpotQA paragraphs (``../shared/data``) with one planted fact at about a third of
its length; a question about the fact goes through the model's chat template and is answered
greedily twice: with policy ``full`` and with a compressed policy (``--policy``). Each run keeps its
policy's resident part (sink + recent window) on the compute device and offloads older tokens to
host memory; ``full`` attends every token exactly, the compressed policy only ``--budget`` keys per
query. For each run it prints the answer, prefill time, decode tokens/s and the resident vs
offloaded KV bytes of the cache.

Models other than stories260K are fetched on first use (``python -m lckv.models list``).
``--model stories260K`` reads the llama2.c model from the shared data and continues a story prompt.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import LogitsProcessorList

import lckv
from lckv import models
from lckv.research.data import SharedDataNotFoundError, hotpotqa_paragraphs, stories260k_paths
from lckv.policies import SelectionPolicy

STORIES = "stories260K"
STORY_PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
FACT = "The secret launch code of the observatory is 7-4-1-9."
QUESTION = "What is the secret launch code of the observatory?"
ANSWER = "7-4-1-9"
DOCUMENT_BUDGET = 0.05
# 5% of a story of a few dozen tokens is fewer keys than the sink and the current token need
STORY_BUDGET = 64


def planted_document(tokenizer, num_tokens: int, fact: str = FACT, depth: float = 1 / 3) -> str:
    """The fewest HotpotQA paragraphs (file order, blank-line separated) that hold ``num_tokens``
    tokens counted paragraph by paragraph, with ``fact`` as a paragraph of its own at the paragraph
    boundary nearest ``depth`` of those tokens."""
    paragraphs, lengths = [], []
    source = hotpotqa_paragraphs()
    while sum(lengths) < num_tokens:
        paragraph = source[len(paragraphs) % len(source)]
        paragraphs.append(paragraph)
        lengths.append(len(tokenizer.encode(paragraph, add_special_tokens=False)))
    ends = torch.tensor(lengths).cumsum(0)
    at = int((ends - depth * ends[-1]).abs().argmin()) + 1
    return "\n\n".join(paragraphs[:at] + [fact] + paragraphs[at:])


def question_ids(tokenizer, document: str) -> torch.Tensor:
    """``[1, prompt_len]`` chat-template ids asking :data:`QUESTION` about ``document``."""
    content = f"Read the document, then answer the question.\n\n{document}\n\nQuestion: {QUESTION}"
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         return_tensors="pt")["input_ids"]


def _generate(model, ids: torch.Tensor, max_new_tokens: int, pad_token_id: int):
    """Greedy generation into a fresh :class:`~lckv.cache.LckvCache`; returns the new ids, the
    cache and one time stamp per generated token (taken when its logits are ready), start first."""
    cache = lckv.new_cache(model)
    stamps = []

    def stamp(input_ids, scores):
        stamps.append(time.perf_counter())
        return scores

    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id,
                             logits_processor=LogitsProcessorList([stamp]))
    return out[0, ids.shape[1]:], cache, [start, *stamps]


def _mib(n: int) -> str:
    return f"{n / 2**20:8.3f} MiB"


def _print_run(label: str, text: str, cache, stamps: list[float], answer: str | None) -> None:
    report = cache.memory_report()
    print(f"== {label}")
    check = "" if answer is None else f"  ({'contains' if answer in text else 'lacks'} {answer!r})"
    print(f"output        {text!r}{check}")
    threads = torch.get_num_threads()
    print(f"prefill       {(stamps[1] - stamps[0]) * 1e3:.0f} ms (prompt and first token; CPU, "
          f"{threads} thread{'s' if threads > 1 else ''})")
    steps = stamps[2:]  # when each decode step's logits were ready
    if len(steps) > 1:
        print(f"decode        {(len(steps) - 1) / (steps[-1] - steps[0]):.1f} tokens/s over steps 2-{len(steps)} "
              f"(step 1, which builds any selection state, took {(steps[0] - stamps[1]) * 1e3:.0f} ms)")
    print(f"KV resident   {_mib(report['resident_bytes'])}  sink + window, all layers "
          f"({report['tokens']} tokens cached)")
    print(f"KV offloaded  {_mib(report['offloaded_bytes'])}  host memory; {report['evicted_tokens_per_layer']} "
          "tokens evicted per layer")
    print()


def _budget(text: str) -> float | int:
    """``--budget``: a token count (``256``) or a fraction of the context (``0.05``)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lckv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", choices=[*models.list_models(), STORIES])
    parser.add_argument("--policy", default="retrieval", choices=lckv.available_policies(),
                        help="policy of the compressed run (default: retrieval)")
    parser.add_argument("--budget", type=_budget,
                        help="keys each query attends in the compressed run, for policies that select: a fraction "
                             f"of the context or a token count (default: {DOCUMENT_BUDGET} for the document, "
                             f"{STORY_BUDGET} for the stories260K story)")
    parser.add_argument("--tokens", type=int, default=3000, help="document length in tokens (default 3000)")
    parser.add_argument("--max-new-tokens", type=int,
                        help="default: 24 for the document question, 256 for the stories260K story")
    args = parser.parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.tokens < 1:
        parser.error("--tokens must be >= 1")
    story = args.model == STORIES

    compressed = {}
    if isinstance(lckv.get_policy(args.policy), SelectionPolicy):
        compressed["budget"] = args.budget if args.budget is not None else STORY_BUDGET if story else DOCUMENT_BUDGET
    try:
        lckv.get_policy(args.policy, **compressed)  # settings errors before the model loads
        if story:
            from lckv.research import llama2c

            model, tokenizer = llama2c.load(*stories260k_paths())
            ids = torch.tensor([tokenizer.encode(STORY_PROMPT)])
            answer, max_new_tokens, what = None, args.max_new_tokens or 256, "story prompt"
        else:
            model, tokenizer = models.load(args.model)
            ids = question_ids(tokenizer, planted_document(tokenizer, args.tokens))
            answer, max_new_tokens, what = ANSWER, args.max_new_tokens or 24, f"planted fact: {FACT!r}"
    except (lckv.PolicyConfigError, SharedDataNotFoundError, models.ModelRegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print(f"model {args.model}; prompt {ids.shape[1]} tokens ({what})")
    if answer is not None:
        print(f"question {QUESTION!r}")
    print()
    for name, settings in (("full", {}), (args.policy, compressed)):
        binding = lckv.enable(model, name, **settings)
        try:
            new, cache, stamps = _generate(model, ids, max_new_tokens, pad)
        except lckv.PolicyConfigError as exc:  # e.g. a fractional budget too small for this prompt
            print(f"error: {exc}", file=sys.stderr)
            return 2
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        policy = binding.policy
        label = ", ".join([f"sink {policy.sink}", f"window {policy.window}",
                           *(f"{key} {value}" for key, value in settings.items())])
        _print_run(f"{name} ({label})", text, cache, stamps, answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
