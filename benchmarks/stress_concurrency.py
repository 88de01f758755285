"""Concurrency stress of every index type: ``--threads`` (8) threads search one index while another
thread adds keys to it in batches; every search is checked against an exact oracle over the keys
present when it ran.

"Present": the keys of every add that returned before the search started, and possibly those of
adds that returned while it ran (the snapshot lies between two batch boundaries). Per search: ids
must lie in ``[0, size at search end)``, no id may repeat within a result row, and, for the indexes
that are exact in the setting used, the scores must be the oracle's top-k over one of those
snapshots (ties aside) with each id's true score; the approximate ones report recall@k against the
best of those snapshots, which must reach the level the index's tests document for the same data
(the ``documented`` column). One row per index type: searches, inserts, index states the searches
saw, invalid ids, duplicates, exact mismatches, recall, throughput; the rows go to
benchmarks/results/stress_concurrency.json (``--results``). Exits 1 if any check fails.

    python benchmarks/stress_concurrency.py                    # 1,000,000 operations over the index types
    python benchmarks/stress_concurrency.py --ops 100000 --cases FlatIndex,GraphIndex

tests/test_concurrency.py runs the same cases at a few thousand operations each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lckv.index import ClusterIndex, FaissIndex, FlatIndex, GraphIndex, IVFIndex  # noqa: E402
from lckv.index.base import Index  # noqa: E402
from lckv.research.eval_data import exact_topk, shifted_data, topic_stream  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    """One index type under stress: built on ``data(seed)``'s first ``n_build`` keys, the rest added."""

    name: str
    make: Callable[[int], Index]          # dim -> an empty index
    data: Callable[[int], tuple]          # seed -> (keys [n, dim], build queries or None, query pool [p, dim])
    n_build: int
    k: int
    params: dict                          # search keywords
    recall: float | None                  # recall@k the searches must reach; 1.0: exact (scores checked)
    documented: str                       # where that level comes from

    @property
    def exact(self) -> bool:
        return self.recall == 1.0


def _streamed(seed):
    """test_streamed_keys_search_like_one_build's data: 6000 keys of head_dim 32, 64 queries."""
    keys, _, queries = shifted_data(6000, 0, 64, 32, seed)
    return keys, None, queries


def _added_after_build(seed):
    """test_keys_added_after_build_are_found's data: 12000 keys of head_dim 16, 1500 build queries, 100 queries."""
    return shifted_data(12000, 1500, 100, 16, seed)


def _topics(seed):
    """test_recall_at_large_k's data: 20000 keys of head_dim 16 in topic runs, 64 queries."""
    keys, queries = topic_stream(20000, 64, 16, seed)
    return keys, None, queries


EVERY_LIST = 16  # n_lists of the IVF cases; probing all of them makes the search exact
CASES = [
    Case("FlatIndex", lambda d: FlatIndex(d), _streamed, 1024, 10, {}, 1.0, "exact"),
    Case("IVFIndex", lambda d: IVFIndex(d, n_lists=EVERY_LIST), _streamed, 1024, 10, {"nprobe": EVERY_LIST}, 1.0,
         "test_index.py::test_streamed_keys_search_like_one_build (every list probed: exact)"),
    Case("GraphIndex", lambda d: GraphIndex(d), _added_after_build, 8000, 10, {"ef": 64}, 0.9,
         "test_index.py::test_keys_added_after_build_are_found"),
    Case("ClusterIndex", lambda d: ClusterIndex(d), _topics, 12000, 50, {"scan": 16.0}, 0.95,
         "test_cluster_index.py::test_recall_at_large_k (k 50, scan 16)"),
    Case("FaissIndex-flat", lambda d: FaissIndex(d, "flat"), _streamed, 1024, 10, {}, 1.0, "exact"),
    Case("FaissIndex-ivf", lambda d: FaissIndex(d, "ivf", n_lists=EVERY_LIST), _streamed, 1024, 10,
         {"nprobe": EVERY_LIST}, 1.0, "every list probed: exact"),
    Case("FaissIndex-hnsw", lambda d: FaissIndex(d, "hnsw"), _streamed, 1024, 10, {"ef": 64}, None,
         "none documented: ids and duplicates only"),
]


