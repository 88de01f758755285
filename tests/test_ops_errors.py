"""Bad inputs to the public ops raise specific errors on every backend (never garbage)."""
import pytest
import torch

from lckv import extension_available
from lckv.ops import (
    attention_with_lse, flat_topk_scores, merge_attention_states, quest_page_scores, sink_window_attention_with_lse,
    sparse_attention_with_lse,
)

BACKENDS = ["reference", "triton"] + (["cpu"] if extension_available() else [])


def _sparse():
    q = torch.randn(1, 4, 16)
    k = torch.randn(1, 2, 10, 16)
    return q, k, torch.randn_like(k), torch.randint(0, 10, (1, 2, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_attention_bad_inputs(backend):
    q, k, v, idx = _sparse()
    cases = [
        ((q.int(), k, v, idx), TypeError, "q must have dtype"),
        ((q, k, v, idx.int()), TypeError, "indices must have dtype"),
        ((q[0], k, v, idx), ValueError, "q must have shape"),
        ((q, k, v[..., :8], idx), ValueError, "k and v must have the same shape"),
        ((torch.randn(1, 3, 16), k, v, idx), ValueError, "multiple of kv_heads"),
        ((q, k, v, idx[:, :1]), ValueError, "indices must have shape"),
        ((q, k, v, torch.where(idx == idx[0, 0, 0], 10, idx)), ValueError, "indices must lie in"),
        ((q, k, v, torch.where(idx == idx[0, 0, 0], -2, idx)), ValueError, "indices must lie in"),
        ((q, k.to("meta"), v, idx), ValueError, "one device"),
        ((q.clone().fill_(float("nan")), k, v, idx), ValueError, "q contains NaN"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            sparse_attention_with_lse(*args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_attention_nan_in_a_read_row(backend):
    q, k, v, idx = _sparse()
    k[0, 1, idx[0, 1, 2]] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparse_attention_with_lse(q, k, v, idx, backend=backend)
    v[0, 0, idx[0, 0, 0]] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        sparse_attention_with_lse(q, torch.randn_like(k), v, idx, backend=backend)
    # an inf in a read K row whose score is -inf (weight 0 in a plain softmax) is refused too
    positive_q = q.abs() + 0.1
    minus_inf_k = torch.randn_like(k)
    minus_inf_k[0, 0, idx[0, 0, 1]] = float("-inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        sparse_attention_with_lse(positive_q, minus_inf_k, torch.randn_like(v), idx, backend=backend)
    # the fast backends check only what they read (the reference scans all of k and v): a
    # non-finite row that no index selects is never read, so the call succeeds and is finite
    if backend != "reference":
        clean_k, clean_v = torch.randn_like(k), torch.randn_like(v)
        last = k.shape[2] - 1
        clean_k[:, :, last] = float("nan")
        clean_v[:, :, last] = float("inf")
        out, lse = sparse_attention_with_lse(q, clean_k, clean_v, idx.clamp(max=last - 1), backend=backend)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sink_window_bad_inputs(backend):
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match="sink must be a non-negative int"):
        sink_window_attention_with_lse(q, k, k, -1, 4, backend=backend)
    with pytest.raises(ValueError, match="window must be a non-negative int"):
        sink_window_attention_with_lse(q, k, k, 1, 2.5, backend=backend)
    with pytest.raises(ValueError, match="must not exceed kv_len"):
        sink_window_attention_with_lse(torch.randn(1, 4, 11, 16), k, k, 1, 4, backend=backend)
    with pytest.raises(ValueError, match="k must have batch"):
        sink_window_attention_with_lse(q, k[..., :8], k[..., :8], 1, 4, backend=backend)
    bad = k.clone()
    bad[0, 0, 9, 3] = float("nan")  # the newest key: inside every window
    with pytest.raises(ValueError, match="NaN"):
        sink_window_attention_with_lse(q, bad, k, 1, 4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_bad_inputs(backend):
    out, lse = torch.randn(2, 3, 8), torch.randn(2, 3)
    with pytest.raises(ValueError, match="lse_b must have shape"):
        merge_attention_states(out, lse, out, lse[:, :2], backend=backend)
    with pytest.raises(ValueError, match="out_a and out_b must share one shape"):
        merge_attention_states(out, lse, out[..., :4], lse, backend=backend)
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        merge_attention_states(out, lse, out, torch.full_like(lse, float("nan")), backend=backend)
    with pytest.raises(TypeError, match="must have dtype"):
        merge_attention_states(out.double(), lse, out, lse, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_scoring_bad_inputs(backend):
    q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 30, 16)
    page = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="page_min and page_max must have one shape"):
        quest_page_scores(q, page, page[:, :, :2], backend=backend)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        quest_page_scores(torch.randn(1, 3, 16), page, page, backend=backend)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        flat_topk_scores(q, k, 0, backend=backend)
    with pytest.raises(ValueError, match="k must have batch"):
        flat_topk_scores(q, k[..., :8], 3, backend=backend)
    with pytest.raises(ValueError, match="k contains NaN"):
        flat_topk_scores(q, k.clone().fill_(float("nan")), 3, backend=backend)


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if extension_available() else []))
@pytest.mark.parametrize("scale,error", [(float("nan"), ValueError), (float("inf"), ValueError), ("0.5", TypeError),
                                         ([1.0], TypeError), (True, TypeError)])
def test_bad_scale_is_refused_by_name(backend, scale, error):
    """A NaN/inf scale gave NaN outputs (or a "k or v contains NaN" error blaming the cache), a
    string a pybind "incompatible function arguments" (found by benchmarks/fuzz.py)."""
    q, k, v, idx = _sparse()
    with pytest.raises(error, match="scale must be"):
        sparse_attention_with_lse(q, k, v, idx, scale=scale, backend=backend)
    q4 = torch.randn(1, 4, 3, 16)
    with pytest.raises(error, match="scale must be"):
        sink_window_attention_with_lse(q4, k, v, 2, 4, scale=scale, backend=backend)
    with pytest.raises(error, match="scale must be"):
        attention_with_lse(q4, k, v, scale=scale)
    out, _ = sparse_attention_with_lse(q, k, v, idx, scale=torch.tensor(0.25), backend=backend)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sink_window_refuses_minus_inf_in_a_row_it_reads(backend):
    """A -inf key makes its score -inf and its row drop out with a finite result, which the result
    check cannot see: the rows read are checked (found by benchmarks/fuzz.py)."""
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 10, 16)
    for row, read in [(0, True), (9, True), (4, False)]:  # sink 1, window 3: rows 0 and 5..9 are read
        bad = k.clone()
        bad[0, 1, row, 5] = float("-inf")
        if read:
            with pytest.raises(ValueError, match="k contains NaN or inf"):
                sink_window_attention_with_lse(q, bad, k, 1, 3, backend=backend)
        elif backend != "reference":  # the reference scans every row
            out, _ = sink_window_attention_with_lse(q, bad, k, 1, 3, backend=backend)
            want, _ = sink_window_attention_with_lse(q, k, k, 1, 3, backend=backend)
            assert torch.equal(out, want)


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if extension_available() else []))
def test_sink_window_empty_batch(backend):
    """batch 0 on the cpu backend raised "stack expects a non-empty TensorList" (benchmarks/fuzz.py)."""
    out, lse = sink_window_attention_with_lse(torch.randn(0, 4, 2, 8), torch.randn(0, 2, 5, 8),
                                              torch.randn(0, 2, 5, 8), 1, 3, backend=backend)
    assert out.shape == (0, 4, 2, 8) and lse.shape == (0, 4, 2)


