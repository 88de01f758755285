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
