"""The kvpress peer (benchmarks/peers/kvpress_runner.py): its budget mapping, row schema, resumable
JSONL writer and the merge of its rows by ``bench_tasks.py --peer-results`` run here without
kvpress; the end-to-end run needs the kvpress environment (``benchmarks/peers/kvpress_env.sh``)
and SmolLM2, and is skipped with a message without them."""
import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))

import bench_tasks  # noqa: E402
import kvpress_runner as runner  # noqa: E402

VENV = Path(os.environ.get("KVPRESS_VENV", Path.home() / ".cache" / "lckv" / "kvpress-venv"))
REQUIRED = ("model", "task", "length", "sample", "method", "source", "budget", "budget_tokens", "prompt_tokens",
            "answers", "metric", "prediction", "score", "new_tokens", "prefill_s", "first_step_s",
            "decode_tokens_per_s")


def _kvpress_n_kept(k_len, ratio):
    """kvpress 0.5.5 ``kvpress.utils.compute_n_kept`` (the count every ScorerPress keeps)."""
    return 0 if ratio >= 1.0 else max(1, int(k_len * (1 - ratio)))


def _prompt(task="niah_single_repeat", sample=0, answers=("1234567",)):
    text = "<ctx> long context\n\nWhat is the number? The number is"
    return {"model": "m", "task": task, "length": 64, "sample": sample, "seed": sample,
            "input_ids": list(range(sample, sample + 20)), "text": text, "context_text": text[:20], "question_text": text[20:],
            "answers": list(answers), "metric": "all", "max_new_tokens": 8}


# ----------------------------------------------------------------------------- budgets
def test_runner_and_harness_share_budget_labels_and_stopping():
    """Rows join lckv's only when the budget labels are equal: both scripts use task_rows' one
    definition (its literal cases are in tests/test_bench_tasks.py)."""
    assert runner.budget_label is bench_tasks.budget_label
    assert runner.eos_ids is bench_tasks.eos_ids


@pytest.mark.parametrize("text", ["0", "1.5", "-3", "12.5%x", "abc", "0.0"])
def test_runner_rejects_bad_budgets(text):
    with pytest.raises(argparse.ArgumentTypeError):
        runner.budget_label(text)


@pytest.mark.parametrize("budget, n, kept", [("0.1", 982, 99), ("0.1", 1000, 100), ("0.05", 4001, 201),
                                              ("64", 982, 64), ("2000", 982, 982), ("0.001", 100, 1),
                                              ("1.0", 57, 57), ("1", 3, 1)])
def test_kept_context_tokens(budget, n, kept):
    assert runner.kept_context_tokens(budget, n) == kept


@pytest.mark.parametrize("n", [1, 2, 7, 99, 100, 511, 982, 1000, 4096, 16381, 32768])
@pytest.mark.parametrize("budget", ["0.02", "0.05", "0.1", "0.3333", "0.5", "0.999", "1.0", "1", "17", "64", "256",
                                    "4096"])
def test_compression_ratio_makes_kvpress_keep_the_budget(n, budget):
    ratio = runner.compression_ratio(budget, n)
    assert 0.0 <= ratio < 1.0  # ScorerPress asserts this range
    assert _kvpress_n_kept(n, ratio) == runner.kept_context_tokens(budget, n)
    if "." in budget and runner.kept_context_tokens(budget, n) < n:
        assert ratio == pytest.approx(1 - float(budget), abs=1.5 / n)  # ~ 1 - b, rounded to whole tokens