@pytest.mark.parametrize("top_k", [2**40, 2**62, 2**63])
def test_flat_topk_huge_k_is_refused_by_name(top_k):
    """The padded outputs of a huge top_k cannot be allocated: ValueError naming top_k, not an
    allocator RuntimeError or an overflow deep in F.pad (benchmarks/fuzz.py)."""
    q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 30, 16)
    with pytest.raises(ValueError, match="top_k=.* is too large"):
        flat_topk_scores(q, k, top_k, backend="reference")
    scores, ids = flat_topk_scores(q, k, 100_000, backend="reference")
    assert scores.shape == (1, 4, 100_000) and torch.isneginf(scores[..., 30:]).all() and (ids[..., 30:] == -1).all()
    want = flat_topk_scores(q, k, 30, backend="reference")
    assert torch.equal(scores[..., :30], want[0]) and torch.equal(ids[..., :30], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_head_dim_is_refused_by_name(backend):
    """head_dim 0 raised ZeroDivisionError computing the default scale (benchmarks/fuzz.py)."""
    q, k = torch.randn(1, 2, 3, 0), torch.randn(1, 1, 5, 0)
    with pytest.raises(ValueError, match="q must have head_dim >= 1"):
        sink_window_attention_with_lse(q, k, k, 1, 2, backend=backend)
    with pytest.raises(ValueError, match="q must have head_dim >= 1"):
        sparse_attention_with_lse(q[:, :, 0], k, k, torch.zeros(1, 1, 2, dtype=torch.long), backend=backend)
    if backend != "triton":
        with pytest.raises(ValueError, match="q must have head_dim >= 1"):
            attention_with_lse(q, k, k, backend="reference" if backend == "reference" else "auto")


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_zero_head_dim_gives_the_merged_lse(backend):
    """The C++ kernel left lse unwritten for head_dim 0 (garbage like 2e15; benchmarks/fuzz.py)."""
    lse_a = torch.tensor([0.5, float("-inf"), 1.0])
    lse_b = torch.tensor([1.5, float("-inf"), float("-inf")])
    out, lse = merge_attention_states(torch.randn(3, 0), lse_a, torch.randn(3, 0), lse_b, backend=backend)
    assert out.shape == (3, 0)
    torch.testing.assert_close(lse, torch.logaddexp(lse_a, lse_b), rtol=1e-6, atol=1e-6)


def test_meta_tensors_are_refused_by_name():
    """Every tensor on the meta device (shapes, no data) reached a value check and raised
    "Tensor.item() cannot be called on meta tensors" (benchmarks/fuzz.py)."""
    q, k, v, idx = (t.to("meta") for t in _sparse())
    with pytest.raises(ValueError, match="indices is a meta tensor"):  # the ids are checked first
        sparse_attention_with_lse(q, k, v, idx, backend="reference")
    with pytest.raises(ValueError, match="q is a meta tensor"):
        attention_with_lse(q.unsqueeze(2), k, v)
    out, lse = torch.randn(2, 3, 8, device="meta"), torch.randn(2, 3, device="meta")
    with pytest.raises(ValueError, match="lse_a is a meta tensor"):
        merge_attention_states(out, lse, out, lse)
    with pytest.raises(ValueError, match="q is a meta tensor"):
        flat_topk_scores(q, k, 3)
