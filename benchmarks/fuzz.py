"""Property-based fuzzing of lckv's public surface: every op, index, policy config, the cache, the
rewards and scorers, and the file loaders (targets in ``benchmarks/fuzz_targets.py``).

    python benchmarks/fuzz.py --cases 10000 --seed 0
    python benchmarks/fuzz.py --cases 300 --seed 0 --targets kmeans index_flat

The cases are spread evenly over the chosen targets, and each target's inputs come from its own
seed (derived from ``--seed`` and its name): a run is reproducible, and a target run alone with
the same ``--seed`` and its share of ``--cases`` sees the same inputs. Prints a progress line
per target, a table (target, cases run, allowed errors, failures) and every distinct failure with
the input that made it; writes ``fuzz.json`` into ``--results``; exits 1 on any failure.

The targets run in a worker process. A case that kills it (a signal: SIGSEGV, SIGFPE, ...; or a
hang past ``fuzz_targets.HANG_S``) is reported as a failure with its input, and a new worker
carries on from that target with the case skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from fuzz_targets import CRASH_GUARD, TARGETS, Failure, TargetReport, run_target  # noqa: E402

EXAMPLES_PER_FAILURE = 2  # reproducing inputs printed per distinct failure
MAX_CRASHES = 10  # per target; then the rest of its cases is given up
_REPORT = "FUZZ-REPORT "


def spread(cases: int, targets: list[str]) -> dict[str, int]:
    """``cases`` split evenly over ``targets`` (the first ones take the remainder)."""
    share, extra = divmod(cases, len(targets))
    return {name: share + (i < extra) for i, name in enumerate(targets)}


def group_failures(reports) -> list[dict]:
    """Distinct failures (by target and message without its numbers), in order of first occurrence."""
    groups: dict[tuple, dict] = {}
    for report in reports:
        for failure in report.failures:
            key = (failure.target, failure.signature())
            group = groups.setdefault(key, {"target": failure.target, "message": failure.message, "count": 0,
                                            "seed": report.seed, "examples": []})
            group["count"] += 1
            if len(group["examples"]) < EXAMPLES_PER_FAILURE:
                group["examples"].append({"case": failure.case, "message": failure.message, "input": failure.trace})
    return list(groups.values())


def table(reports) -> str:
    width = max(len("target"), *(len(r.name) for r in reports))
    lines = [f"{'target':{width}s} {'cases':>7s} {'allowed errors':>15s} {'failures':>9s} {'seconds':>8s}"]
    for r in reports:
        lines.append(f"{r.name:{width}s} {r.cases:7d} {r.refused:15d} {len(r.failures):9d} {r.seconds:8.1f}")
    lines.append(f"{'total':{width}s} {sum(r.cases for r in reports):7d} {sum(r.refused for r in reports):15d} "
                 f"{sum(len(r.failures) for r in reports):9d} {sum(r.seconds for r in reports):8.1f}")
    return "\n".join(lines)


def format_failures(groups, seed: int, shares: dict) -> str:
    out = []
    for g in groups:
        out.append(f"\n[{g['target']}] {g['count']} case(s): {g['message']}")
        out.append(f"  reproduce: python benchmarks/fuzz.py --seed {seed} --targets {g['target']} "
                   f"--cases {shares[g['target']]}")
        for example in g["examples"]:
            out.append(f"  case {example['case']}: {example['message']}")
            for label, value in example["input"].items():
                out.append(f"      {label} = {value}")
    return "\n".join(out)


def _progress(i: int, n: int, name: str, share: int):
    def show(report):
        if report.cases % 25 == 0 or report.cases == share:
            print(f"\r[{i}/{n}] {name}: {report.cases}/{share} cases, {len(report.failures)} failures", end="",
                  file=sys.stderr, flush=True)
    return show


def worker(names, shares, seed: int, skip, crash_log: str, threads: int) -> None:
    """Runs ``names`` in this process, one report line per target on stdout (the parent reads them)."""
    import torch

    torch.set_num_threads(threads)
    CRASH_GUARD["log"], CRASH_GUARD["skip"] = crash_log, {tuple(s) for s in skip}
    reports_out = os.fdopen(os.dup(1), "w")  # the report lines; native libraries' prints go to stderr
    os.dup2(2, 1)
    for i, name in enumerate(names, 1):
        report = run_target(name, shares[name], seed, _progress(i, len(names), name, shares[name]))
        print(f"\r[{i}/{len(names)}] {name}: {report.cases} cases, {report.refused} allowed errors, "
              f"{len(report.failures)} failures, {report.seconds:.1f} s", file=sys.stderr, flush=True)
        print(_REPORT + json.dumps(dataclasses.asdict(report), default=repr), file=reports_out, flush=True)


def run_isolated(names, shares, seed: int, threads: int = 1) -> list[TargetReport]:
    """Runs the targets in worker processes, restarting after a crash with the crashed case skipped."""
    reports: dict[str, TargetReport] = {}
    crashes: dict[str, list[Failure]] = {name: [] for name in names}
    skip: list = []
    with tempfile.TemporaryDirectory(prefix="lckv-fuzz-") as tmp:
        crash_log = Path(tmp) / "current_case.json"
        while True:
            remaining = [n for n in names if n not in reports]
            if not remaining:
                break
            crash_log.unlink(missing_ok=True)
            command = [sys.executable, __file__, "--worker", json.dumps({"names": remaining, "shares": shares,
                       "seed": seed, "skip": skip, "crash_log": str(crash_log), "threads": threads})]
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            for line in proc.stdout:
                if line.startswith(_REPORT):
                    data = json.loads(line[len(_REPORT):])
                    data["failures"] = [Failure(**f) for f in data["failures"]]
                    reports[data["name"]] = TargetReport(**data)
            code = proc.wait()
            if all(n in reports for n in remaining):
                break
            current = json.loads(crash_log.read_text()) if crash_log.exists() else None
            name = current["target"] if current else next(n for n in remaining if n not in reports)
            how = f"signal {signal.Signals(-code).name}" if code < 0 else \
                f"exit status {code}: an error escaped, or a hang (stacks above)"
            print(f"\n{name}: the worker died ({how}) in case {current and current['case']}", file=sys.stderr)
            if current is None or len(crashes[name]) >= MAX_CRASHES:  # give the target up
                reason = "outside a call into lckv" if current is None else f"again after {MAX_CRASHES} crashes"
                crashes[name].append(Failure(name, f"the process died ({how}) {reason}", 0, {}))
                reports[name] = TargetReport(name, 0)
                continue
            crashes[name].append(Failure(name, f"the process died: {how}", current["case"], current["trace"]))
            skip.append((name, current["case"]))
    for name, failures in crashes.items():
        reports[name].failures = failures + reports[name].failures
    return [reports[n] for n in names]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10000, help="generated cases in total, spread over the targets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), metavar="TARGET",
                        help=f"targets to run (default: all): {', '.join(TARGETS)}")
    parser.add_argument("--results", default=str(ROOT / "results"), help="directory for fuzz.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads (default 1: the tensors are small, threads only add overhead)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        worker(job["names"], job["shares"], job["seed"], job["skip"], job["crash_log"], job["threads"])
        return 0
    names = args.targets or list(TARGETS)
    shares = spread(args.cases, names)
    started, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    reports = run_isolated(names, shares, args.seed, args.threads)
    wall, cpu_after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    groups = group_failures(reports)
    print(table(reports))
    print(f"\n{sum(r.cases for r in reports)} cases in {wall:.1f} s wall, {cpu:.1f} s CPU (seed {args.seed}); "
          f"{sum(len(r.failures) for r in reports)} failures, {len(groups)} distinct")
    if groups:
        print(format_failures(groups, args.seed, shares))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    payload = {"seed": args.seed, "cases_requested": args.cases, "threads": args.threads,
               "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
               "targets": [{"target": r.name, "target_seed": r.seed, "cases": r.cases, "allowed_errors": r.refused,
                            "failures": len(r.failures), "seconds": round(r.seconds, 2)} for r in reports],
               "failures": groups}
    (results / "fuzz.json").write_text(json.dumps(payload, indent=1, default=repr) + "\n")
    return 1 if groups else 0


if __name__ == "__main__":
    sys.exit(main())
