"""Vector-index benchmark: lckv's Flat / IVF / attention-aware Graph indexes against faiss
(Flat, HNSW M=32, IVF; inner product) on the same data in the same run.

Data (lckv.research.eval_data): REAL post-RoPE Q/K of stories260K (head_dim 8) on HotpotQA text, one
set per (layer, kv head), and a SYNTHETIC head_dim-128 set whose queries and keys come from
different distributions. Every index is searched with decode queries that were not used to build
it; ground truth is the exact inner-product top-100.

One row per (set, index, params): recall@10, recall@100, fraction of keys scored, queries/s
(one batched call over all decode queries, best of 3, ``--search-threads`` threads for every
index, default 1), build time (all threads) and memory.
Writes benchmarks/results/bench_index.json and .png (recall vs fraction scored, recall vs QPS).

    python benchmarks/bench_index.py            # full size: 256K keys per head (~15-20 min)
    python benchmarks/bench_index.py --quick    # 32K keys, one real head, short sweeps
    python benchmarks/bench_index.py --check    # verify outputs before timing (exits non-zero on failure)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lckv.index import ClusterIndex, FaissIndex, FlatIndex, GraphIndex, IVFIndex  # noqa: E402
from lckv.research.eval_data import exact_topk, real_sets, recall_at, synthetic_set  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
K = 100
SEARCH_THREADS = 1
ALL_THREADS = os.cpu_count() or 1


def set_threads(n):
    """Threads for lckv's OpenMP runtime and faiss's (they may be separate runtimes)."""
    import faiss

    from lckv._extension import compiled

    n = n or ALL_THREADS
    faiss.omp_set_num_threads(n)
    compiled("set_index_threads").set_index_threads(n)


def sweeps(quick: bool):
    graph_ef = [16, 32, 48, 64, 100] if quick else [16, 20, 24, 28, 32, 40, 48, 56, 64, 100, 125, 150, 175, 200, 300]
    hnsw_ef = [100, 200, 400] if quick else [100, 150, 200, 300, 400, 600, 800, 1200]
    nprobe = [4, 16, 64] if quick else [4, 8, 16, 32, 64, 128]
    return [
        ("lckv Flat", lambda d: FlatIndex(d), [{}]),
        ("lckv Graph", lambda d: GraphIndex(d), [{"ef": e} for e in graph_ef]),
        ("lckv Graph+upper", lambda d: GraphIndex(d, upper_size=None), [{"ef": e} for e in graph_ef]),
        ("lckv IVF", lambda d: IVFIndex(d), [{"nprobe": p} for p in nprobe]),
        ("lckv Cluster", lambda d: ClusterIndex(d), [{"scan": s} for s in ([1.0, 2.0, 4.0, 8.0] if quick
                                                                          else [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0])]),
        ("faiss Flat", lambda d: FaissIndex(d, "flat"), [{}]),
        ("faiss HNSW32", lambda d: FaissIndex(d, "hnsw", M=32), [{"ef": e} for e in hnsw_ef]),
        ("faiss IVF", lambda d: FaissIndex(d, "ivf"), [{"nprobe": p} for p in nprobe]),
    ]


def check(es, truth_scores, truth_ids, index, name):
    """Outputs are well formed; exact indexes match the exact top-k (ties aside)."""
    params = {key: v[0] if isinstance(v, list) else v for key, v in index.search_params.items()}
    scores, ids, n_scored = index.search(es.decode_queries, K, **params)
    n = es.keys.shape[0]
    assert scores.shape == ids.shape == (es.decode_queries.shape[0], K), f"{name}: shape {tuple(ids.shape)}"
    valid = ids >= 0
    assert bool(((ids < n) & (ids >= -1)).all()), f"{name}: id out of range"
    assert bool((scores[~valid] == float("-inf")).all()), f"{name}: padding must be -inf"
    for row in ids:
        row = row[row >= 0]
        assert row.unique().numel() == row.numel(), f"{name}: duplicate ids"
    # Scores are the inner products of the returned keys.
    got = (es.decode_queries[:, None, :] * es.keys[ids.clamp(min=0)]).sum(-1)
    assert torch.allclose(got[valid], scores[valid], rtol=1e-4, atol=1e-3 * float(truth_scores.abs().max())), f"{name}: scores"
    assert bool((n_scored > 0).all()), f"{name}: n_scored"
    if "Flat" in name:
        tol = 1e-4 * float(truth_scores.abs().max())
        assert torch.allclose(scores, truth_scores, atol=tol, rtol=1e-5), f"{name}: exact scores differ"
        mismatch = ids != truth_ids  # allowed only where scores tie within fp32 noise
        assert bool((truth_scores[mismatch] - scores[mismatch]).abs().le(tol).all()), \
            f"{name}: exact ids differ beyond ties"


def run_set(es, quick, do_check, rows):
    n, d = es.keys.shape
    print(f"\n== {es.label}: {n} keys, head_dim {d}, {es.build_queries.shape[0]} build queries, "
          f"{es.decode_queries.shape[0]} decode queries; {es.source}")
    truth_scores, truth_ids = exact_topk(es.keys, es.decode_queries, K)
    header = f"{'index':<14} {'params':<12} {'recall@10':>9} {'recall@100':>10} {'scored':>8} {'QPS':>9} {'build s':>8} {'MB':>8}"
    print(header)
    print("-" * len(header))
    for name, make, grid in sweeps(quick):
        index = make(d)
        set_threads(None)  # builds use every thread
        t0 = time.perf_counter()
        index.build(es.keys, es.build_queries)
        build_s = time.perf_counter() - t0
        set_threads(SEARCH_THREADS)
        mem_mb = index.memory_bytes() / 2**20
        if do_check:
            check(es, truth_scores, truth_ids, index, name)
        for params in grid:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                scores, ids, n_scored = index.search(es.decode_queries, K, **params)
                best = min(best, time.perf_counter() - t0)
            row = dict(set=es.name, synthetic=es.synthetic, source=es.source, n_keys=n, head_dim=d,
                       index=name, params=params,
                       recall_at_10=recall_at(ids, truth_ids, 10), recall_at_100=recall_at(ids, truth_ids, 100),
                       fraction_scored=float(n_scored.double().mean()) / n,
                       qps=es.decode_queries.shape[0] / best, build_s=build_s, memory_mb=mem_mb)
            rows.append(row)
            ptxt = ",".join(f"{k}={v}" for k, v in params.items()) or "-"
            print(f"{name:<14} {ptxt:<12} {row['recall_at_10']:>9.3f} {row['recall_at_100']:>10.3f} "
                  f"{100 * row['fraction_scored']:>7.2f}% {row['qps']:>9.0f} {build_s:>8.1f} {mem_mb:>8.1f}", flush=True)
        del index


def config_name(row):
    """e.g. "lckv Graph+upper ef=175"."""
    return " ".join([row["index"]] + [f"{k}={v}" for k, v in row["params"].items()])


def best_row(rows, set_name, index, recall):
    """The fastest row at recall@100 >= recall among the rows whose index name starts with `index`."""
    ok = [r for r in rows if r["set"] == set_name and r["index"].startswith(index) and r["recall_at_100"] >= recall]
    return max(ok, key=lambda r: r["qps"]) if ok else None


def targets(rows):
    out = []
    for set_name in dict.fromkeys(r["set"] for r in rows):
        # Both GraphIndex configurations (without and with the upper level) count: the best of them.
        graph = [r for r in rows if r["set"] == set_name and r["index"].startswith("lckv Graph")]
        hit = [r for r in graph if r["recall_at_100"] >= 0.95]
        cheapest = min(hit, key=lambda r: r["fraction_scored"]) if hit else None
        entry = dict(set=set_name, synthetic=graph[0]["synthetic"], n_keys=graph[0]["n_keys"],
                     graph_min_fraction_at_recall100_095=cheapest and cheapest["fraction_scored"],
                     graph_config_at_min_fraction=cheapest and config_name(cheapest))
        for recall in (0.9, 0.95):
            g, h = best_row(rows, set_name, "lckv Graph", recall), best_row(rows, set_name, "faiss HNSW32", recall)
            entry[f"qps_ratio_graph_over_hnsw_at_{recall}"] = (g["qps"] / h["qps"]) if g and h else None
            entry[f"graph_qps_at_{recall}"], entry[f"hnsw_qps_at_{recall}"] = g and g["qps"], h and h["qps"]
            entry[f"graph_config_at_{recall}"] = g and config_name(g)
        # every lckv index family: the fewest keys scored at recall@100 >= 0.95
        for family in ("lckv Graph", "lckv Cluster", "lckv IVF", "faiss HNSW32", "faiss IVF"):
            hit = [r for r in rows if r["set"] == set_name and r["index"].startswith(family) and r["recall_at_100"] >= 0.95]
            best = min(hit, key=lambda r: r["fraction_scored"]) if hit else None
            entry[f"min_fraction_at_recall100_095[{family}]"] = best and best["fraction_scored"]
        out.append(entry)
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 3.6 * len(sets)), squeeze=False)
    for i, set_name in enumerate(sets):
        mine = [r for r in rows if r["set"] == set_name]
        label = f"{set_name} ({'synthetic' if mine[0]['synthetic'] else 'real'}, {mine[0]['n_keys']} keys)"
        for name in dict.fromkeys(r["index"] for r in mine):
            pts = [r for r in mine if r["index"] == name]
            style = "o-" if name.startswith("lckv") else "s--"
            axes[i][0].plot([100 * r["fraction_scored"] for r in pts], [r["recall_at_100"] for r in pts], style, label=name, ms=3)
            axes[i][1].plot([r["qps"] for r in pts], [r["recall_at_100"] for r in pts], style, label=name, ms=3)
        axes[i][0].set_xscale("log")
        axes[i][1].set_xscale("log")
        axes[i][0].set_xlabel("% of keys scored")
        axes[i][1].set_xlabel("queries / s")
        for ax in axes[i]:
            ax.set_ylabel("recall@100")
            ax.set_title(label, fontsize=9)
            ax.axhline(0.95, color="grey", lw=0.5)
            ax.grid(alpha=0.3)
        axes[i][0].axvline(1.0, color="grey", lw=0.5)
    axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32K keys, one real head, short sweeps")
    parser.add_argument("--check", action="store_true", help="verify every index's outputs before timing")
    parser.add_argument("--n-keys", type=int, default=None, help="keys per head (default 262144, quick 32768)")
    parser.add_argument("--real-heads", default=None, help="layer:kv_head list, e.g. 1:0,3:2")
    parser.add_argument("--no-real", action="store_true", help="skip the real sets")
    parser.add_argument("--model", default="stories260K", help="model whose Q/K are captured (a lckv.models name)")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic head_dim-128 set")
    parser.add_argument("--cache-dir", default=os.environ.get("LCKV_QK_CACHE", str(Path.home() / ".cache" / "lckv")),
                        help="where captured real Q/K are cached (default ~/.cache/lckv or $LCKV_QK_CACHE)")
    parser.add_argument("--search-threads", type=int, default=1,
                        help="threads for searches (default 1: a shared 2-core box makes multi-thread QPS erratic)")
    parser.add_argument("--out", default=str(RESULTS / "bench_index"), help="output path without extension")
    args = parser.parse_args(argv)
    global SEARCH_THREADS
    SEARCH_THREADS = args.search_threads
    n_keys = args.n_keys or (32768 if args.quick else 262144)
    heads = args.real_heads or ("2:1" if args.quick else "1:0,3:2")
    heads = [tuple(int(x) for x in h.split(":")) for h in heads.split(",")]
    print(f"build threads: {ALL_THREADS}  search threads: {SEARCH_THREADS}  keys per head: {n_keys}  k: {K}")
    sets = [] if args.no_synthetic else [synthetic_set(n_keys=n_keys, n_build=min(65536, n_keys // 2))]
    if not args.no_real:
        try:
            sets = real_sets(n_keys, heads=heads, cache_dir=args.cache_dir, model=args.model) + sets
        except FileNotFoundError as exc:
            print(f"real data not available, skipping real sets: {exc}")
    rows = []
    for es in sets:
        run_set(es, args.quick, args.check, rows)
    summary = targets(rows)
    print("\nTargets (GraphIndex): recall@100 >= 0.95 at <= 1% scored; >= 4x faiss HNSW32 QPS at recall 0.9 / 0.95")
    for t in summary:
        frac = t["graph_min_fraction_at_recall100_095"]
        ratio = [t[f"qps_ratio_graph_over_hnsw_at_{r}"] for r in (0.9, 0.95)]
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
        print(f"  {t['set']:<22} ({'synthetic' if t['synthetic'] else 'real'}): min scored at r100>=0.95: "
              f"{'not reached' if frac is None else f'{100 * frac:.2f}%'};  QPS vs HNSW at 0.9: {fmt(ratio[0])}, at 0.95: {fmt(ratio[1])}")
        fams = [(k.split("[")[1][:-1], v) for k, v in t.items() if k.startswith("min_fraction_at_recall100_095[")]
        print("    fewest keys scored at recall@100 >= 0.95: " + ", ".join(
            f"{f} {'not reached' if v is None else f'{100 * v:.2f}%'}" for f, v in fams))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from common import machine  # benchmarks/common.py, next to this script

    meta = dict(build_threads=ALL_THREADS, search_threads=SEARCH_THREADS, k=K, quick=args.quick, n_keys=n_keys,
                note="QPS: one batched call over all decode queries, best of 3; machine shared with other jobs",
                machine=machine())
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows, targets=summary), indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
