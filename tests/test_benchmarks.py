"""The benchmark harnesses verify themselves before they measure (`--check`)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.usefixtures("stories260k_files")
def test_fidelity_harness_check():
    """At budget >= context every policy must reproduce exact attention in the harness."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fidelity.py"), "--check",
                           "--model", "stories260K"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # one table row per policy of the harness, and the check counted every one of them
    rows = [line for line in done.stdout.splitlines() if re.match(r"\s+300\s+400\s+400\s", line)]
    found = re.search(r"(\d+) policies reproduce exact attention", done.stdout)
    assert found and len(rows) >= 6 and int(found.group(1)) == len(rows), done.stdout[-3000:]


@pytest.mark.usefixtures("stories260k_files")
@pytest.mark.parametrize("script,verdict", [
    ("bench_prefill.py", "--check: covering retrieval prefill equals exact"),
    ("bench_prefill_quality.py", "--check: covering prefill_select equals exact"),
])
def test_prefill_harness_checks(script, verdict):
    """A covering prefill_select makes the retrieval prefill exact: each prefill harness (the
    speed benchmark and the settings sweep) must see KL ~ 0 against its exact prefill."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--check"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert verdict in done.stdout, done.stdout[-3000:]


@pytest.mark.usefixtures("stories260k_files")
def test_prefill_quality_keeps_the_committed_rows(tmp_path):
    """bench_prefill_quality's summary JSON is its durable record: a rerun without the JSONL (a
    fresh clone) keeps the variants it holds as they are and adds the new ones."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_prefill_quality

    common = ["--model", "stories260K", "--length", "512", "--chunk", "128", "--keep", "32", "--results", str(tmp_path)]
    first = bench_prefill_quality.main(common + ["--variants", "a:prefill_select=64"])
    name = "bench_prefill_quality_stories260k_512"
    (tmp_path / f"{name}.jsonl").unlink()
    second = bench_prefill_quality.main(common + ["--variants", "a:prefill_select=64", "b:prefill_select=32"])
    assert [r["variant"] for r in second["rows"]] == ["a", "b"]
    assert second["rows"][0] == first["rows"][0]  # kept as measured, not rerun
    assert json.loads((tmp_path / f"{name}.json").read_text())["rows"] == second["rows"]


def test_prefill_benchmark_keeps_the_committed_rows(tmp_path):
    """bench_prefill's summary JSON is its durable record: on a fresh clone (no JSONL, no logits)
    a summary keeps every committed row with its KL and agreement, and a run would skip them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_prefill

    committed = json.loads((ROOT / "benchmarks" / "results" / "bench_prefill_stories260k.json").read_text())
    (tmp_path / "bench_prefill_stories260k.json").write_text(json.dumps(committed))
    payload = bench_prefill.main(["--model", "stories260K", "--results", str(tmp_path), "--summary-only"])
    key = lambda r: (r["length"], r["mode"])  # noqa: E731
    assert sorted(map(key, payload["rows"])) == sorted(map(key, committed["rows"])) and committed["rows"]
    assert sorted(payload["rows"], key=key) == sorted(committed["rows"], key=key)


@pytest.mark.usefixtures("stories260k_files")
def test_prefill_benchmark_runs_a_named_variant(tmp_path):
    """A ``retrieval-<variant>`` mode enables the retrieval policy with that variant's settings
    (read back from the enabled policy) and is compared with exact prefill by its KL."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_prefill
    from common import PREFILL_VARIANTS

    payload = bench_prefill.main(["--model", "stories260K", "--lengths", "2048", "--chunk", "512", "--decode", "4",
                                  "--prefill-select", "64", "--modes", "exact", "retrieval-ph4t256",
                                  "--results", str(tmp_path)])
    row = next(r for r in payload["rows"] if r["mode"] == "retrieval-ph4t256")
    for name, value in PREFILL_VARIANTS["-ph4t256"].items():
        assert row[name] == value, name
    assert row["prefill_select"] == 64 and row["kl"] > -1e-6 and 0 <= row["agreement"] <= 1  # KL: fp32 sums


def test_gpu_check_script_runs_dry(tmp_path):
    """benchmarks/gpu_check.py's code path on the CPU (reference and cpu backends, tiny sizes): every
    op of its table checked and passing, the decode-step row written; gpu_check.sh parses."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    payload = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert payload["all_ok"] and {r["op"] for r in payload["correctness"]} == set(gpu_check.CHECKS)
    assert any(r["kernel"].startswith("decode step") and r["ms"] > 0 for r in payload["speed"])
    assert (tmp_path / "gpu_check_dry_run.json").exists()
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0


def test_task_table_shows_gold_recall_only_where_measured(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render_results

    def entry(method, budget, score, gold=None):
        e = {"task": "hotpotqa", "length": 8192, "method": method, "budget": budget, "n": 3, "score": score,
             "drop_pct": None, "budget_tokens": 400.0, "first_step_s": 0.1, "decode_tokens_per_s": 5.0}
        return e if gold is None else {**e, "gold_recall": gold}

    machine = {"date": "2026-12-07", "cpu": "cpu", "torch_threads": 2}
    runs = {"bench_tasks_m_gold": [entry("full", None, 0.5), entry("quest", "0.05", 0.25, 0.3125)],
            "bench_tasks_m_old": [entry("full", None, 0.5), entry("quest", "0.05", 0.25)]}
    for name, summary in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"benchmark": "tasks", "model": "m", "machine": machine,
                                                           "summary": summary}))
    monkeypatch.setattr(render_results, "RESULTS", tmp_path)
    text = render_results.tasks()
    sections = {sec.split("`")[0]: sec for sec in text.split("**m, 8192 tokens** (`")[1:]}
    gold, old = sections["bench_tasks_m_gold"], sections["bench_tasks_m_old"]
    header = [line for line in gold.splitlines() if line.startswith("| method")][0]
    assert "gold rec" in header
    quest = [line for line in gold.splitlines() if line.startswith("| quest")][0].split("|")
    assert quest[header.split("|").index(" gold rec ")].strip() == "0.312"
    assert "gold rec" not in [line for line in old.splitlines() if line.startswith("| method")][0]
