"""What retrieval prefill costs in quality, setting by setting, against exact prefill on one prompt.

One model, one length: real HotpotQA text is prefilled in chunks of ``--chunk`` tokens once with
``prefill="exact"``, then once per variant with ``prefill="retrieval"`` and the variant's policy
settings (``name:key=value,key=value``; values parsed as JSON, else kept as strings). Per variant:
prefill seconds and their ratio to exact, and over the last ``--keep`` prompt positions the mean
and last next-token KL(exact || variant) and the top-1 agreement. The errors of a retrieval
prefill compound over positions and layers, so the mean over many positions says more than the
last token alone.

Rows stream to ``results/bench_prefill_quality_<model>_<length>.jsonl`` (a rerun skips finished
variants; the exact log-probs are kept beside it in ``..._logits/``, not committed); the summary
goes to ``.json`` + ``.png``. The summary JSON keeps every row, and a rerun keeps (does not redo)
the variants it holds, so rows of a committed file survive a fresh clone; each row carries the
exact prefill time it was measured against (``exact s``: rows from another machine differ there).

    python benchmarks/bench_prefill_quality.py --model qwen2.5-coder-0.5b-instruct --length 8192
    python benchmarks/bench_prefill_quality.py --model stories260K --length 16384 \\
        --variants default block16:prefill_block=16 estimate:prefill_estimate=true
    python benchmarks/bench_prefill_quality.py --check   # a covering prefill_select gives KL ~ 0
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Table, load_model, machine, prefill_in_chunks, with_committed_rows  # noqa: E402

#: the policy's defaults, and block selection alone (the rule the other settings were first measured on)
DEFAULT_VARIANTS = ["default", "blocks:prefill_exact_tail=0,prefill_per_query=0"]
COLUMNS = [("variant", "variant", "s", 14), ("prefill_s", "prefill s", ".1f", 9), ("exact_prefill_s", "exact s", ".1f", 7),
           ("time_ratio", "x exact", ".2f", 7),
           ("kl_mean", "KL mean", ".4f", 8), ("kl_last", "KL last", ".4f", 8), ("top1", "top-1", ".3f", 6)]


def parse_variant(text: str) -> tuple[str, dict]:
    """``"name:key=value,key=value"`` (or a bare name with no settings) -> ``(name, settings)``."""
    name, _, spec = text.partition(":")
    settings = {}
    for item in filter(None, spec.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"--variants: {item!r} in {text!r} is not key=value")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return name, settings


def prefill(model, ids: torch.Tensor, chunk: int, keep: int, desc: str, **settings) -> tuple[torch.Tensor, float]:
    """Log-probs ``[keep, vocab]`` of the prompt's last ``keep`` positions and the prefill seconds."""
    import lckv

    lckv.enable(model, "retrieval", **settings)
    logits, seconds = prefill_in_chunks(model, ids, lckv.new_cache(model), chunk, keep, desc)
    lckv.disable(model)
    return torch.log_softmax(logits[0].float(), -1), seconds


def compare(exact: torch.Tensor, got: torch.Tensor) -> dict:
    kl = (exact.exp() * (exact - got)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_last": float(kl[-1]),
            "top1": float((exact.argmax(-1) == got.argmax(-1)).float().mean())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--keep", type=int, default=256, help="last prompt positions compared")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="name:key=value,... policy settings")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--check", action="store_true", help="a covering prefill_select must reproduce exact prefill")
    args = parser.parse_args(argv)
    if args.check:
        args.model, args.length, args.chunk, args.keep = "stories260K", 1024, 256, 64
        args.variants = ["covering:prefill_select=100000", "small:prefill_select=32,prefill_block=8"]
        args.results = Path(tempfile.mkdtemp(prefix="lckv-prefill-quality-check-"))
    variants = [parse_variant(v) for v in args.variants]
    name = f"bench_prefill_quality_{args.model.lower()}_{args.length}"
    args.results.mkdir(parents=True, exist_ok=True)
    stream, logits_dir = args.results / f"{name}.jsonl", args.results / f"{name}_logits"
    logits_dir.mkdir(exist_ok=True)
    if args.fresh:
        stream.unlink(missing_ok=True)
        (logits_dir / "exact.pt").unlink(missing_ok=True)
    rows = [json.loads(line) for line in stream.read_text().splitlines() if line.strip()] if stream.exists() else []
    summary = args.results / f"{name}.json"
    if not args.fresh:  # the committed rows: kept, not rerun
        rows = with_committed_rows(rows, summary, lambda r: r["variant"])
    done = {r["variant"] for r in rows}

    from lckv.research.capture import hotpotqa_token_ids

    model, tokenizer = load_model(args.model, max_positions=args.length + 1)
    ids = hotpotqa_token_ids(tokenizer, args.length).unsqueeze(0)
    exact_path = logits_dir / "exact.pt"
    if exact_path.exists():
        exact, exact_s = torch.load(exact_path)
    else:
        exact, exact_s = prefill(model, ids, args.chunk, args.keep, "exact", prefill="exact")
        torch.save((exact, exact_s), exact_path)
    print(f"# {args.model}, {args.length} tokens in chunks of {args.chunk}: exact prefill {exact_s:.1f} s; "
          f"KL and top-1 over the last {args.keep} positions")
    table = Table(COLUMNS)
    for r in rows:
        table.row(r)
    for variant, settings in variants:
        if variant in done:
            continue
        got, seconds = prefill(model, ids, args.chunk, args.keep, variant, prefill="retrieval", **settings)
        row = {"variant": variant, "settings": settings, "prefill_s": seconds, "exact_prefill_s": exact_s,
               "time_ratio": seconds / exact_s, **compare(exact, got)}
        with stream.open("a") as sink:
            sink.write(json.dumps(row) + "\n")
        rows.append(row)
        table.row(row)
    payload = {"benchmark": "prefill_quality", "machine": machine(), "model": args.model, "length": args.length,
               "chunk": args.chunk, "keep": args.keep, "exact_prefill_s": exact_s, "rows": rows}
    summary.write_text(json.dumps(payload, indent=1) + "\n")
    plot(rows, args.results / f"{name}.png", f"{args.model}, {args.length} tokens")
    print(f"wrote {args.results / (name + '.json')} and .png")
    if args.check:
        covering = next(r for r in rows if r["variant"] == "covering")
        if not covering["kl_mean"] < 1e-6 or covering["top1"] != 1.0:
            raise SystemExit(f"--check failed: a covering prefill_select differs from exact: {covering}")
        print(f"--check: covering prefill_select equals exact (mean KL {covering['kl_mean']:.1e}); "
              f"prefill_select 32 gives mean KL {next(r for r in rows if r['variant'] == 'small')['kl_mean']:.4f}")
    return payload


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        ax.scatter(r["time_ratio"], r["kl_mean"])
        ax.annotate(r["variant"], (r["time_ratio"], r["kl_mean"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set(xlabel="prefill time / exact prefill time", ylabel="mean next-token KL vs exact", yscale="log",
           title=f"retrieval prefill settings: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
