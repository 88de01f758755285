"""The compiled extension lckv._C: built from setup.py, checked against the reference ops, and
optional at import time."""
import subprocess
import sys
import textwrap

import pytest
import torch

from lckv._extension import compiled, extension_available
from lckv.reference import merge_attention_states


def _states(shape, dtype):
    out_a, out_b = torch.randn(*shape).to(dtype), torch.randn(*shape).to(dtype)
    lse_a, lse_b = torch.randn(*shape[:-1]) * 5, torch.randn(*shape[:-1]) * 5
    empty_a = torch.rand(shape[:-1]) < 0.2
    empty_b = torch.rand(shape[:-1]) < 0.2
    lse_a[empty_a] = float("-inf")
    lse_b[empty_b] = float("-inf")
    return out_a, lse_a, out_b, lse_b


def test_extension_is_built():
    assert extension_available(), "lckv._C did not import: run `pip install -e .`"


def test_sparse_attention_simd_path_per_dtype():
    path = compiled("sparse_attention_with_lse").sparse_attention_simd_path
    paths = {dtype: path(dtype) for dtype in ("float32", "float16", "bfloat16")}
    assert paths["float32"] == path() and paths["float16"] == paths["float32"]
    # bf16 may add the AVX512_BF16 dot product on top of the same register path, nothing else
    assert paths["bfloat16"] in (paths["float32"], paths["float32"] + " + avx512bf16 dot")
    with pytest.raises(ValueError, match="dtype must be"):
        path("int8")


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 4, 59), (2, 7, 128), (5, 1, 4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_merge_matches_reference(shape, dtype):
    C = compiled("merge_attention_states")
    args = _states(shape, dtype)
    out, lse = C.merge_attention_states(*args)
    ref_out, ref_lse = merge_attention_states(*args)
    assert out.dtype == dtype and lse.dtype == torch.float32
    # elementwise op computed in fp32 by both: identical up to fp32 rounding, then one output rounding
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-6 if dtype == torch.float32 else 0,
                               rtol=2e-6 if dtype == torch.float32 else torch.finfo(dtype).eps)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=2e-6)
    both_empty = torch.isneginf(args[1]) & torch.isneginf(args[3])
    assert torch.isneginf(lse[both_empty]).all() and not out[both_empty].abs().any()


def test_cpu_merge_rejects_bad_input():
    C = compiled("merge_attention_states")
    out, lse = torch.randn(2, 4, 8), torch.randn(2, 4)
    with pytest.raises(ValueError, match="out_b must have the shape of out_a"):
        C.merge_attention_states(out, lse, out[:, :3], lse)
    with pytest.raises(ValueError, match="lse_b must have shape"):
        C.merge_attention_states(out, lse, out, lse[:, :3])
    with pytest.raises(TypeError, match="out_a must be float32, float16 or bfloat16"):
        C.merge_attention_states(out.double(), lse, out, lse)
    with pytest.raises(ValueError, match="must be a CPU tensor"):
        C.merge_attention_states(out.to("meta"), lse, out, lse)


def run_without_extension(body: str) -> str:
    """Runs ``body`` in a fresh interpreter where importing lckv._C fails; returns its stdout."""
    script = textwrap.dedent("""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "lckv._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
    """) + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_works_without_extension():
    """With lckv._C unimportable, `import lckv` and the pure-PyTorch paths still work, and a compiled
    op fails with a message saying what is missing."""
    out = run_without_extension("""
        import torch, lckv
        from lckv.reference import merge_attention_states
        assert not lckv.extension_available()
        x = torch.randn(2, 8); l = torch.randn(2)
        merge_attention_states(x, l, x, l)
        try:
            lckv._extension.compiled("merge_attention_states")
        except lckv.ExtensionNotAvailableError as e:
            print("ERR", e)
    """)
    assert "ERR lckv op 'merge_attention_states' needs the compiled extension lckv._C" in out
    assert "pip install -e ." in out


def test_index_defaults_need_the_extension_only_when_read():
    """lckv.index imports without lckv._C; reading an index's defaults or making a C++ index then
    raises ExtensionNotAvailableError."""
    out = run_without_extension("""
        import lckv
        from lckv.index import ClusterIndex, GraphIndex
        for use in (lambda: ClusterIndex.build_defaults, lambda: GraphIndex.search_params, lambda: ClusterIndex(8),
                    lambda: GraphIndex(8)):
            try:
                use()
            except lckv.ExtensionNotAvailableError as e:
                print("ERR", str(e).split(" needs")[0])
    """)
    assert out.split("\n")[:4] == ["ERR lckv op 'index_defaults'"] * 4
