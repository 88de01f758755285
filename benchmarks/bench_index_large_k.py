"""Vector indexes at large k: the top-k a decode budget of a few percent of a long context asks for.

A retrieval policy at budget b of an n-token context needs the top ~b keys per kv head, hundreds to
thousands, not the top 100 of ANN benchmarks. This measures, on REAL stories260K post-RoPE Q/K
(HotpotQA text, the 32K-token capture of lckv.research.eval_data, two (layer, kv head) sets), for
k in {512, 2048}: recall@k of lckv's attention-aware GraphIndex (ef sweep), lckv's ClusterIndex
(scan sweep) and faiss HNSW32 / IVF (inner product) against the exact top-k, with the fraction of
keys scored and queries/s (one batched call, 1 thread, best of 3), all in the same run.

    python benchmarks/bench_index_large_k.py           # ~5 min on 2 cores (first capture ~2 min)
    python benchmarks/bench_index_large_k.py --quick   # one set, k = 512, short sweeps

Writes benchmarks/results/bench_index_large_k.{json,png}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Table, machine, write_json  # noqa: E402

from lckv.index import ClusterIndex, FaissIndex, GraphIndex  # noqa: E402
from lckv.research.eval_data import exact_topk, real_sets, recall_at  # noqa: E402


def sweeps(quick: bool):
    return [
        ("lckv Graph", lambda d, es: GraphIndex(d).build(es.keys, es.build_queries),
         [{"ef": e} for e in ((128, 1024) if quick else (128, 512, 1024, 2048))]),
        ("lckv Cluster", lambda d, es: ClusterIndex(d).build(es.keys),
         [{"scan": s} for s in ((2.0, 4.0) if quick else (1.5, 2.0, 3.0, 4.0))]),
        ("faiss HNSW32", lambda d, es: FaissIndex(d, "hnsw", M=32).build(es.keys),
         [{"ef": e} for e in ((1024, 4096) if quick else (1024, 2048, 4096, 8192))]),
        ("faiss IVF", lambda d, es: FaissIndex(d, "ivf").build(es.keys),
         [{"nprobe": p} for p in ((32, 128) if quick else (16, 32, 64, 128, 256))]),
    ]


def qps(index, queries, k, params, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        index.search(queries, k, **params)
        best = min(best, time.perf_counter() - t0)
    return queries.shape[0] / best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache-dir", default=os.environ.get("LCKV_QK_CACHE", str(Path.home() / ".cache" / "lckv")))
    args = parser.parse_args(argv)
    import faiss

    from lckv._extension import compiled

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    compiled("set_index_threads").set_index_threads(1)
    heads = ((1, 0),) if args.quick else ((1, 0), (3, 2))
    ks = (512,) if args.quick else (512, 2048)
    sets = real_sets(32768, heads=heads, n_decode_positions=256, cache_dir=args.cache_dir)
    table = Table([("set", "set", "s", 18), ("k", "k", "d", 5), ("index", "index", "s", 13), ("params", "params", "s", 14),
                   ("recall", "recall@k", ".3f", 0), ("fraction_scored", "% scored", ".2%", 9), ("qps", "QPS", ".0f", 7)])
    rows = []
    for es in sets:
        queries = es.decode_queries
        for name, make, params_list in sweeps(args.quick):
            index = make(es.keys.shape[1], es)
            for k in ks:
                _, truth = exact_topk(es.keys, queries, k)
                for params in params_list:
                    _, ids, n_scored = index.search(queries, k, **params)
                    row = dict(set=es.name, synthetic=es.synthetic, n_keys=es.keys.shape[0], k=k, index=name,
                               params=str(params), recall=recall_at(ids, truth, k),
                               fraction_scored=float(n_scored.double().mean()) / es.keys.shape[0],
                               qps=qps(index, queries, k, params))
                    rows.append(row)
                    table.row(row)
    write_json("bench_index_large_k", {"benchmark": "index_large_k", "machine": machine(), "threads": 1,
                                       "source": sets[0].source, "quick": args.quick, "rows": rows})
    plot(rows, RESULTS / "bench_index_large_k.png")
    print(f"wrote {RESULTS / 'bench_index_large_k.json'} and .png")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["set"], r["k"]) for r in rows})
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 4), squeeze=False)
    for ax, (name, k) in zip(axes[0], cases):
        for index in dict.fromkeys(r["index"] for r in rows):
            sel = sorted((r for r in rows if r["set"] == name and r["k"] == k and r["index"] == index),
                         key=lambda r: r["fraction_scored"])
            ax.plot([100 * r["fraction_scored"] for r in sel], [r["recall"] for r in sel], marker="o", label=index)
        ax.set(title=f"{name}, k={k}", xlabel="% of keys scored", ylabel=f"recall@{k}", xscale="log", ylim=(0, 1.02))
    axes[0][0].legend(fontsize=8)
    fig.suptitle("real stories260K Q/K (32K keys per head): recall at large k (CPU, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
