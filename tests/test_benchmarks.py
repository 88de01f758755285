"""The benchmark harnesses verify themselves before they measure (`--check`)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.usefixtures("stories260k_files")
def test_fidelity_harness_check():
    """At budget >= context every policy must reproduce exact attention in the harness."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fidelity.py"), "--check"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "6 policies reproduce exact attention" in done.stdout
