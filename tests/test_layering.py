"""The package's layering (issue 18): the inference core never imports the research tools, no
policy reaches the compiled extension except through lckv.ops, the cache does not import the
policies package. Checked in a fresh interpreter (imports are cached per process)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lckv"
CORE = ["lckv", "lckv.cache", "lckv.attention", "lckv.policies", "lckv.ops", "lckv.index", "lckv.integrations.hf",
        "lckv.backends", "lckv.models"]


def _modules_after_import(names):
    code = ("import json, sys\n" + "".join(f"import {n}\n" for n in names)
            + "print(json.dumps(sorted(m for m in sys.modules if m.startswith('lckv'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _imports(path: Path) -> set[str]:
    """Every module a source file imports (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_inference_core_never_imports_the_research_tools():
    loaded = _modules_after_import(CORE)
    assert "lckv.policies.retrieval" in loaded  # the check sees the real import graph
    assert not [m for m in loaded if m.startswith("lckv.research")]


def test_no_policy_imports_the_extension():
    for path in (PACKAGE / "policies").glob("*.py"):
        assert not [m for m in _imports(path) if m.startswith("lckv._extension") or m.startswith("lckv._C")], path.name


def test_the_cache_depends_on_a_protocol_not_on_the_policies():
    """cache.py and the lckv modules it imports (the package's __init__ aside, which exports the
    policies) never import lckv.policies; the protocol it does import is lckv.layer_view."""
    seen, todo = set(), ["lckv.cache"]
    while todo:
        name = todo.pop()
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        if name in seen or not path.exists():
            continue
        seen.add(name)
        imported = _imports(path)
        assert not [m for m in imported if m.startswith("lckv.policies")], name
        todo.extend(m for m in imported if m.startswith("lckv."))
    assert "lckv.layer_view" in seen
