"""The backend table: auto choice, explicit override, clear refusals, and the ops' signatures."""
import inspect

import pytest
import torch

import lckv.backends as backends
import lckv.ops as ops
import lckv.reference as reference
from lckv import extension_available
from lckv.backends import TABLE, BackendUnavailableError, available_backends, resolve_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_every_table_op_is_public_with_the_reference_signature():
    for op in TABLE:
        fast, oracle = getattr(ops, op), getattr(reference, op)
        fast_params = list(inspect.signature(fast).parameters.values())
        assert fast_params[-1].name == "backend" and fast_params[-1].default == "auto"
        assert [(p.name, p.default) for p in fast_params[:-1]] == [
            (p.name, p.default) for p in inspect.signature(oracle).parameters.values()], op
        assert op in ops.__all__ and op in reference.__all__


def test_auto_on_cpu_prefers_the_extension_and_never_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = "cpu" if extension_available() else "reference"
    assert resolve_backend("sparse_attention_with_lse", CPU) == expected
    assert resolve_backend("merge_attention_states", CPU) == expected
    assert resolve_backend("flat_topk_scores", CPU) == "reference"  # no C++ scorer: torch is the CPU path
    assert "triton" not in available_backends("sparse_attention_with_lse", CPU, explicit=False)


HOST_INDEX_OPS = {"decode_cluster_step", "offload_rows"}  # their indexes live in host memory


def test_auto_on_cuda_picks_triton_then_the_cuda_kernels():
    cuda_bound = backends._cuda_extension_has("gather_rows")  # an extension built against CUDA torch
    for op, row in TABLE.items():
        if op in HOST_INDEX_OPS:
            with pytest.raises(BackendUnavailableError, match=f"op '{op}' has no backend for device 'cuda'"):
                resolve_backend(op, CUDA)
            continue
        want = ("triton" if "cuda" in row.get("triton", ()) else
                "cuda" if "cuda" in row.get("cuda", ()) and cuda_bound else "reference")
        assert resolve_backend(op, CUDA) == want, op


def test_missing_extension_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(backends, "_cpu_extension_has", lambda op: False)
    assert resolve_backend("sparse_attention_with_lse", CPU) == "reference"
    with pytest.raises(BackendUnavailableError, match="not built") as info:
        resolve_backend("sparse_attention_with_lse", CPU, "cpu")
    message = str(info.value)
    assert "sparse_attention_with_lse" in message and "'cpu'" in message and "reference" in message


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("sparse_attention_with_lse", CPU, "triton") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET") as info:
        resolve_backend("quest_page_scores", CPU, "triton")
    assert "quest_page_scores" in str(info.value) and "['reference']" in str(info.value)


def test_refusals_name_op_device_and_alternatives():
    with pytest.raises(BackendUnavailableError, match="backend must be 'auto' or one of"):
        resolve_backend("sparse_attention_with_lse", CPU, "fast")
    with pytest.raises(BackendUnavailableError, match="unknown op"):
        resolve_backend("attn2", CPU)
    with pytest.raises(BackendUnavailableError, match="cannot run on backend 'cuda' for device 'cuda'"):
        resolve_backend("sparse_attention_with_lse", CUDA, "cuda")  # no hand-written CUDA kernel for this op
    with pytest.raises(BackendUnavailableError, match="cannot run on backend 'cuda' for device 'cpu' .*take CUDA tensors"):
        resolve_backend("flat_topk_scores", CPU, "cuda")
    with pytest.raises(BackendUnavailableError, match="cannot run on backend 'cpu' for device 'cuda'"):
        resolve_backend("merge_attention_states", CUDA, "cpu")
    assert issubclass(BackendUnavailableError, ValueError)


def test_an_op_refuses_through_the_table():
    q, k = torch.randn(1, 2, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(BackendUnavailableError, match="flat_topk_scores"):
        ops.flat_topk_scores(q, k, 2, backend="cpu")
    with pytest.raises(BackendUnavailableError, match="take CUDA tensors"):  # CPU tensors, CUDA kernels
        ops.flat_topk_scores(q, k, 2, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="gather_rows.*take CUDA tensors"):
        ops.gather_rows(k, torch.zeros(1, 2, 3, dtype=torch.int64), backend="cuda")


def test_reference_backend_serves_everything_everywhere():
    for op in TABLE:
        for device in (CPU, CUDA, torch.device("meta")):
            assert ("reference" in available_backends(op, device)) == (op not in HOST_INDEX_OPS or device == CPU), op


def test_every_listed_backend_serves_some_op():
    served = {backend for row in TABLE.values() for backend, devices in row.items() if devices}
    assert served == set(backends.BACKENDS)
    assert "sparse_attention_with_lse" in backends.describe_table()
