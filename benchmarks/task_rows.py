"""The JSONL rows of the task harness (schema: docs/tasks.md), shared by benchmarks/bench_tasks.py
and the peer runners (benchmarks/peers/, which run in their own environments: standard library
only here)."""
from __future__ import annotations

import json
from pathlib import Path

#: what identifies a row: a resumed run skips the keys already in the file
KEY = ("model", "task", "length", "method", "budget", "sample")


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL results file; a line cut by an interruption is dropped from the file."""
    if not path.exists():
        return []
    rows, lines = [], path.read_text().splitlines(keepends=True)
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if len(rows) < len(lines) or (lines and not lines[-1].endswith("\n")):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY)
