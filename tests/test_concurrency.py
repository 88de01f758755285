"""Concurrent use of the indexes (the contract in lckv.index.base, "Threads"): 8 threads search every
index type while another thread adds keys, each search checked against an exact oracle over the keys
present when it ran (benchmarks/stress_concurrency.py's cases, at a few thousand operations each);
concurrent first adds; the reader-writer lock's rules."""
import os
import threading

import pytest
import torch

from benchmarks.stress_concurrency import CASES, run_case
from lckv.index import FlatIndex, GraphIndex
from lckv.index.base import ReadWriteLock

pytest.importorskip("lckv._C")


def fresh_seed():
    return int.from_bytes(os.urandom(4), "little")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_search_while_adding(case):
    """8 search threads x 250 searches of 2 queries, 40 adds spread over them: every id valid, no
    duplicate in a row, exact cases exact (ties aside) over a snapshot the search could have seen,
    approximate cases at their documented recall@k (``case.documented``)."""
    seed = fresh_seed()
    adds = 40
    result = run_case(case, seed, searches=2000, adds=adds, threads=8)
    where = f"{case.name}, seed {seed}: {result}"
    assert not result["errors"], where
    assert result["keys_end"] == case.data(seed)[0].shape[0], where
    assert result["states_seen"] == adds + 1, where  # searches started in every state of the index
    assert result["invalid_ids"] == 0, where
    assert result["duplicates"] == 0, where
    if case.exact:
        assert result["mismatches"] == 0, where
    if case.recall is not None:
        assert result["recall"] >= case.recall, where


@pytest.mark.parametrize("make", [lambda: FlatIndex(16), lambda: GraphIndex(16)], ids=["flat", "graph"])
def test_concurrent_first_adds_keep_every_key(make):
    """Two threads make the first add of a C++ index at once: its core is made once and holds both
    batches (with add() unguarded, both threads made a core and one batch was lost, in each of 10
    runs of this test)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    for trial in range(100):
        index, start = make(), threading.Barrier(2)
        batches = [torch.randn(40, 16, generator=g) for _ in range(2)]

        def add(keys, index=index, start=start):
            start.wait()
            index.add(keys)

        threads = [threading.Thread(target=add, args=(keys,)) for keys in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert index.size == 80, f"trial {trial}, seed {seed}"


def test_read_write_lock_rules():
    """Readers share; a writer waits for them; a waiting writer holds back a new reader."""
    lock = ReadWriteLock()
    events = {name: threading.Event() for name in ("writer_in", "late_reader_in", "release_writer")}

    def writer():
        with lock.exclusive:
            events["writer_in"].set()
            events["release_writer"].wait(5)

    def late_reader():
        with lock.shared:
            events["late_reader_in"].set()

    with lock.shared:
        with lock.shared:  # a second reader alongside
            pass
        w = threading.Thread(target=writer)
        w.start()
        assert not events["writer_in"].wait(0.2), "a writer got in beside a reader"
        r = threading.Thread(target=late_reader)
        r.start()
        assert not events["late_reader_in"].wait(0.2), "a new reader overtook the waiting writer"
    assert events["writer_in"].wait(5), "the writer did not get in once the reader left"
    assert not events["late_reader_in"].wait(0.2), "a reader got in beside the writer"
    events["release_writer"].set()
    assert events["late_reader_in"].wait(5)
    w.join()
    r.join()
