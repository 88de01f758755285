"""Chunked prefill, exact vs retrieval-augmented: tokens/s, peak memory and the quality cost.

Per context length and prefill mode, a fresh process loads the model, feeds real HotpotQA text in
chunks of ``--chunk`` tokens through one LckvCache under the ``retrieval`` policy (default
settings, ``--budget`` for decoding) with ``prefill="exact"`` (every earlier token attended) or
``prefill="retrieval"`` (sink + window + chunk exactly, plus ``--prefill-select`` offloaded keys
per kv head for each block of ``--prefill-block`` queries; ``lckv.policies.selection``; modes
``retrieval-<variant>`` add the settings of ``common.PREFILL_VARIANTS``, e.g. ``retrieval-ph4t256``:
an exact tail of 256 queries per chunk and 4 rows per query head per query), then decodes
``--decode`` tokens greedily. Reported: prefill seconds and tokens/s, the first decode step and
decode tokens/s, peak RSS of the process and its growth over the loaded model per context token,
host KV and index bytes, and, where a retrieval mode and exact ran at a length, the next-token
KL(exact || mode) after the prompt and the agreement of the greedy continuations. A linear fit
of prefill seconds against length (per mode, over lengths >= 32K) checks that retrieval prefill
is linear.

Rows stream to ``results/bench_prefill_<model>.jsonl`` (a rerun skips finished rows, and the
rows of the summary JSON, so a fresh clone keeps the committed ones; the
next-token log-probabilities for the KL stay in ``results/bench_prefill_<model>_logits/``, not
committed); summary to ``bench_prefill_<model>.json`` + ``.png``.

    python benchmarks/bench_prefill.py --model stories260K --lengths 32768 131072 1048576
    python benchmarks/bench_prefill.py --model qwen2.5-coder-0.5b-instruct --lengths 16384 32768 131072
    python benchmarks/bench_prefill.py --model qwen2.5-coder-0.5b-instruct --lengths 131072 --modes retrieval-ph4t256
    python benchmarks/bench_prefill.py --check     # harness check: a covering prefill_select is exact
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PREFILL_VARIANTS, RESULTS, Table, greedy, load_model, machine, prefill_in_chunks, with_committed_rows  # noqa: E402

#: ``exact``, or retrieval prefill with one of the settings of :data:`common.PREFILL_VARIANTS`
MODES = ("exact", *(f"retrieval{suffix}" for suffix in PREFILL_VARIANTS))
COLUMNS = [("length", "tokens", "d", 8), ("mode", "prefill", "s", 9), ("host_dtype", "host KV", "s", 8),
           ("prefill_s", "prefill s", ".1f", 9),
           ("prefill_tokens_per_s", "tok/s", ".0f", 7), ("first_step_s", "1st step s", ".2f", 0),
           ("decode_tokens_per_s", "dec tok/s", ".1f", 0), ("peak_rss_gib", "peak GiB", ".2f", 0),
           ("rss_bytes_per_token", "B/token", ".0f", 8), ("kl", "KL", ".4f", 7), ("agreement", "agree", ".2f", 5)]


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_one(args) -> dict:
    """One (length, mode) row in this process; writes the last log-probs to ``args.logits``."""
    import lckv
    from lckv.research.capture import hotpotqa_token_ids

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, tokenizer = load_model(args.model, max_positions=args.length + args.decode + 1)
    ids = hotpotqa_token_ids(tokenizer, args.length).unsqueeze(0)
    settings = dict(budget=args.budget, prefill_select=args.prefill_select, prefill_block=args.prefill_block,
                    host_dtype=args.host_dtype, **mode_settings(args.mode))
    lckv.enable(model, "retrieval", **settings)
    cache = lckv.new_cache(model)
    base_kib = _rss_kib()
    logits, prefill_s = prefill_in_chunks(model, ids, cache, args.chunk, desc=f"{args.length} {args.mode}")
    log_probs = torch.log_softmax(logits[0, -1].float(), -1)
    tokens, steps = greedy(model, cache, int(log_probs.argmax()), args.decode)  # a fixed length: no EOS
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(log_probs, args.logits)
    report, policy = cache.memory_report(), cache.layers[0].policy
    index_bytes = sum(sum(h.memory_bytes() for h in layer.selection.heads if hasattr(h, "memory_bytes"))
                      for layer in cache.layers if layer.selection is not None)
    return {"model": args.model, "length": args.length, "mode": args.mode, "chunk": args.chunk,
            "budget": args.budget, "host_dtype": args.host_dtype,
            **{name: getattr(policy, name) for name in settings if name.startswith("prefill")},  # as enabled
            "prefill_s": prefill_s, "prefill_tokens_per_s": args.length / prefill_s,
            "first_step_s": steps[0] if steps else None,
            "decode_tokens_per_s": (len(steps) - 1) / sum(steps[1:]) if len(steps) > 1 else None,
            "peak_rss_gib": peak_kib / 2**20, "model_rss_gib": base_kib / 2**20,
            "rss_bytes_per_token": (peak_kib - base_kib) * 1024 / args.length,
            "host_kv_bytes": report["offloaded_bytes"], "index_bytes": index_bytes or None, "tokens": tokens}


def mode_settings(mode: str) -> dict:
    """The prefill settings of ``mode`` (they override ``--prefill-select``/``--prefill-block``)."""
    return {"prefill": "exact"} if mode == "exact" else PREFILL_VARIANTS[mode[len("retrieval"):]]


def label(row: dict) -> str:
    """What identifies a row's setting beside its length: the mode, with the host store's dtype
    when one was asked for (``retrieval+bfloat16``)."""
    return row["mode"] + (f"+{row['host_dtype']}" if row.get("host_dtype") else "")


def fit_slope(rows: list[dict], mode: str, floor: int = 32768) -> dict | None:
    """Least-squares ``prefill_s = a + b * length`` over a mode's rows at >= ``floor`` tokens, with
    the largest relative residual (how far from linear); None below 3 lengths (a line through two
    points says nothing about linearity)."""
    points = sorted((r["length"], r["prefill_s"]) for r in rows if label(r) == mode and r["length"] >= floor)
    if len(points) < 3:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    a = my - b * mx
    worst = max(abs(y - (a + b * x)) / y for x, y in points)
    return {"mode": mode, "seconds_per_token": b, "intercept_s": a, "max_rel_residual": worst, "points": n}


def summarize(rows: list[dict], logits_dir: Path) -> list[dict]:
    """Adds KL(exact || mode) and greedy agreement to the retrieval rows that have an exact twin."""
    by_key = {(r["length"], label(r)): r for r in rows}
    for r in rows:
        exact = by_key.get((r["length"], "exact"))
        files = [logits_dir / f"{r['length']}_{mode}.pt" for mode in ("exact", label(r))]
        if r["mode"] == "exact" or exact is None or not all(f.exists() for f in files):
            continue  # (a row kept from the summary of another machine keeps its KL and agreement)
        p, q = (torch.load(f) for f in files)
        r["kl"] = float((p.exp() * (p - q)).sum())
        same = sum(a == b for a, b in zip(r["tokens"], exact["tokens"]))
        r["agreement"] = same / max(1, min(len(r["tokens"]), len(exact["tokens"])))
    return sorted(rows, key=lambda r: (r["length"], MODES.index(r["mode"]), label(r)))


def plot(rows: list[dict], fits: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for mode in dict.fromkeys(label(r) for r in rows):  # every label has rows
        points = sorted((r["length"], r["prefill_s"], r["peak_rss_gib"]) for r in rows if label(r) == mode)
        left.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"{mode} prefill")
        right.plot([p[0] for p in points], [p[2] for p in points], "o-", label=mode)
    for fit in fits:
        xs = sorted(r["length"] for r in rows if label(r) == fit["mode"])
        left.plot(xs, [fit["intercept_s"] + fit["seconds_per_token"] * x for x in xs], ":", color="gray")
    left.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="prefill seconds", title="prefill time")
    right.set(xscale="log", xlabel="context tokens", ylabel="peak RSS (GiB)", title="peak memory")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(f"{model}: chunked prefill, exact vs retrieval")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check(args) -> None:
    """With ``prefill_select`` covering the context, retrieval prefill must give exact prefill's
    next token distribution (KL < 1e-6) and greedy continuation."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        payload = main(["--model", args.model, "--lengths", "1024", "--chunk", "256", "--decode", "8",
                        "--prefill-select", "4096", "--results", scratch])
    row = next(r for r in payload["rows"] if r["mode"] == "retrieval")
    if not (row["kl"] < 1e-6 and row["agreement"] == 1.0):
        raise SystemExit(f"--check failed: covering retrieval prefill differs from exact: KL {row['kl']}, "
                         f"agreement {row['agreement']}")
    print(f"--check: covering retrieval prefill equals exact (KL {row['kl']:.2e}, agreement 1.00)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="stories260K", help="a lckv.models registry name or stories260K")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--modes", nargs="+", default=["exact", "retrieval"], choices=MODES,
                        help="retrieval<suffix>: the settings of common.PREFILL_VARIANTS (they override "
                             "--prefill-select and --prefill-block)")
    parser.add_argument("--exact-max", type=int, default=131072, help="longest context prefilled exactly")
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--budget", type=float, default=0.05, help="decode budget (fraction or count)")
    parser.add_argument("--prefill-select", type=int, default=2048)
    parser.add_argument("--prefill-block", type=int, default=64)
    parser.add_argument("--decode", type=int, default=64, help="tokens decoded after the prefill")
    parser.add_argument("--host-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype of the host KV store (default: the model's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--check", action="store_true", help="verify the harness (covering prefill_select is exact)")
    parser.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--logits", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget >= 1:
        args.budget = int(args.budget)
    if args.run_one:
        print(json.dumps(run_one(args)), flush=True)
        return {}
    if args.check:
        check(args)
        return {}
    name = f"bench_prefill_{args.model.lower()}"
    stream, logits_dir = args.results / f"{name}.jsonl", args.results / f"{name}_logits"
    logits_dir.mkdir(parents=True, exist_ok=True)
    if args.fresh and stream.exists():
        stream.unlink()
    rows = [json.loads(line) for line in stream.read_text().splitlines() if line.strip()] if stream.exists() else []
    summary = args.results / f"{name}.json"
    if not args.fresh:  # the committed rows: kept, not rerun
        rows = with_committed_rows(rows, summary, lambda r: (r["length"], label(r)))
    done = {(r["length"], label(r)) for r in rows}
    table = Table(COLUMNS)
    for r in rows:
        table.row(r)
    if not args.summary_only:
        for length in args.lengths:
            for mode in args.modes:
                tag = label({"mode": mode, "host_dtype": args.host_dtype})
                if (length, tag) in done or (mode == "exact" and length > args.exact_max):
                    continue
                command = [sys.executable, __file__, "--run-one", "--model", args.model, "--length", str(length),
                           "--mode", mode, "--chunk", str(args.chunk), "--budget", str(args.budget),
                           "--prefill-select", str(args.prefill_select), "--prefill-block", str(args.prefill_block),
                           "--decode", str(args.decode), "--logits", str(logits_dir / f"{length}_{tag}.pt")]
                if args.host_dtype:
                    command += ["--host-dtype", args.host_dtype]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                done_run = subprocess.run(command, stdout=subprocess.PIPE, text=True)
                if done_run.returncode != 0:
                    raise SystemExit(f"{length} {mode}: the run failed (exit {done_run.returncode})")
                row = json.loads(done_run.stdout.strip().splitlines()[-1])
                with stream.open("a") as sink:
                    sink.write(json.dumps(row) + "\n")
                rows.append(row)
                table.row(row)
    rows = summarize(rows, logits_dir)
    for r in rows:
        if "kl" in r:
            print(f"# {r['length']} tokens: next-token KL(exact || {label(r)}) {r['kl']:.4f}, "
                  f"greedy agreement {r['agreement']:.2f} over {len(r['tokens'])} tokens")
    fits = [f for f in (fit_slope(rows, mode) for mode in dict.fromkeys(label(r) for r in rows)) if f is not None]
    for fit in fits:
        print(f"# {fit['mode']}: {1e6 * fit['seconds_per_token']:.1f} s per million tokens + {fit['intercept_s']:.1f} s, "
              f"largest residual {100 * fit['max_rel_residual']:.1f}% over {fit['points']} lengths")
    payload = {"benchmark": "prefill", "machine": machine(), "model": args.model, "rows": rows, "fits": fits}
    summary.write_text(json.dumps(payload, indent=1) + "\n")
    if rows:
        plot(rows, fits, args.results / f"{name}.png", args.model)
    print(f"wrote {args.results / (name + '.json')} and .png")
    return payload


if __name__ == "__main__":
    main()