def test_context_split_uses_the_offsets_of_the_whole_text():
    # "ab\n\nQ": the context "ab\n\n" alone would end in one "\n\n" token; in the prompt it is two
    ids, offsets = [5, 6, 6, 9], [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert runner.context_split(ids, ids, offsets, cut=4) == 3
    assert runner.context_split(ids, ids, [(0, 2), (2, 5), (5, 6), (6, 7)], cut=4) == 1  # a token across goes to Q
    with pytest.raises(ValueError, match="does not tokenize to its input_ids"):
        runner.context_split(ids, [5, 6, 9], offsets[:3], cut=4)
    with pytest.raises(ValueError, match="no context/question split"):
        runner.context_split(ids, ids, offsets, cut=5)


# ----------------------------------------------------------------------------- rows
def test_result_row_follows_the_schema():
    steps = [0.02, 0.01, 0.01, 0.01]
    row = runner.result_row(_prompt(), "SnapKVPress", "0.1", prediction=" 1234567.", new_tokens=5,
                            context_tokens=14, kept_context=2.0, question_tokens=6, compression_ratio=0.82,
                            prefill_s=1.5, compression_s=0.2, question_s=0.1, steps=steps)
    assert set(REQUIRED) <= set(row)
    assert row["method"] == "kvpress:SnapKVPress" and row["source"] == "kvpress" and row["budget"] == "0.1"
    assert row["budget_tokens"] == 2 + 6 + 1  # kept context + question + first answer token
    assert row["prompt_tokens"] == 20 and row["score"] is None and "error" not in row
    assert row["first_step_s"] == 0.02 and row["decode_tokens_per_s"] == pytest.approx(3 / 0.03)
    json.dumps(row)
    error = runner.error_row(_prompt(), "FastKVzipPress", "0.1", RuntimeError("no gates"))
    assert error["prediction"] is None and error["error"] == "RuntimeError: no gates"
    assert runner.row_key(error) == ("m", "niah_single_repeat", 64, "kvpress:FastKVzipPress", "0.1", 0)


def test_grid_runs_none_once():
    assert runner.grid(["none", "SnapKVPress"], ["0.05", "256"]) == [
        ("none", None), ("SnapKVPress", "0.05"), ("SnapKVPress", "256")]


# ----------------------------------------------------------------------------- resume
class _Tokenizer:
    eos_token_id = 2

    def decode(self, tokens, skip_special_tokens=True):
        return " " + "".join(str(t) for t in tokens if t != self.eos_token_id)


class _Model:
    class generation_config:  # noqa: N801
        eos_token_id = 2


@pytest.fixture
def fake_runner(monkeypatch, tmp_path):
    """``runner.run`` with the model, the split and the press loop replaced: records every
    (task, sample, press) it runs; ``BrokenPress`` fails like a press that cannot run here."""
    calls = []

    def run_press(model, tokenizer, press, ids, n_context, max_new_tokens, eos, shared=None):
        calls.append(press)
        shared.setdefault("ids", tuple(ids))
        assert shared["ids"] == tuple(ids), "a prompt's shared prefill reached another prompt"
        return {"tokens": [1, 2, 3, 4, 5, 6, 7] if press == "none" else [1, 2], "kept": 3.0, "prefill_s": 1.0,
                "compression_s": 0.1, "question_s": 0.2, "steps": [0.1, 0.05]}

    def make_press(name, ratio):
        if name == "BrokenPress":
            raise RuntimeError("needs CUDA")
        return name

    monkeypatch.setattr(runner, "load", lambda model_dir, gguf_file: (_Model(), _Tokenizer()))
    monkeypatch.setattr(runner, "point_name_or_path_at_tokenizer", lambda *args: None)
    monkeypatch.setattr(runner, "split_prompt", lambda tokenizer, prompt: 14)
    monkeypatch.setattr(runner, "make_press", make_press)
    monkeypatch.setattr(runner, "run_press", run_press)
    prompts = tmp_path / "m_prompts.jsonl"
    prompts.write_text("".join(json.dumps(_prompt(sample=i)) + "\n" for i in range(2)))

    def main(*extra):
        return runner.main(["--prompts", str(prompts), "--model-dir", str(tmp_path), "--presses", "none",
                            "SnapKVPress", "BrokenPress", "--budgets", "0.1", "64", *extra])
    return main, calls, tmp_path / "kvpress_m.jsonl"


def test_runner_resumes_and_reports_failed_presses(fake_runner, capsys):
    main, calls, out = fake_runner
    stats = main()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["computed"] == len(rows) == 2 * (1 + 2 + 2) and len(calls) == 2 * (1 + 2)
    broken = [r for r in rows if r["method"] == "kvpress:BrokenPress"]
    assert len(broken) == 4 and all(r["error"] == "RuntimeError: needs CUDA" and r["prediction"] is None
                                    for r in broken)
    assert "kvpress:BrokenPress failed: RuntimeError: needs CUDA" in capsys.readouterr().out
    assert {r["budget"] for r in rows if r["method"] == "kvpress:SnapKVPress"} == {"0.1", "64"}
    assert [r["budget"] for r in rows if r["method"] == "kvpress:none"] == [None, None]

    assert main() == {"computed": 0, "skipped": 10, "failed": {}} and len(calls) == 6

    text = out.read_text()  # an interrupted write: the last line is cut
    out.write_text(text[:-25])
    assert main()["computed"] == 1 and len(calls) == 6  # the cut row was BrokenPress's: run again, fails again
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and len({runner.row_key(r) for r in rows}) == 10

    stats = main("--retry-errors")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["computed"] == 4 and len(rows) == 10 and len({runner.row_key(r) for r in rows}) == 10
    assert bench_tasks.read_rows(out) == rows  # the harness reads the runner's file as its own


# ----------------------------------------------------------------------------- merge
def test_peer_rows_merge_into_the_summary(tmp_path, capsys):
    prompt = _prompt()
    lckv_rows = [{"model": "m", "task": prompt["task"], "length": 64, "sample": 0, "seed": 0, "source": "lckv",
                  "method": method, "budget": budget, "prompt_tokens": 20, "budget_tokens": keys,
                  "answers": prompt["answers"], "metric": "all", "prediction": prediction, "score": None,
                  "prefill_s": 1.0, "first_step_s": 0.05, "decode_tokens_per_s": 20.0}
                 for method, budget, keys, prediction in [("full", None, None, " 1234567."),
                                                          ("retrieval", "0.1", 3, " 1234567.")]]
    (tmp_path / "bench_tasks_m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lckv_rows))
    peer = tmp_path / "kvpress_m.jsonl"
    rows = [runner.result_row(prompt, press, budget, prediction=prediction, new_tokens=3, context_tokens=14,
                              kept_context=2.0, question_tokens=6, compression_ratio=0.82, prefill_s=1.2,
                              compression_s=0.1, question_s=0.1, steps=[0.05, 0.04, 0.04])
            for press, budget, prediction in [("none", None, " 1234567."), ("SnapKVPress", "0.1", " 1234567."),
                                              ("StreamingLLMPress", "0.1", " 11.")]]
    rows.append(runner.error_row(prompt, "FastKVzipPress", "0.1", "RuntimeError: no gates"))
    peer.write_text("".join(json.dumps(r) + "\n" for r in rows))
    payload = bench_tasks.main(["--model", "m", "--summary-only", "--results", str(tmp_path),
                                "--peer-results", str(peer)])
    summary = {(e["method"], e["budget"]): e for e in payload["summary"] if e["task"] == prompt["task"]}
    assert summary[("kvpress:SnapKVPress", "0.1")]["score"] == 1.0  # rescored from the prediction
    assert summary[("kvpress:StreamingLLMPress", "0.1")]["score"] == 0.0
    assert summary[("kvpress:StreamingLLMPress", "0.1")]["drop_pct"] == 100.0
    assert summary[("kvpress:none", None)]["drop_pct"] == 0.0
    assert summary[("kvpress:SnapKVPress", "0.1")]["budget_tokens"] == 9
    assert ("kvpress:FastKVzipPress", "0.1") not in summary  # a failed row has no score
    assert "kvpress:SnapKVPress" in capsys.readouterr().out


def test_only_the_main_file_takes_the_peer_file_by_default(tmp_path):
    """kvpress_<model>.jsonl in the results directory joins the model's main summary
    (bench_tasks_<model>) without --peer-results, but not a named grid's (--name), whose tasks
    and lengths it need not share."""
    prompt = _prompt()
    row = {"model": "m", "task": prompt["task"], "length": 64, "sample": 0, "seed": 0, "source": "lckv",
           "method": "full", "budget": None, "prompt_tokens": 20, "budget_tokens": None, "answers": prompt["answers"],
           "metric": "all", "prediction": " 1234567.", "score": None, "prefill_s": 1.0, "first_step_s": 0.05,
           "decode_tokens_per_s": 20.0}
    for name in ("bench_tasks_m", "grid"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    peer = runner.result_row(prompt, "SnapKVPress", "0.1", prediction=" 1234567.", new_tokens=3, context_tokens=14,
                             kept_context=2.0, question_tokens=6, compression_ratio=0.82, prefill_s=1.2,
                             compression_s=0.1, question_s=0.1, steps=[0.05, 0.04, 0.04])
    (tmp_path / "kvpress_m.jsonl").write_text(json.dumps(peer) + "\n")
    methods = {}
    for name in ("bench_tasks_m", "grid"):
        payload = bench_tasks.main(["--model", "m", "--summary-only", "--results", str(tmp_path), "--name", name])
        methods[name] = {e["method"] for e in payload["summary"]}
    assert methods == {"bench_tasks_m": {"full", "kvpress:SnapKVPress"}, "grid": {"full"}}


# ----------------------------------------------------------------------------- end to end (kvpress environment)
def test_end_to_end_with_kvpress_environment(tmp_path):
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no kvpress environment at {VENV}: create it with `bash benchmarks/peers/kvpress_env.sh` "
                    "(KVPRESS_VENV names another); the pieces that need no kvpress are tested above")
    from lckv.models import is_fetched, model_path

    if not is_fetched("smollm2-135m-instruct"):
        pytest.skip("SmolLM2 not fetched: run `python -m lckv.models fetch smollm2-135m-instruct`")
    common = ["--model", "smollm2-135m-instruct", "--tasks", "niah_single_repeat", "--lengths", "384", "--samples", "1",
              "--max-new-tokens", "6", "--results", str(tmp_path), "--name", "e2e"]
    bench_tasks.main([*common, "--export-prompts"])
    bench_tasks.main([*common, "--methods", "full"])
    out = tmp_path / "kvpress_e2e.jsonl"
    done = subprocess.run([str(python), str(ROOT / "benchmarks" / "peers" / "kvpress_runner.py"), "--prompts",
                           str(tmp_path / "e2e_prompts.jsonl"), "--model-dir", str(model_path("smollm2-135m-instruct")),
                           "--presses", "none", "StreamingLLMPress", "--budgets", "0.25", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["method"]: r for r in bench_tasks.read_rows(out)}
    full = bench_tasks.read_rows(tmp_path / "e2e.jsonl")[0]
    assert rows["kvpress:none"]["prediction"] == full["prediction"]  # same model, tokens and greedy decoding
    streaming = rows["kvpress:StreamingLLMPress"]
    assert streaming["kept_context_tokens"] == math.ceil(0.25 * streaming["context_tokens"])
    assert streaming["context_tokens"] + streaming["question_tokens"] == full["prompt_tokens"]
    payload = bench_tasks.main([*common, "--summary-only", "--peer-results", str(out)])
    assert {"full", "kvpress:none", "kvpress:StreamingLLMPress"} <= {e["method"] for e in payload["summary"]}

    presses = ["none", "StreamingLLMPress", "SnapKVPress", "TOVAPress"]  # shared prefill == own prefill == pipeline
    checked = subprocess.run([str(python), str(ROOT / "benchmarks" / "peers" / "kvpress_runner.py"), "--check",
                              "--prompts", str(tmp_path / "e2e_prompts.jsonl"), "--model-dir",
                              str(model_path("smollm2-135m-instruct")), "--presses", *presses, "--budgets", "0.25"],
                             capture_output=True, text=True, timeout=600)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    verdicts = [line.split()[1:3] for line in checked.stdout.splitlines() if line.startswith("--check")]
    assert verdicts == [[press, "same:"] for press in presses], checked.stdout