def run_case(case: Case, seed: int, searches: int, adds: int, threads: int = 8, per_search: int = 2,
             on_progress: Callable[[int], None] | None = None) -> dict:
    """Builds ``case``'s index, then ``threads`` threads run ``searches`` searches of ``per_search``
    queries (drawn from the query pool) while one thread adds the remaining keys in ``adds`` batches,
    spread over the searches so that searches start in every state of the index (and others run
    while each add does). Returns the checks of :func:`check_searches` plus the counts and times.
    ``on_progress(operations done)`` is called from this thread every 0.2 s."""
    keys, build_queries, pool = case.data(seed)
    n_keys, dim = keys.shape
    adds = min(adds, n_keys - case.n_build)
    if not 0 < adds < searches:
        raise ValueError(f"adds must be at least 1 and fewer than searches ({searches}), got {adds}")
    bounds = [case.n_build + (n_keys - case.n_build) * j // adds for j in range(adds + 1)]
    index = case.make(dim).build(keys[:case.n_build], build_queries)
    ids = torch.empty(searches, per_search, case.k, dtype=torch.int64)
    scores = torch.empty(searches, per_search, case.k)
    picks = torch.empty(searches, per_search, dtype=torch.int64)
    before = torch.empty(searches, dtype=torch.int64)  # keys committed when each search started
    after = torch.empty(searches, dtype=torch.int64)   # the index's size when it returned
    # Search slot s belongs to phase s * (adds + 1) // searches and starts once `phase` adds are
    # committed; add j starts once a search of phase j has read the count (so every state is searched).
    committed, done, errors = [case.n_build], [0] * threads, []
    phase_open = [threading.Event() for _ in range(adds + 1)]     # its adds are committed
    phase_searched = [threading.Event() for _ in range(adds + 1)]  # a search of it has started
    phase_open[0].set()

    def search(t):
        g = torch.Generator().manual_seed(seed + 1 + t)
        try:
            for slot in range(t, searches, threads):
                phase = slot * (adds + 1) // searches
                phase_open[phase].wait()
                picks[slot] = torch.randint(pool.shape[0], (per_search,), generator=g)
                before[slot] = committed[0]
                phase_searched[phase].set()
                scores[slot], ids[slot], _ = index.search(pool[picks[slot]], case.k, **case.params)
                after[slot] = index.size
                done[t] += 1
        except Exception as exc:  # noqa: BLE001  (reported below, with the thread)
            errors.append(f"search thread {t}: {exc!r}")

    def insert():
        try:
            for j in range(adds):
                while not phase_searched[j].wait(0.1):
                    if errors:
                        return
                index.add(keys[bounds[j]:bounds[j + 1]])
                committed[0] = bounds[j + 1]
                phase_open[j + 1].set()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"insert thread: {exc!r}")
        finally:  # the searches go on (over the keys added so far) if the adds stopped
            for event in phase_open:
                event.set()

    workers = [threading.Thread(target=search, args=(t,)) for t in range(threads)]
    workers.append(threading.Thread(target=insert))
    start = time.perf_counter()
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        workers[-1].join(0.2)
        if on_progress:
            on_progress(sum(done) + bounds.index(committed[0]))
    seconds = time.perf_counter() - start
    for w in workers:
        w.join()
    result = {"index": case.name, "seed": seed, "searches": searches, "inserts": adds, "keys_built": case.n_build,
              "keys_end": index.size, "k": case.k, "params": case.params, "errors": errors,
              "states_seen": len(set(before.tolist())),
              "overlapping_adds": int((after > before).sum()), "seconds": seconds,
              "searches_per_s": searches / seconds, "documented": case.documented, "recall_required": case.recall}
    result.update(check_searches(keys, pool, bounds, case, picks, ids, scores, before, after))
    result["passed"] = (not errors and result["keys_end"] == n_keys and result["invalid_ids"] == 0
                        and result["duplicates"] == 0 and (not case.exact or result["mismatches"] == 0)
                        and (case.recall is None or result["recall"] >= case.recall))
    return result


def _oracle(keys, pool, bounds, k):
    """Exact top-k scores and ids of every pool query over ``keys[:b]`` for each boundary b:
    ``[len(bounds), pool, k]`` each, the top-k of one boundary merged with the next batch's."""
    top_scores, top_ids = exact_topk(keys[:bounds[0]], pool, k)
    all_scores, all_ids = [top_scores], [top_ids]
    for lo, hi in zip(bounds, bounds[1:]):
        candidates = torch.cat([top_scores, pool @ keys[lo:hi].T], 1)
        candidate_ids = torch.cat([top_ids, torch.arange(lo, hi).expand(pool.shape[0], -1)], 1)
        top_scores, where = candidates.topk(k, dim=1)
        top_ids = candidate_ids.gather(1, where)
        all_scores.append(top_scores)
        all_ids.append(top_ids)
    return torch.stack(all_scores), torch.stack(all_ids)


