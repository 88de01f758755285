"""Main job: generate text from the real stories260K model through the lckv backend.

    python -m lckv                                   # streaming, sink 4, window 64, 256 tokens
    python -m lckv --policy full --window 32 --prompt "Tom had a dog"

Prints the text, decode tokens/s, and how many KV-cache bytes stay resident (sink + window, on the
compute device) vs. offloaded (host memory) or evicted.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import LogitsProcessorList

import lckv
from lckv.data import SharedDataNotFoundError, stories260k_paths
from lckv.models.llama2c import load

DEFAULT_PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lckv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="streaming", choices=lckv.available_policies())
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--checkpoint", help="llama2.c checkpoint (default: stories260K from ../shared/data)")
    parser.add_argument("--tokenizer", help="llama2.c tokenizer (default: tok512.bin beside stories260K)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")

    try:
        default_ckpt, default_tok = stories260k_paths() if not (args.checkpoint and args.tokenizer) else (None, None)
    except SharedDataNotFoundError as exc:
        print(f"error: {exc}; pass --checkpoint and --tokenizer", file=sys.stderr)
        return 2
    model, tok = load(args.checkpoint or default_ckpt, args.tokenizer or default_tok)
    try:
        lckv.enable(model, args.policy, sink=args.sink, window=args.window)
    except lckv.PolicyConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    ids = torch.tensor([tok.encode(args.prompt)])
    mask = torch.ones_like(ids)
    cache = lckv.new_cache(model)
    stamps = []  # one time stamp per generated token, taken when its logits are ready

    def stamp(input_ids, scores):
        stamps.append(time.perf_counter())
        return scores

    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=args.max_new_tokens,
                             do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
        total_s = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    report = cache.memory_report()
    print(tok.decode(out[0], skip_special_tokens=True))
    print()
    print(f"policy        {model.lckv_binding.policy}")
    print(f"tokens        prompt {ids.shape[1]}, generated {new}, cached {report['tokens']} per layer")
    decode = f"{(len(stamps) - 1) / (stamps[-1] - stamps[0]):.1f} tokens/s decode, " if len(stamps) > 1 else ""
    print(f"speed         {decode}{new / total_s:.1f} tokens/s end to end "
          f"(prefill + first token {(stamps[0] - start) * 1e3:.1f} ms; CPU, {torch.get_num_threads()} threads)")
    print(f"KV resident   {_mib(report['resident_bytes'])} (sink + window, all layers)")
    print(f"KV offloaded  {_mib(report['offloaded_bytes'])} (host memory)")
    print(f"KV evicted    {report['evicted_tokens_per_layer']} tokens per layer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
