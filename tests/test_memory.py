"""lckv.memory.empty_host and lckv._C.empty_huge: huge-page host tensors for offloaded K/V."""
import mmap
import os
from pathlib import Path

import pytest
import torch

from kernel_oracles import fresh_generator
from lckv import extension_available
from lckv.cache import HostKVStore
from lckv.memory import HUGE_PAGE_MIN_BYTES, empty_host, huge_page_advised, huge_page_fraction

needs_extension = pytest.mark.skipif(not extension_available(), reason="lckv._C is not built (pip install -e .)")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
TWO_MIB = 2 << 20


def _thp_mode():
    try:
        return THP.read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _rss_bytes():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
@pytest.mark.parametrize("shape", [(3, 5), (0, 4), (), (1, 2, HUGE_PAGE_MIN_BYTES // 256, 64)])
def test_shape_dtype_and_round_trip(shape, dtype):
    gen, seed = fresh_generator()
    t = empty_host(shape, dtype)
    assert t.shape == torch.Size(shape) and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    data = (torch.randn(shape, generator=gen) * 100).to(dtype)
    t.copy_(data)
    assert torch.equal(t, data), f"seed {seed}"
    t[...] = 0  # writable in place
    assert not t.any()


@needs_extension
def test_large_tensors_are_huge_page_aligned_and_advised():
    t = empty_host([4, HUGE_PAGE_MIN_BYTES // 4 // 128 + 3, 128], torch.float32)  # a bit above the threshold
    assert t.data_ptr() % TWO_MIB == 0
    small = empty_host([1024], torch.float32)
    assert small.nbytes < HUGE_PAGE_MIN_BYTES
    # the control: a fresh anonymous mapping (torch.empty may reuse heap memory that an earlier
    # posix_memalign'd and advised block left advised: glibc serves blocks below its dynamic mmap
    # threshold, up to 32 MiB, from the heap, so its flags depend on the process's history)
    region = mmap.mmap(-1, t.nbytes)
    plain = torch.frombuffer(region, dtype=torch.uint8)
    if _thp_mode() not in ("madvise", "always"):
        pytest.skip(f"transparent huge pages are {_thp_mode()!r} here")
    assert huge_page_advised(t) is True, "the large tensor's mapping lacks MADV_HUGEPAGE (VmFlags hg)"
    if _thp_mode() == "madvise":
        assert huge_page_advised(plain) is False, "torch.empty's mapping should not carry the advice"


@needs_extension
def test_large_tensors_are_backed_by_huge_pages_when_the_kernel_has_them():
    if _thp_mode() not in ("madvise", "always"):
        pytest.skip(f"transparent huge pages are {_thp_mode()!r} here")
    fractions = []
    for _ in range(3):  # the kernel backs a fault with a huge page only if it finds a free 2 MiB block
        t = empty_host([4, HUGE_PAGE_MIN_BYTES // 4 // 128 + 3, 128], torch.float32)
        t.fill_(1.0)  # first touch
        fractions.append(huge_page_fraction(t))
        if fractions[-1] is not None and fractions[-1] > 0.5:
            return
    assert any(f is not None for f in fractions), "smaps gave no Rss/AnonHugePages for the mapping"
    pytest.skip(f"advised mappings got {fractions} of huge pages in 3 tries: memory too fragmented "
                "for 2 MiB blocks now (see /proc/buddyinfo); the advice itself is checked above")


@needs_extension
def test_memory_is_returned_to_the_system_when_tensors_die():
    size = 64 << 20
    before = _rss_bytes()
    for i in range(40):  # 2.5 GB touched in total; a leak would keep all of it resident
        t = empty_host([size // 4], torch.float32)
        t.fill_(float(i))
        assert t[-1].item() == float(i)
        del t
    grown = _rss_bytes() - before
    assert grown < 4 * size, f"resident memory grew by {grown / 2**20:.0f} MiB over 40 freed allocations"


@needs_extension
def test_extension_allocator_checks_its_arguments():
    from lckv._extension import compiled

    empty_huge = compiled("empty_huge").empty_huge
    t = empty_huge([2, 3], torch.bfloat16)
    assert t.shape == (2, 3) and t.dtype == torch.bfloat16 and t.data_ptr() % TWO_MIB == 0
    with pytest.raises(ValueError, match="non-negative"):
        empty_huge([4, -1], torch.float32)
    with pytest.raises(ValueError, match="overflows"):
        empty_huge([1 << 40, 1 << 40], torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        empty_huge([4], "float32")


def test_empty_host_rejects_bad_arguments():
    with pytest.raises(ValueError, match="non-negative"):
        empty_host([2, -3], torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        empty_host([2], "float16")
    with pytest.raises(TypeError, match="shape"):
        empty_host([2.0, 3], torch.float16)
    with pytest.raises(TypeError, match="shape"):
        empty_host(7, torch.float16)


def test_falls_back_to_plain_pages_when_the_advice_fails(monkeypatch):
    import lckv._extension

    calls = []

    class Refusing:
        @staticmethod
        def empty_huge(shape, dtype):
            calls.append(shape)
            raise RuntimeError("empty_huge: madvise(MADV_HUGEPAGE) failed: Operation not permitted")

    monkeypatch.setattr("lckv.memory.extension_available", lambda: True)
    monkeypatch.setattr(lckv._extension, "compiled", lambda name: Refusing)
    t = empty_host([HUGE_PAGE_MIN_BYTES // 2], torch.float16)
    assert calls == [[HUGE_PAGE_MIN_BYTES // 2]]
    assert t.shape == (HUGE_PAGE_MIN_BYTES // 2,) and t.dtype == torch.float16
    t.fill_(2.0)
    assert bool((t == 2.0).all())


@needs_extension
def test_host_kv_store_allocates_through_empty_host():
    gen, seed = fresh_generator()
    store = HostKVStore(1, 8, 128, torch.float16, capacity=HUGE_PAGE_MIN_BYTES // (8 * 128 * 2))
    assert store._k.data_ptr() % TWO_MIB == 0 and store._v.data_ptr() % TWO_MIB == 0
    k, v = torch.randn(2, 1, 8, 37, 128, generator=gen).half()
    store.append(k, v)
    assert torch.equal(store.keys, k) and torch.equal(store.values, v), f"seed {seed}"


_TRIM_SCRIPT = """
import os, torch, lckv.memory as memory
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
big = torch.ones(4 << 20)  # 16 MiB, mmapped; freeing it raises glibc's mmap threshold past 8 MiB
del big
buffers = [torch.ones(2 << 20) for _ in range(40)]  # 8 MiB each, now from the heap
del buffers[::2]  # 160 MiB free, but inside the heap
before = rss()
print(memory.release_free_memory(), before - rss())
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_release_free_memory_returns_freed_heap_pages():
    """Buffers freed inside the heap stay in the RSS until a trim hands their pages back (a fresh
    process, so the allocator's state is known)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _TRIM_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ran, released = out.stdout.split()
    if ran == "False":
        pytest.skip("the C library has no malloc_trim (not glibc)")
    assert int(released) >= 120 << 20  # of the 160 MiB freed


@pytest.mark.parametrize("enabled", [True, False])
def test_calls_that_prefill_or_grow_a_store_release_free_memory(monkeypatch, enabled):
    """A bound model trims the heap after a call that added more than one token per row or grew a
    host store, not after a decode step that did neither, and never with RELEASE_AFTER_CALLS off."""
    import lckv
    from lckv import memory
    from tiny_models import tiny_decoder

    calls = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(memory, "RELEASE_AFTER_CALLS", enabled)
    torch.manual_seed(0)
    model = tiny_decoder("llama", kv_heads=2, max_positions=512)
    lckv.enable(model, "full", sink=4, window=32)
    try:
        cache = lckv.new_cache(model)
        ids = torch.randint(3, 97, (1, 100))
        released, expected = [], []
        with torch.no_grad():
            model(ids[:, :40], past_key_values=cache, use_cache=True)  # a prompt
            released.append(len(calls))
            expected.append(enabled)
            for t in range(40, 100):  # decode steps: the stores grow at a few of them
                capacity, before = cache.layers[0].store.capacity, len(calls)
                model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                grew = cache.layers[0].store.capacity != capacity
                released.append(len(calls) - before)
                expected.append(enabled and grew)
    finally:
        lckv.disable(model)
    assert released == [int(e) for e in expected]
    assert 1 <= sum(expected[1:]) < 20 or not enabled  # some decode steps grew the stores, most did not