def check_searches(keys, pool, bounds, case, picks, ids, scores, before, after, chunk=4096) -> dict:
    """The per-search checks of the module docstring, over all searches: ``invalid_ids`` (ids outside
    ``[0, size at search end)``), ``duplicates`` (ids that repeat within a row), ``mismatches``
    (exact cases: searches whose scores are not the oracle's over any snapshot they could have seen)
    and ``recall`` (mean over searches of recall@k against the best such snapshot)."""
    oracle_scores, oracle_ids = _oracle(keys, pool, bounds, case.k)
    boundary = torch.tensor(bounds)
    invalid = duplicates = mismatches = 0
    recall_sum = 0.0
    for lo in range(0, ids.shape[0], chunk):
        i, s, p = ids[lo:lo + chunk], scores[lo:lo + chunk], picks[lo:lo + chunk]
        started, ended = before[lo:lo + chunk], after[lo:lo + chunk]
        invalid += int(((i < 0) | (i >= ended[:, None, None])).sum())
        ordered = i.sort(-1).values
        duplicates += int(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).sum())
        first = torch.searchsorted(boundary, started)                # the snapshot when the search started
        last = torch.searchsorted(boundary, ended, right=True) - 1   # the last one it can have seen
        true_scores = (pool[p][:, :, None, :] * keys[i.clamp(0, keys.shape[0] - 1)]).sum(-1)
        best_recall = torch.full((i.shape[0],), -1.0)
        exact_match = torch.zeros(i.shape[0], dtype=torch.bool)
        for step in range(int((last - first).max()) + 1):
            snapshot = (first + step).clamp(max=len(bounds) - 1)
            possible = first + step <= last
            want_ids, want_scores = oracle_ids[snapshot[:, None], p], oracle_scores[snapshot[:, None], p]
            hits = (i[..., :, None] == want_ids[..., None, :]).any(-1).float().mean((1, 2))
            best_recall = torch.where(possible, torch.maximum(best_recall, hits), best_recall)
            inside = ((i >= 0) & (i < boundary[snapshot][:, None, None])).all(-1).all(-1)
            close = torch.isclose(s, want_scores, rtol=1e-5, atol=1e-4).all(-1).all(-1)
            own = torch.isclose(s, true_scores, rtol=1e-5, atol=1e-4).all(-1).all(-1)
            exact_match |= possible & inside & close & own
        recall_sum += float(best_recall.sum())
        mismatches += int((~exact_match).sum())
    return {"invalid_ids": invalid, "duplicates": duplicates, "recall": recall_sum / ids.shape[0],
            "mismatches": mismatches if case.exact else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=1_000_000, help="searches plus inserts over all cases")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated case names")
    parser.add_argument("--threads", type=int, default=8, help="search threads (one more thread inserts)")
    parser.add_argument("--per-search", type=int, default=2, help="queries per search call")
    parser.add_argument("--seed", type=int, default=None, help="data seed (default: fresh, printed)")
    parser.add_argument("--results", default=str(RESULTS / "stress_concurrency.json"), help="JSON output path")
    args = parser.parse_args(argv)
    from common import Table, machine  # benchmarks/common.py, next to this script
    from tqdm import tqdm

    by_name = {c.name: c for c in CASES}
    unknown = [name for name in args.cases.split(",") if name not in by_name]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; known: {sorted(by_name)}")
    cases = [by_name[name] for name in args.cases.split(",")]
    seed = int.from_bytes(os.urandom(4), "little") if args.seed is None else args.seed
    print(f"seed {seed}; {args.threads} search threads + 1 insert thread; {args.ops} operations over "
          f"{len(cases)} index types")
    table = Table([("index", "index", "s", 16), ("k", "k", "d", 2), ("searches", "searches", "d", 8),
                   ("inserts", "inserts", "d", 7),
                   ("states_seen", "states", "d", 6), ("invalid_ids", "invalid", "d", 7),
                   ("duplicates", "dups", "d", 4), ("mismatches", "mismatch", "d", 8), ("recall", "recall@k", ".4f", 8),
                   ("recall_required", "needed", ".2f", 6), ("searches_per_s", "search/s", ".0f", 8),
                   ("seconds", "s", ".1f", 6), ("passed", "ok", "", 4)])
    rows, start = [], time.perf_counter()
    for n, case in enumerate(cases):
        per_case = args.ops // len(cases) + (n < args.ops % len(cases))
        adds = max(1, per_case // 500)
        with tqdm(total=per_case, desc=case.name, leave=False, dynamic_ncols=True) as bar:
            def show(n, bar=bar):
                bar.n = n
                bar.refresh()
            row = run_case(case, seed, per_case - adds, adds, args.threads, args.per_search, show)
        table.row({**row, "passed": "yes" if row["passed"] else "NO"})
        for error in row["errors"][:3]:
            print("  ", error)
        rows.append(row)
    total = time.perf_counter() - start
    ops = sum(r["searches"] + r["inserts"] for r in rows)
    print(f"{ops} operations in {total:.0f} s; {'all checks passed' if all(r['passed'] for r in rows) else 'FAILED'}")
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "seed": seed, "threads": args.threads,
                                "per_search": args.per_search, "operations": ops, "seconds": total, "rows": rows},
                               indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
