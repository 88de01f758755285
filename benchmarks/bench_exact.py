"""The exact path against transformers' sdpa on a real model: prefill time, per-token decode
time and logits, same model, same prompt, same run.

``lckv.enable(model, "full")`` attends every token exactly: the resident sink + window on the
compute device, older tokens offloaded to host memory and attended there, each part with torch's
fused CPU flash-attention kernel (``lckv.ops.attention_with_lse``), the parts merged by
log-sum-exp. Runs alternate (sdpa, lckv, sdpa, lckv, ...) so a slow host minute hits both; the
best of the repeats is reported. ``--check`` verifies the logits first (1e-4 relative).

    python benchmarks/bench_exact.py                                   # Qwen2.5-Coder-0.5B, 8K tokens
    python benchmarks/bench_exact.py --model smollm2-135m-instruct --length 4096
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Table, load_model, machine, write_json  # noqa: E402

import lckv  # noqa: E402
from lckv.research.capture import hotpotqa_token_ids  # noqa: E402


def run_once(model, ids, steps, use_lckv: bool):
    """Prefill ``ids`` then decode ``steps`` tokens greedily; returns prefill s, per-step s, logits."""
    if use_lckv:
        lckv.enable(model, "full")
    else:
        lckv.disable(model)
    with torch.no_grad():
        cache = lckv.new_cache(model) if use_lckv else None
        start = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True)
        prefill_s = time.perf_counter() - start
        cache, logits = out.past_key_values, [out.logits[:, -1].float()]
        token, step_s = logits[-1].argmax(-1, keepdim=True), []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            step_s.append(time.perf_counter() - start)
            logits.append(out.logits[:, -1].float())
            token = logits[-1].argmax(-1, keepdim=True)
    return prefill_s, step_s, torch.cat(logits)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="compare logits before timing (always done)")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    model, tok = load_model(args.model)
    ids = hotpotqa_token_ids(tok, args.length, seed=args.length)[None]
    print(f"# {args.model}, {args.length} tokens of HotpotQA text, {args.steps} decode steps, "
          f"{torch.get_num_threads()} threads", flush=True)
    run_once(model, ids[:, :256], 2, False)  # warm-up: first calls allocate and pick kernels
    run_once(model, ids[:, :256], 2, True)
    table = Table([("run", "run", "s", 10), ("prefill_s", "prefill s", ".2f", 9),
                   ("decode_ms", "decode ms/token", ".1f", 15), ("ratio_prefill", "prefill x sdpa", ".3f", 14),
                   ("ratio_decode", "decode x sdpa", ".3f", 13)])
    best = {"sdpa": [float("inf"), float("inf")], "lckv-full": [float("inf"), float("inf")]}
    logits, rows = {}, []
    for rep in range(args.repeats):
        for label in ("sdpa", "lckv-full"):
            prefill_s, step_s, out = run_once(model, ids, args.steps, label == "lckv-full")
            logits[label] = out
            decode_ms = 1e3 * sorted(step_s)[len(step_s) // 2]  # median step
            best[label] = [min(best[label][0], prefill_s), min(best[label][1], decode_ms)]
            row = dict(run=f"{label}#{rep}", prefill_s=prefill_s, decode_ms=decode_ms)
            if label == "lckv-full":
                row.update(ratio_prefill=prefill_s / rows[-1]["prefill_s"], ratio_decode=decode_ms / rows[-1]["decode_ms"])
            rows.append(row)
            table.row(row)
    rel = ((logits["lckv-full"] - logits["sdpa"]).abs().max() / logits["sdpa"].abs().max()).item()
    same_tokens = bool(torch.equal(logits["lckv-full"].argmax(-1), logits["sdpa"].argmax(-1)))
    summary = dict(prefill_ratio=best["lckv-full"][0] / best["sdpa"][0], decode_ratio=best["lckv-full"][1] / best["sdpa"][1],
                   sdpa_prefill_s=best["sdpa"][0], lckv_prefill_s=best["lckv-full"][0], sdpa_decode_ms=best["sdpa"][1],
                   lckv_decode_ms=best["lckv-full"][1], max_rel_logit_diff=rel, same_greedy_tokens=same_tokens)
    print(f"best of {args.repeats}: prefill {summary['prefill_ratio']:.3f}x sdpa, decode {summary['decode_ratio']:.3f}x sdpa; "
          f"logits max rel diff {rel:.2e}, same greedy tokens: {same_tokens}")
    name = args.name or f"bench_exact_{args.model.split('-')[0]}_{args.length // 1024}k"
    write_json(name, {"benchmark": "exact", "machine": machine(), "model": args.model, "length": args.length,
                      "steps": args.steps, "rows": rows, "summary": summary})
    plot(rows, summary, RESULTS / f"{name}.png", args)
    if rel > 1e-4 or not same_tokens:
        raise SystemExit(f"lckv full differs from sdpa: max relative logit difference {rel:.2e}")


def plot(rows, summary, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "prefill_s", "prefill (s)"), (axes[1], "decode_ms", "decode (ms/token)")):
        ax.bar([r["run"] for r in rows], [r[key] for r in rows], color=["C0" if "sdpa" in r["run"] else "C1" for r in rows])
        ax.set(ylabel=label)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{args.model}, {args.length} tokens: lckv full vs sdpa (prefill {summary['prefill_ratio']:.2f}x, "
                 f"decode {summary['decode_ratio']:.2f}x)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
