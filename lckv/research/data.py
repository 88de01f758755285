"""Locates the real data shared beside the repository (``../shared/data``).

The data are third-party files that are never copied into the repository: the stories260K
llama2.c model with its tokenizer, and HotpotQA rows. Set ``LCKV_DATA`` to point elsewhere.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


class SharedDataNotFoundError(FileNotFoundError):
    """A file of the shared data directory is missing."""


def shared_data_dir() -> Path:
    """``$LCKV_DATA`` if set, else ``<repo>/../shared/data`` (may not exist)."""
    env = os.environ.get("LCKV_DATA")
    return Path(env) if env else _REPO_ROOT.parent / "shared" / "data"


def shared_data_file(*parts: str) -> Path:
    """Path of a file under the shared data directory; raises if it is absent."""
    path = shared_data_dir().joinpath(*parts)
    if not path.is_file():
        raise SharedDataNotFoundError(
            f"shared data file {path} not found: expected the real data beside the repository "
            "(../shared/data) or under $LCKV_DATA"
        )
    return path


def stories260k_paths() -> tuple[Path, Path]:
    """(checkpoint, tokenizer) of the stories260K llama2.c model."""
    return shared_data_file("stories260K", "stories260K.bin"), shared_data_file("stories260K", "tok512.bin")


def hotpotqa_path() -> Path:
    """The 100 HotpotQA train rows (original layout)."""
    return shared_data_file("hotpotqa", "hotpotqa_train_100.json")


def hotpotqa_paragraphs(path: str | Path | None = None) -> list[str]:
    """Every context paragraph of the HotpotQA rows as ``"title: sentences"``, in file order."""
    rows = json.loads(Path(path or hotpotqa_path()).read_text())
    return [f"{title}: {' '.join(sentences)}" for row in rows for title, sentences in row["context"]]
