"""Regenerates the README's benchmark section from benchmarks/results/*.json.

    python benchmarks/render_readme.py

Everything between the markers ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in README.md
is replaced; nothing is typed by hand. A benchmark without a JSON file is listed as not run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


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


def fidelity() -> str:
    runs = _load("bench_fidelity*.json")
    runs = [r for r in runs if not r.get("quick")]
    if not runs:
        return "### Fidelity\n\nNot run yet (`python benchmarks/bench_fidelity.py`).\n"
    rows = [row for run in runs for row in run["rows"]]
    notes = [run["note"] for run in runs if run.get("note")]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    out = ["### Fidelity (`bench_fidelity.py`)", "",
           f"stories260K on real HotpotQA text, exact prefill, {runs[0]['steps']} teacher-forced decode steps; "
           f"measured {', '.join(sorted({r['machine'].get('date', '?') for r in runs}))} "
           f"({_machine(runs[0]['machine']).split(' on ', 1)[-1]}). Cells: next-token KL vs `full` / greedy agreement. "
           "Budgets count sink + window + selected keys per query head.", ""]
    for length in sorted({r["length"] for r in rows}):
        table = []
        for policy in policies:
            cells = [policy]
            for budget in budgets:
                hit = [r for r in rows if r["length"] == length and r["policy"] == policy and r["budget"] == budget]
                # later result files (sorted by name) supersede earlier rows of the same case
                cells.append(f"{hit[-1]['kl']:.4f} / {hit[-1]['greedy_agreement']:.2f}" if hit else "-")
            table.append(cells)
        out += [f"**{length} tokens**", "", _table(["policy"] + [f"budget {b}" for b in budgets], table), ""]
    out += [f"Note: {n}." for n in notes] + ([""] if notes else [])
    latest = {(r["policy"], r["length"], r["budget"]): r for r in rows}  # later files supersede
    attn = [[r["policy"], str(r["length"]), r["budget"], f"{r['attn_rel_err']:.3f}", f"{r['recall']:.3f}", f"{r['mass']:.3f}"]
            for r in sorted(latest.values(), key=lambda r: (r["length"], policies.index(r["policy"])))
            if r["budget"] == "5%"]
    if attn:
        out += ["Attention level at the 5% budget (exact history; mean over steps, layers, heads):", "",
                _table(["policy", "tokens", "budget", "output rel. error", "top-k recall", "attention mass"], attn), ""]
    return "\n".join(out)


def decode() -> str:
    runs = _load("bench_decode*.json")
    if not runs:
        return "### Decode latency\n\nNot run yet (`python benchmarks/bench_decode.py`).\n"
    run = runs[0]
    for run_ in runs:
        for r in run_["rows"]:
            r.setdefault("threads", run_["machine"].get("torch_threads"))
            r["date"] = run_["machine"].get("date", "?")
            r["file"] = run_["_file"]
    rows = sorted((r for run_ in runs for r in run_["rows"]), key=lambda r: (r["tokens"], r["threads"], r["policy"] != "full"))
    for r in rows:  # older files name the policy "retrieval" and the index in a field
        if r["policy"] == "retrieval" and r.get("index"):
            r["policy"] = f"retrieval-{r['index']}"
        # rows measured before group_rank existed ranked GQA groups by summed logits
        if r["policy"].startswith("retrieval") and "group_rank" not in r and not r["policy"].endswith("-logits"):
            r["policy"] += "-logits"
    table = [[str(r["tokens"]), str(r["threads"]), r["policy"], f"{r['attention_ms']:.2f}", f"{r['attention_speedup']:.1f}x",
              f"{r['step_ms']:.2f}", f"{r['step_over_floor']:.2f}", f"{r['first_step_s']:.1f}", f"{r['resident_mib']:.2f}",
              f"{r['host_mib']:.0f}", f"{r['index_mib']:.0f}", f"{r['date']} ({r['file']})"] for r in rows]
    return "\n".join([
        "### Decode latency (`bench_decode.py`)", "",
        f"stories260K, batch 1, CPU; caches filled by a {run['prefill']}; measured on "
        f"{_machine(run['machine']).split(' on ', 1)[-1].split(',')[0]} (2 cores; the date of each row in the table). "
        f"Floor = a one-token forward with attention replaced by a no-op (measured in each run: "
        f"{min(r['floor_ms'] for r in rows):.2f}-{max(r['floor_ms'] for r in rows):.2f} ms). The first step builds the indexes (one-off, not in the per-token times). "
        f"`retrieval-<index>` retrieves the top-{run['rows'][0]['topk']} keys per kv head with that index "
        "(`cluster`: segment-clustered lists scanned best first; `graph`: the attention-aware graph, whose beam "
        "returns fewer than k keys at this k, so it also reads fewer rows; see the large-k index table); "
        "without a suffix the GQA group is ranked by summed attention probability (`group_rank='probability'`, "
        "the default: with `graph` one search per query head, then a ranking call; with `cluster` one "
        "in-index pass per kv head, `ClusterIndex.search_group`; since 2026-12-01 (`bench_decode_1m_k` on) "
        "the whole layer step in one C++ call, `lckv._C.decode_cluster_step`), `-logits` by summed logits "
        "(one search per kv head). Attention ms/token sums, over layers, the median of the same call repeated "
        "(warm caches); step ms/token times whole model forwards, where the layers take turns. "
        "Each run measures exact and retrieval with the same thread count; runs on this shared 2-core machine "
        "vary by up to ~1.5x between runs.", "",
        _table(["cached tokens", "threads", "policy", "attention ms/token", "vs exact", "step ms/token", "step / floor",
                "first step s", "resident MiB", "host KV MiB", "index MiB", "measured (results file)"], table), ""])


def kernels() -> str:
    runs = _load("bench_kernels*.json")
    if not runs:
        return "### Kernels\n\nNot run yet (`python benchmarks/bench_kernels.py`).\n"
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
        "### Kernels (`bench_kernels.py`)", "",
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
    runs = _load("bench_index.json")
    if not runs:
        return "### Vector index\n\nNot run yet (`python benchmarks/bench_index.py`).\n"
    run = runs[0]
    meta = run["meta"]

    def num(x, spec):
        return "not reached" if x is None else format(x, spec)

    def config(t, key):  # which GraphIndex configuration gave the cell (runs since 2026-11-30)
        name = t.get(key)
        return f" ({name.replace('lckv ', '')})" if name else ""

    def ratio(t, level):
        value = t[f"qps_ratio_graph_over_hnsw_at_{level}"]
        if value is not None:
            return f"{value:.2f}x" + config(t, f"graph_config_at_{level}")
        if t[f"graph_qps_at_{level}"] is not None:
            return f"HNSW never reaches {level}"
        return "graph never reaches " + level

    table = [[t["set"] + (" (synthetic)" if t["synthetic"] else ""), str(t["n_keys"]),
              num(t["graph_min_fraction_at_recall100_095"] and 100 * t["graph_min_fraction_at_recall100_095"], ".2f")
              + config(t, "graph_config_at_min_fraction"),
              ratio(t, "0.9"), ratio(t, "0.95")] for t in run["targets"]]
    return "\n".join([
        "### Vector index (`bench_index.py`)", "",
        f"Decode queries not used for building; ground truth = exact top-{meta['k']}; {meta['search_threads']} search "
        f"thread(s), faiss in the same run ({meta['note']}). Targets: GraphIndex recall@100 >= 0.95 while scoring "
        "<= 1% of keys, and >= 4x faiss HNSW (M=32) queries/s at recall 0.9 and 0.95."
        + (f" Measured {_machine(meta['machine'])} (builds on all threads, searches as stated)." if "machine" in meta
           else " (This run's JSON predates recording the date and machine.)"), "",
        _table(["set", "keys/head", "graph: % keys scored at recall@100 0.95", "graph / HNSW QPS at 0.9",
                "at 0.95"], table), "",
        "Full sweep: `benchmarks/results/bench_index.json` and `.png` (recall vs fraction scanned, recall vs QPS).", ""])


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
        "### Vector index at large k (`bench_index_large_k.py`)", "",
        f"Real stories260K Q/K, {rows[0]['n_keys']} keys per head, 256 decode queries, 1 thread, faiss in the same run; "
        f"measured {_machine(run['machine'])}. Cells: the cheapest setting that reaches recall@k >= 0.95 "
        "(% of keys scored, queries/s).", "",
        _table(["set", "k"] + indexes, table), ""])


def render() -> str:
    return "\n".join([START, "", "## Benchmark results", "",
                      "Regenerated by `python benchmarks/render_readme.py` from `benchmarks/results/*.json`. "
                      "All numbers are CPU measurements on this project's 2-core machines; no GPU number exists.", "",
                      fidelity(), decode(), index(), index_large_k(), kernels(), END])


def main():
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + render() + tail
    else:
        text = text.rstrip("\n") + "\n\n" + render() + "\n"
    readme.write_text(text)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
