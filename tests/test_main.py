"""The main job (python -m lckv) on the real stories260K model, and its document and error paths."""
import re

import pytest

from lckv.__main__ import FACT, main, planted_document
from lckv.research.llama2c import load_tokenizer

# greedy llama2.c continuation of the story prompt (see tests/test_llama2c.py)
STORY_CONTINUATION = "One day, she saw a big, red ball"


def _offloaded_mib(section: str) -> float:
    return float(re.search(r"KV offloaded\s+([\d.]+) MiB", section).group(1))


def test_main_on_stories260k_runs_full_and_compressed(stories260k_files, capsys):
    assert main(["--model", "stories260K", "--max-new-tokens", "80"]) == 0
    out = capsys.readouterr().out
    full = out.split("== full (sink 4, window 1024)")[1]
    full, compressed = full.split("== retrieval (sink 4, window 64, budget 64)")
    assert f"output        '{STORY_CONTINUATION}" in full
    for section in (full, compressed):
        assert re.search(r"decode\s+[\d.]+ tokens/s over steps 2-79 ", section)
    assert _offloaded_mib(full) == 0  # 32 + 80 tokens fit the window
    assert _offloaded_mib(compressed) > 0


def test_planted_document_puts_the_fact_at_a_third(stories260k_files, hotpotqa_file):
    tok = load_tokenizer(stories260k_files[1])
    paragraphs = planted_document(tok, 5000).split("\n\n")
    at = paragraphs.index(FACT)
    del paragraphs[at]
    lengths = [len(tok.encode(p, add_special_tokens=False)) for p in paragraphs]
    total = sum(lengths)
    assert total >= 5000 > total - lengths[-1]
    assert abs(sum(lengths[:at]) - total / 3) <= max(lengths) / 2
    assert FACT not in paragraphs


def test_missing_data_dir_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LCKV_DATA", str(tmp_path / "nowhere"))
    assert main(["--model", "stories260K"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shared data file ") and "LCKV_DATA" in err


def test_bad_policy_setting_exits_2_before_loading(capsys):
    assert main(["--model", "stories260K", "--budget", "0"]) == 2
    assert "budget must be >= 1 token" in capsys.readouterr().err
