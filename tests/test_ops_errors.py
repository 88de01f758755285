"""Bad inputs to the public ops raise specific errors on every backend (never garbage)."""
import pytest
import torch

from lckv import extension_available
from lckv.ops import (
    flat_topk_scores, merge_attention_states, quest_page_scores, sink_window_attention_with_lse,
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
