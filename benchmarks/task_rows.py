"""What the task harness (benchmarks/bench_tasks.py) and its peer runners (benchmarks/peers/, which
run in their own environments: standard library only here) must agree on: the JSONL rows (schema:
docs/tasks.md) and their keys, the budget labels, and when decoding stops."""
from __future__ import annotations

import argparse
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


def budget_label(text: str) -> str:
    """``--budgets`` entry -> canonical label: ``"256"`` (tokens) or ``"0.05"`` (fraction; ``5%`` too)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a token count, a fraction or a percentage, got {text!r}")
    if text.endswith("%") or "." in text:
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"a budget fraction must be in (0, 1], got {text!r}")
        return repr(value)
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"a budget token count must be an integer >= 1, got {text!r}")
    return str(int(value))


def eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end a greedy decode: the generation config's EOS and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    out = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        out.add(tokenizer.eos_token_id)
    return out
