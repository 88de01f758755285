"""Regenerates docs/results.md (the full benchmark tables) from benchmarks/results/*.json.

    python benchmarks/render_results.py

Nothing in docs/results.md is typed by hand. Real models come first; stories260K (the toy model
used for fast tests) last. A benchmark without a JSON file is listed as not run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "results.md"


def _natural(path: Path) -> list:
    """Sort key of a result file: its name with digit runs as numbers (``_s6`` before ``_s11``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem)]


def _load(pattern: str) -> list[dict]:
    """The result files matching ``pattern``, in natural name order (later files supersede earlier
    rows of the same case); each dict gets ``_file`` (the file's stem)."""
    return [{**json.loads(p.read_text()), "_file": p.stem} for p in sorted(RESULTS.glob(pattern), key=_natural)]


def _machine(m: dict) -> str:
    cpu = m.get("cpu") or m.get("processor") or m.get("platform", "?")
    threads = m.get("torch_threads") or m.get("threads")
    return f"{m.get('date', '')} on {cpu}, {threads} threads, no GPU".strip()


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _by_model(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by model, real models first, stories260K last."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run.get("model", "stories260K"), []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: kv[0].lower().startswith("stories")))


def exact() -> str:
    runs = _load("bench_exact*.json")
    if not runs:
        return "## Exact path vs sdpa\n\nNot run yet (`python benchmarks/bench_exact.py`).\n"
    table = [[run["model"], str(run["length"]), f"{run['summary']['sdpa_prefill_s']:.1f}",
              f"{run['summary']['lckv_prefill_s']:.1f}", f"{run['summary']['prefill_ratio']:.3f}x",
              f"{run['summary']['sdpa_decode_ms']:.1f}", f"{run['summary']['lckv_decode_ms']:.1f}",
              f"{run['summary']['decode_ratio']:.3f}x", f"{run['summary']['max_rel_logit_diff']:.1e}",
              _machine(run["machine"])] for run in runs]
    return "\n".join([
        "## Exact path vs sdpa (`bench_exact.py`)", "",
        "`lckv.enable(model, \"full\")` against transformers' sdpa, same model and prompt (real HotpotQA text), "
        "fp32; runs alternate and the best of the repeats is shown. Target: prefill <= 1.1x, decode <= 1.05x, "
        "logits equal to 1e-4 relative.", "",
        _table(["model", "tokens", "sdpa prefill s", "lckv prefill s", "ratio", "sdpa decode ms", "lckv decode ms",
                "ratio", "max rel. logit diff", "measured"], table), ""])


def fidelity() -> str:
    runs = [r for r in _load("bench_fidelity*.json") if not r.get("quick")]
    if not runs:
        return "## Fidelity\n\nNot run yet (`python benchmarks/bench_fidelity.py`).\n"
    out = ["## Fidelity (`bench_fidelity.py`)", "",
           "Real HotpotQA text, exact prefill, teacher-forced decode steps. Cells: next-token KL vs `full` / greedy "
           "agreement. Budgets count sink + window + selected keys per query head.", ""]
    for model, group in _by_model(runs).items():
        rows = [row for run in group for row in run["rows"]]
        notes = [run["note"] for run in group if run.get("note")]
        policies = list(dict.fromkeys(r["policy"] for r in rows))
        budgets = list(dict.fromkeys(r["budget"] for r in rows))
        dates = ", ".join(sorted({r["machine"].get("date", "?") for r in group}))
        out += [f"### {model}", "", f"{group[0]['steps']} decode steps; measured {dates} "
                f"({_machine(group[0]['machine']).split(' on ', 1)[-1]}).", ""]
        for length in sorted({r["length"] for r in rows}):
            table = []
            for policy in policies:
                cells = [policy]
                for budget in budgets:
                    hit = [r for r in rows if r["length"] == length and r["policy"] == policy and r["budget"] == budget]
                    cells.append(f"{hit[-1]['kl']:.4f} / {hit[-1]['greedy_agreement']:.2f}" if hit else "-")
                table.append(cells)
            out += [f"**{length} tokens**", "", _table(["policy"] + [f"budget {b}" for b in budgets], table), ""]
        out += [f"Note: {n}" for n in notes] + ([""] if notes else [])
        latest = {(r["policy"], r["length"], r["budget"]): r for r in rows}
        attn = [[r["policy"], str(r["length"]), r["budget"], f"{r['attn_rel_err']:.3f}", f"{r['recall']:.3f}",
                 f"{r['mass']:.3f}"]
                for r in sorted(latest.values(), key=lambda r: (r["length"], policies.index(r["policy"])))
                if r["budget"] == "5%"]
        if attn:
            out += ["Attention level at the 5% budget (exact history; mean over steps, layers, heads):", "",
                    _table(["policy", "tokens", "budget", "output rel. error", "top-k recall", "attention mass"], attn), ""]
    return "\n".join(out)


def decode() -> str:
    runs = _load("bench_decode*.json")
    if not runs:
        return "## Decode latency\n\nNot run yet (`python benchmarks/bench_decode.py`).\n"
    out = ["## Decode latency (`bench_decode.py`)", "",
           "Batch 1, CPU. Floor = a one-token forward with attention replaced by a no-op, measured in the same run. "
           "Attention ms/token sums, over layers, the median of the same call repeated; step ms/token times whole "
           "model forwards. The first step builds the indexes (one-off, not in the per-token times).", ""]
    for model, group in _by_model(runs).items():
        rows = []
        for run in group:
            for r in run["rows"]:
                r.setdefault("threads", run["machine"].get("torch_threads"))
                r.setdefault("measured", run["machine"].get("date", "?"))
                rows.append(r)
        rows.sort(key=lambda r: (r["tokens"], r["threads"] or 0))

        def fmt(r, key, spec):
            return format(r[key], spec) if r.get(key) is not None else "-"

        table = [[str(r["tokens"]), str(r["threads"]), r["policy"], fmt(r, "attention_ms", ".2f"),
                  fmt(r, "attention_speedup", ".1f"), fmt(r, "step_ms", ".1f"), fmt(r, "step_over_floor", ".3f"),
                  fmt(r, "sdpa_over_step", ".2f"), fmt(r, "first_step_s", ".1f"), fmt(r, "resident_mib", ".2f"),
                  fmt(r, "host_mib", ".0f"), fmt(r, "index_mib", ".0f"), r["measured"]] for r in rows]
        notes = [run["note"] for run in group if run.get("note")]
        out += [f"### {model}", "", f"Caches: {group[-1]['prefill']}.", ""] + [f"Note: {n}" for n in notes] + [""]
        out += [_table(["cached tokens", "threads", "policy", "attention ms/token", "x exact", "step ms/token",
                        "step / floor", "sdpa / step", "first step s", "resident MiB", "host KV MiB", "index MiB",
                        "measured"], table), ""]
    return "\n".join(out)


def kernels() -> str:
    runs = _load("bench_kernels*.json")
    if not runs:
        return "## Kernels\n\nNot run yet (`python benchmarks/bench_kernels.py`).\n"
    latest = runs[-1]  # bench_kernels, _b, _c, ...: by name, the newest last
    keys = [(t["threads"], t["context"], t["dtype"]) for t in latest["targets_at_k2048"]]

    def cell(run, key):
        for t in run["targets_at_k2048"]:
            if (t["threads"], t["context"], t["dtype"]) == key:
                return f"{t['cpu_over_floor']:.2f}x ({t['gather_over_floor']:.2f}x)"
        return "-"

    table = [[str(k[0]), str(k[1]), k[2]] + [cell(run, k) for run in runs]
             + [f"{min(t['speedup_vs_reference'] for run in runs for t in run['targets_at_k2048'] if (t['threads'], t['context'], t['dtype']) == k):.0f}x"]
             for k in keys]
    bandwidth = "; ".join(f"`{run['_file']}` {run['copy_bandwidth_gbps'][str(max(map(int, run['copy_bandwidth_gbps'])))]:.0f} GB/s"
                          for run in runs)
    triton = ", ".join(f"{t['kernel']} ({t['max_abs_error_vs_reference']:.1e})" if "max_abs_error_vs_reference" in t
                       else f"{t['kernel']}: {t.get('status', 'not checked')}" for t in latest["triton"])
    machine = latest["machine"]
    return "\n".join([
        "## Kernels (`bench_kernels.py`, stories260K-era shapes)", "",
        "C++ sparse attention with LSE at k = 2048 (32 query / 8 kv heads, head_dim 128): time over the floor "
        "(bytes read / copy bandwidth measured in the same run; target within 2x), and in brackets the memory-only "
        "gather of the same rows (same prefetch and threads, no arithmetic) over the same floor. One column per run, "
        f"oldest first, {machine.get('date', 'date not recorded')} on {machine.get('platform', '?')}, no GPU; SIMD path "
        f"{machine.get('simd_path', '?')}" + (f" (bf16: {machine['simd_path_bf16']})" if "simd_path_bf16" in machine else "")
        + f". Copy bandwidth with 2 threads: {bandwidth}.", "",
        _table(["threads", "context", "dtype"] + [f"`{run['_file']}`" for run in runs] + ["vs torch reference (worst run)"],
               table), "",
        f"Triton kernels, interpreter only (max abs error vs reference; not timed: no GPU): {triton}.", ""])


def index() -> str:
    runs = [r for r in _load("bench_index*.json") if "large_k" not in r["_file"]]
    if not runs:
        return "## Vector index\n\nNot run yet (`python benchmarks/bench_index.py`).\n"
    out = ["## Vector index (`bench_index.py`)", "",
           "Decode queries not used for building; ground truth = exact top-100 inner products; faiss in the same run. "
           "Cells: the fewest keys scored (% of the head's keys) at recall@100 >= 0.95 (target for real models: "
           "<= 2% on every captured head), and the graph's queries/s over faiss HNSW32's at recall 0.9.", ""]

    def pct(x):
        return "not reached" if x is None else f"{100 * x:.2f}%"

    for run in sorted(runs, key=lambda r: "stories" in r["_file"]):
        meta = run["meta"]
        families = [k.split("[")[1][:-1] for k in run["targets"][0] if k.startswith("min_fraction_at_recall100_095[")]
        table = []
        for t in run["targets"]:
            cells = [t["set"] + (" (synthetic)" if t["synthetic"] else ""), str(t["n_keys"])]
            if families:
                cells += [pct(t[f"min_fraction_at_recall100_095[{f}]"]) for f in families]
            else:
                cells.append(pct(t["graph_min_fraction_at_recall100_095"]))
            ratio = t["qps_ratio_graph_over_hnsw_at_0.9"]
            cells.append("-" if ratio is None else f"{ratio:.2f}x")
            table.append(cells)
        header = ["set", "keys/head"] + ([f"{f}" for f in families] or ["lckv Graph"]) + ["graph / HNSW QPS at 0.9"]
        measured = _machine(meta["machine"]) if "machine" in meta else "date not recorded"
        out += [f"### `{run['_file']}`", "", f"{meta['search_threads']} search thread(s); measured {measured}.", "",
                _table(header, table), ""]
        if meta.get("wide_sweep"):
            out += ["Wider settings on the same sets (recall@100 at % of keys scored):", ""]
            out += [f"- {line}" for line in meta["wide_sweep"]] + [""]
    return "\n".join(out)


def index_large_k() -> str:
    runs = _load("bench_index_large_k.json")
    if not runs:
        return "### Vector index at large k\n\nNot run yet (`python benchmarks/bench_index_large_k.py`).\n"
    run = runs[0]
    rows = run["rows"]
    table = []
    for name, k in dict.fromkeys((r["set"], r["k"]) for r in rows):
        cells = [name, str(k)]
        for index in dict.fromkeys(r["index"] for r in rows):
            sel = [r for r in rows if r["set"] == name and r["k"] == k and r["index"] == index]
            best = max(sel, key=lambda r: r["recall"])
            hit = sorted((r for r in sel if r["recall"] >= 0.95), key=lambda r: r["fraction_scored"])
            cells.append(f"{hit[0]['fraction_scored']:.1%} scored, {hit[0]['qps']:.0f} QPS" if hit
                         else f"not reached (best {best['recall']:.3f})")
        table.append(cells)
    indexes = list(dict.fromkeys(r["index"] for r in rows))
    return "\n".join([
        "## Vector index at large k (`bench_index_large_k.py`, stories260K keys)", "",
        f"Real stories260K Q/K, {rows[0]['n_keys']} keys per head, 256 decode queries, 1 thread, faiss in the same run; "
        f"measured {_machine(run['machine'])}. Cells: the cheapest setting that reaches recall@k >= 0.95 "
        "(% of keys scored, queries/s).", "",
        _table(["set", "k"] + indexes, table), ""])


def tasks() -> str:
    runs = [r for r in _load("bench_tasks_*.json") if r.get("benchmark") == "tasks"]
    if not runs:
        return "## Task accuracy\n\nNot run yet (`python benchmarks/bench_tasks.py`).\n"
    parts = ["## Task accuracy under compression (`bench_tasks.py`)", "",
             "Mean score per task (fraction of gold answers found; SubEM for HotpotQA) over the samples, every method "
             "on the same prompts. lckv methods decode from one shared exact prefill (the question included, so "
             "`snapkv` votes with the question's queries and the first answer token is exact); kvpress presses "
             "(`kvpress:*`) compress the context once, without the question, then read the question over the "
             "compressed cache (kvpress's own protocol, see docs/tasks.md). `keys`: keys a query attends at the first "
             "decode step (kvpress: kept context + question). `drop %`: relative drop of the mean vs `full` "
             "(the paper's metric). `gold rec` (HotpotQA): share of the gold documents' offloaded tokens a "
             "selection policy attends exactly at the first decode step, mean over layers, kv heads and samples. "
             "Timings: first decode step and decode tokens/s after it.", ""]
    for model, model_runs in _by_model(runs).items():
        for run in model_runs:
            summary = run["summary"]
            gold = any(e.get("gold_recall") is not None for e in summary)  # HotpotQA runs since gold recall
            for length in sorted({e["length"] for e in summary}):
                entries = [e for e in summary if e["length"] == length]
                names = [t for t in dict.fromkeys(e["task"] for e in entries) if t != "all"]
                settings = list(dict.fromkeys((e["method"], e["budget"]) for e in entries))
                cells = {(e["task"], e["method"], e["budget"]): e for e in entries}
                table = []
                for method, budget in settings:
                    ran = [cells[(t, method, budget)] for t in names if (t, method, budget) in cells]
                    overall = cells.get(("all", method, budget)) or ran[0]
                    if len(ran) < len(names):  # a method run on some tasks only: no mean over all of them
                        overall = {**overall, "score": None, "drop_pct": None}
                    n = sum(cells[(t, method, budget)]["n"] for t in names if (t, method, budget) in cells)
                    row = [method, budget or "-", _fmt(overall.get("budget_tokens"), ".0f"), str(n)]
                    row += [_fmt(cells[(t, method, budget)]["score"], ".2f") if (t, method, budget) in cells else "-"
                            for t in names]
                    row += [_fmt(overall.get("score"), ".3f"), _fmt(overall.get("drop_pct"), ".1f")]
                    row += [_fmt(overall.get("gold_recall"), ".3f")] if gold else []
                    row += [_fmt(None if overall.get("first_step_s") is None else 1e3 * overall["first_step_s"], ".0f"),
                            _fmt(overall.get("decode_tokens_per_s"), ".1f")]
                    table.append(row)
                parts += [f"**{model}, {length} tokens** (`{run['_file']}`; measured {_machine(run['machine'])})", "",
                          _table(["method", "budget", "keys", "n"] + names + ["mean", "drop %"]
                                 + (["gold rec"] if gold else []) + ["1st step ms", "tok/s"], table), ""]
    return "\n".join(parts)


def prefill() -> str:
    runs = [run for run in _load("bench_prefill_*.json") if run.get("benchmark") == "prefill"]
    if not runs:
        return "## Chunked prefill\n\nNot run yet (`python benchmarks/bench_prefill.py`).\n"
    parts = ["## Chunked prefill, exact vs retrieval (`bench_prefill.py`)", "",
             "Real HotpotQA text fed in chunks under `retrieval` (decode budget as listed), each (length, mode) in a "
             "fresh process. `B/token`: peak RSS growth over the loaded model per context token. KL: next-token "
             "KL(exact || retrieval) after the prompt; agreement: greedy continuations compared token by token.", ""]
    for model, model_runs in _by_model(runs).items():
        for run in model_runs:
            table = [[str(r["length"]), r["mode"], r.get("host_dtype") or "model's", str(r["chunk"]),
                      str(r["prefill_select"]), _fmt(r["prefill_s"], ".1f"), _fmt(r["prefill_tokens_per_s"], ".0f"),
                      _fmt(r.get("first_step_s"), ".2f"),
                      _fmt(r.get("decode_tokens_per_s"), ".1f"), _fmt(r["peak_rss_gib"], ".2f"),
                      _fmt(r["rss_bytes_per_token"], ".0f"), _fmt(r.get("kl"), ".4f"), _fmt(r.get("agreement"), ".2f")]
                     for r in run["rows"]]
            fits = "; ".join(f"{f['mode']}: {1e6 * f['seconds_per_token']:.0f} s per million tokens "
                             f"(largest residual {100 * f['max_rel_residual']:.0f}%)" for f in run.get("fits", []))
            parts += [f"**{model}** (measured {_machine(run['machine'])}){'; linear fit ' + fits if fits else ''}", "",
                      _table(["tokens", "prefill", "host KV", "chunk", "prefill_select", "prefill s", "tok/s",
                              "1st step s", "decode tok/s", "peak RSS GiB", "B/token", "KL", "agreement"], table), ""]
    for run in _load("bench_prefill_quality_*.json"):
        table = [[r["variant"], ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults",
                  _fmt(r["prefill_s"], ".1f"), _fmt(r["time_ratio"], ".2f"), _fmt(r["kl_mean"], ".4f"),
                  _fmt(r["kl_last"], ".4f"), _fmt(r["top1"], ".3f")] for r in run["rows"]]
        parts += [f"**{run['model']}, {run['length']} tokens: retrieval prefill settings vs exact prefill** "
                  f"(`bench_prefill_quality.py`, measured {_machine(run['machine'])}; exact prefill "
                  f"{run['exact_prefill_s']:.1f} s; KL and top-1 over the last {run['keep']} prompt positions)", "",
                  _table(["variant", "settings", "prefill s", "x exact", "KL mean", "KL last", "top-1"], table), ""]
    return "\n".join(parts)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render() -> str:
    return "\n".join(["# Benchmark results", "",
                      "Generated by `python benchmarks/render_results.py` from `benchmarks/results/*.json` (do not edit). "
                      "All numbers are CPU measurements on this project's 2-core machines unless a GPU is named.", "",
                      exact(), tasks(), fidelity(), prefill(), decode(), index(), index_large_k(), kernels()])


def main():
    OUT.write_text(render())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
