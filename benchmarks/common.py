"""Shared benchmark plumbing: machine description, JSON + PNG output, aligned tables."""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from lckv.cache import LckvCache

RESULTS = Path(__file__).resolve().parent / "results"

#: retrieval-augmented prefill settings of the ``retrieval`` policy compared by bench_tasks (as
#: ``retrieval-prefill<suffix>``) and bench_prefill (as mode ``retrieval<suffix>``): suffix -> settings
_BLOCKS = {"prefill": "retrieval", "prefill_exact_tail": 0, "prefill_per_query": 0}
PREFILL_VARIANTS = {"": {"prefill": "retrieval"},  # the policy's defaults (= "-ph4t256")
                    # block selection alone: each block of 64 queries attends its mean query's rows
                    "-blocks": _BLOCKS,
                    # blocks of 16 prefill queries per selection (default 64): docs/prefill.md's quality study
                    "-b16": {**_BLOCKS, "prefill_block": 16},
                    # each prefill query adds its own top 16 rows to its block's (docs/prefill.md)
                    "-pq16": {**_BLOCKS, "prefill_per_query": 16, "prefill_per_head": False},
                    # the prompt's last 256 positions attend the whole store exactly (docs/prefill.md)
                    "-t256": {**_BLOCKS, "prefill_exact_tail": 256},
                    # and 4 rows per query head per query (docs/prefill.md's best KL at 16K)
                    "-ph4t256": {"prefill": "retrieval", "prefill_exact_tail": 256, "prefill_per_query": 4,
                                 "prefill_per_head": True},
                    # the defaults with a quarter of each block's per-query searches: those least
                    # aligned with the block's mean query (docs/prefill.md)
                    "-s25": {"prefill": "retrieval", "prefill_query_share": 0.25}}


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return path


class Table:
    """Prints aligned rows as they are measured. columns: (key, header, format spec, width)."""

    def __init__(self, columns: list[tuple[str, str, str, int]]):
        self.columns = columns
        print("  ".join(h.rjust(max(w, len(h))) for _, h, _, w in columns), flush=True)

    def row(self, row: dict) -> None:
        cells = [format(row[k], spec) if row.get(k) is not None else "-" for k, _, spec, _ in self.columns]
        print("  ".join(c.rjust(max(w, len(h))) for c, (_, h, _, w) in zip(cells, self.columns)), flush=True)


def with_committed_rows(rows: list[dict], summary: Path, key) -> list[dict]:
    """``rows`` (from a run's JSONL) plus the rows of the committed summary JSON ``summary`` whose
    ``key(row)`` is not among them: a fresh clone has no JSONL, and its rows must not be lost."""
    if not summary.exists():
        return rows
    have = {key(r) for r in rows}
    return [r for r in json.loads(summary.read_text())["rows"] if key(r) not in have] + rows


def load_model(name: str, max_positions: int | None = None):
    """``(model, tokenizer)`` for a registry model name (``lckv.models``) or ``stories260K``."""
    if name.lower() == "stories260k":
        from lckv.research.data import stories260k_paths
        from lckv.research.llama2c import load

        return load(*stories260k_paths(), max_position_embeddings=max_positions or 512)
    from lckv.models import load

    return load(name)


def progress(items, desc: str):
    """A tqdm bar over ``items`` (stderr), so long runs show where they are."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True)


def prefill_in_chunks(model, ids: torch.Tensor, cache, chunk: int, keep: int = 1, desc: str | None = None):
    """Feeds ``ids`` ``[1, n]`` to ``model`` on ``cache`` in chunks of ``chunk`` tokens (no grad,
    a progress bar with ``desc``); returns the logits of the prompt's last ``keep`` positions
    ``[1, keep, vocab]`` and the seconds the prefill took."""
    length = ids.shape[1]
    starts = range(0, length, chunk)
    if isinstance(cache, LckvCache):  # what generate() does: the prompt's last positions are known
        cache.prompt_end = cache.get_seq_length() + length
    start = time.perf_counter()
    with torch.no_grad():
        for lo in progress(starts, desc) if desc else starts:
            last = min(keep, length - lo) if lo + chunk >= length else 1
            logits = model(ids[:, lo:lo + chunk], past_key_values=cache, use_cache=True, logits_to_keep=last).logits
    return logits, time.perf_counter() - start


def greedy(model, cache, first_token: int, max_new_tokens: int, eos=()) -> tuple[list[int], list[float]]:
    """Greedy decoding on ``cache`` after ``first_token`` until a token of ``eos`` or
    ``max_new_tokens`` tokens; returns the tokens (the first one given) and the seconds of each
    decode step."""
    device = next(model.parameters()).device
    tokens, steps = [first_token], []
    with torch.no_grad():
        while len(tokens) < max_new_tokens and tokens[-1] not in eos:
            start = time.perf_counter()
            logits = model(torch.tensor([[tokens[-1]]], device=device), past_key_values=cache, use_cache=True).logits
            tokens.append(int(logits[0, -1].argmax()))
            steps.append(time.perf_counter() - start)
    return tokens, steps
