"""A small sample of the property-based fuzzing of lckv's public surface (targets in
benchmarks/fuzz_targets.py; the full run is ``python benchmarks/fuzz.py --cases 10000``):
``CASES`` generated inputs per target from a fresh seed, printed with every failure.
``LCKV_FUZZ_SEED=<seed>`` replays a run.

The targets run in one worker process (``fuzz.run_isolated``), as in the full run: a case that
kills the process (a native crash, a hang) fails its target's test with its input instead of
taking the whole test session down."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import fuzz  # noqa: E402
import fuzz_targets  # noqa: E402

CASES = 25
SEED = int(os.environ.get("LCKV_FUZZ_SEED") or int.from_bytes(os.urandom(4), "little"))
SHOWN = 3  # failures printed per target


@pytest.fixture(scope="module")
def reports():
    names = list(fuzz_targets.TARGETS)
    return {r.name: r for r in fuzz.run_isolated(names, {name: CASES for name in names}, SEED)}


def test_every_public_op_has_a_target():
    import lckv.ops

    assert set(lckv.ops.__all__) <= set(fuzz_targets.TARGETS)


@pytest.mark.parametrize("name", list(fuzz_targets.TARGETS))
def test_fuzz_sample(name, reports):
    report = reports[name]
    if report.failures:
        lines = [f"{name}: {len(report.failures)} of {report.cases} cases failed (seed {SEED}); replay with "
                 f"LCKV_FUZZ_SEED={SEED} pytest tests/test_fuzz.py -k {name}, or "
                 f"python benchmarks/fuzz.py --seed {SEED} --targets {name} --cases {CASES}"]
        for failure in report.failures[:SHOWN]:
            lines.append(f"case {failure.case}: {failure.message}")
            lines += [f"    {label} = {value}" for label, value in failure.trace.items()]
        pytest.fail("\n".join(lines), pytrace=False)
    assert report.cases > 0
