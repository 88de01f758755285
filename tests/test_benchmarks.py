"""The benchmark harnesses verify themselves before they measure (`--check`)."""
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
def test_prefill_harness_check():
    """A covering prefill_select makes the retrieval prefill exact: the harness must see KL ~ 0."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_prefill.py"), "--check"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--check: covering retrieval prefill equals exact" in done.stdout, done.stdout[-3000:]


@pytest.mark.usefixtures("stories260k_files")
def test_prefill_quality_harness_check():
    """The settings sweep compares against exact prefill: a covering prefill_select must score KL ~ 0."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_prefill_quality.py"), "--check"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--check: covering prefill_select equals exact" in done.stdout, done.stdout[-3000:]

