"""The five VERL rewards: correct scores, anti-gaming bounds, robustness, and the judge client
against a local OpenAI-compatible server on 127.0.0.1."""
import json
import logging
import os
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from training import rewards
from training.judge import JudgeClient, parse_criteria
from training.matching import normalize_answer, subem
from training.rewards import (compute_score, compute_score_ao, compute_score_id, compute_score_id_c,
                              compute_score_id_q, compute_score_r_judge, reward_components)

ALL = {"ao": compute_score_ao, "id": compute_score_id, "id_c": compute_score_id_c, "id_q": compute_score_id_q,
       "r_judge": compute_score_r_judge}
# Upper bounds with the default weights (module docstring of training.rewards).
MAX = {"ao": 1.0, "id": 2.0, "id_c": 4.8, "id_q": 4.2, "r_judge": 4.0}
WORDS = ("river castle engine violet harbor summit lantern meadow copper falcon orchard glacier "
         "canyon marble thunder willow saddle prism beacon tundra").split()


def _seed():
    return int.from_bytes(os.urandom(4), "little")


def _doc(rng, n_words=40):
    title = " ".join(rng.sample(WORDS, 2)).title()
    return f"{title}\n" + " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def _case(seed):
    """A random example: 12 documents, 2 gold ids, an answer that is a gold document phrase."""
    rng = random.Random(seed)
    docs = [_doc(rng) for _ in range(12)]
    gold = sorted(rng.sample(range(12), 2))
    answer = "Zorblax Quintana"
    docs[gold[0]] = docs[gold[0]].split("\n")[0] + f"\nThe founder was {answer}, who built the first mill in the valley."
    truth = {"answers": [answer, "Quintana"], "gold_ids": gold}
    return rng, docs, gold, answer, truth, {"documents": docs, "question": "Who founded it?"}


def _tags(ids):
    return ", ".join(f"[DOC {i}]" for i in ids)


# ----------------------------------------------------------------------------- correct answers
def test_perfect_responses_reach_each_maximum():
    seed = _seed()
    rng, docs, gold, answer, truth, extra = _case(seed)
    perfect = {
        "ao": f"The answer is: {answer}",
        "id": f"{_tags(gold)}\nThe answer is: {answer}",
        "id_c": "Relevant documents:\n" + "\n".join(f"[DOC {i}] {docs[i]}" for i in gold) + f"\nThe answer is: {answer}",
        "id_q": "\n".join(f'Quote {n}: "{" ".join(docs[i].split(chr(10))[1].split()[:12])}"'
                          for n, i in enumerate(gold, 1)) + f"\nRelevant Document IDs: {_tags(gold)}\nThe answer is: {answer}",
    }
    for fmt, text in perfect.items():
        assert ALL[fmt]("hotpotqa", text, truth, extra) == pytest.approx(MAX[fmt]), (fmt, seed)


def test_ao_normalisation_and_aliases():
    truth = {"answers": ["The Beatles", "Beatles"], "gold_ids": [0]}
    for text, want in [("The answer is: the beatles!", 1.0), ("The answer is: **Beatles**", 1.0),
                       ("the answer is:   The  BEATLES.", 1.0), ("The answer is: The Rolling Stones", 0.0),
                       ("The answer is: Beatle", 0.0), ("reasoning\nThe answer is: they were the Beatles", 1.0)]:
        assert compute_score_ao("x", text, truth) == want, text
    # a plain string and a JSON string are accepted as ground truth
    assert compute_score_ao("x", "The answer is: Paris", "Paris") == 1.0
    assert compute_score_ao("x", "The answer is: Paris", json.dumps({"answers": ["Paris"], "gold_ids": []})) == 1.0


def test_id_f1_values():
    truth = {"answers": ["x"], "gold_ids": [3, 7]}
    assert rewards.id_f1([3, 7], [3, 7]) == 1.0
    assert rewards.id_f1([3], [3, 7]) == pytest.approx(2 / 3)
    assert rewards.id_f1([3, 7, 9, 11], [3, 7]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert rewards.id_f1([], [3]) == 0.0
    assert rewards.id_f1([-1], []) == 1.0  # no relevant document, spelled [DOC -1]
    assert compute_score_id("x", "[DOC -1]\nThe answer is: x", {"answers": ["x"], "gold_ids": []}) == 2.0
    # ids after the answer line do not count
    assert reward_components("id", "[DOC 3]\nThe answer is: y\n[DOC 7]", truth)["id_f1"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- gaming
def test_citing_every_document_does_not_pay():
    seed = _seed()
    rng, docs, gold, answer, truth, extra = _case(seed)
    everything = list(range(len(docs)))
    right = compute_score_id("x", f"{_tags(gold)}\nThe answer is: {answer}", truth, extra)
    spam = compute_score_id("x", f"{_tags(everything)}\nThe answer is: {answer}", truth, extra)
    assert spam < right and spam <= 1.0 + 2 * 2 / (len(docs) + 2) + 1e-9, seed
    idc_spam = "Relevant documents:\n" + "\n".join(f"[DOC {i}] {d}" for i, d in enumerate(docs)) + f"\nThe answer is: {answer}"
    parts = reward_components("id_c", idc_spam, truth, extra)
    assert parts["n_irrelevant"] == len(docs) - 2
    f1 = 2 * (2 / len(docs)) / (2 / len(docs) + 1)
    assert parts["id_f1"] == pytest.approx(f1)
    assert parts["score"] == pytest.approx(1.5 * f1 + 1.0 + 2.0 + 0.3 - 0.3 * (len(docs) - 2)), seed
    # less than answering with no citation at all (AO only: 2.0), far below the correct citation (4.8)
    assert parts["score"] < compute_score_id_c("x", f"The answer is: {answer}", truth, extra) == 2.0


def test_repeating_or_listing_answers_does_not_pay():
    truth = {"answers": ["Paris"], "gold_ids": [0]}
    assert compute_score_ao("x", "The answer is: Paris Paris Paris Paris", truth) == 0.0
    assert compute_score_ao("x", "The answer is: Paris, Paris", truth) == 0.0
    many = ", ".join(["London", "Berlin", "Rome", "Madrid", "Vienna", "Oslo", "Bern", "Lima", "Quito", "Paris", "Kyiv"])
    assert compute_score_ao("x", f"The answer is: {many}", truth) == 0.0
    assert compute_score_ao("x", "The answer is: Paris, France", truth) == 1.0


def test_missing_or_multiple_answer_lines():
    truth = {"answers": ["Paris"], "gold_ids": [0]}
    assert compute_score_ao("x", "Paris", truth) == 0.0
    assert compute_score_ao("x", "I think the answer is Paris", truth) == 0.0
    assert compute_score_ao("x", "The answer is: Paris\nThe answer is: Rome", truth) == 0.0
    assert compute_score_ao("x", "The answer is: Paris\nThe answer is: Paris", truth) == 0.0
    parts = reward_components("id_c", "Relevant documents:\n[DOC 0] text\nParis", truth, {"documents": ["text"]})
    assert parts["format"] == 0.0 and parts["ao"] == 0.0


def test_quotes_not_in_context_earn_nothing_but_answer_and_format():
    seed = _seed()
    rng, docs, gold, answer, truth, extra = _case(seed)
    fake = "\n".join(f'Quote {n}: "purple elephants negotiate {n} treaties with distant moons tonight"'
                     for n in range(1, 4))
    text = f"{fake}\nRelevant Document IDs: {_tags(gold)}\nThe answer is: {answer}"
    parts = reward_components("id_q", text, truth, extra)
    assert parts["quote_precision"] == 0.0 and parts["coverage"] == 0.0, seed
    assert parts["id_f1"] == 0.0, seed  # ids only count once a quote is verified
    assert parts["score"] == pytest.approx(1.0 + 0.2), seed


def test_short_and_overlong_quotes():
    seed = _seed()
    rng, docs, gold, answer, truth, extra = _case(seed)
    body = docs[gold[0]].split("\n")[1]
    short = f'Quote 1: "the"\nRelevant Document IDs: {_tags(gold)}\nThe answer is: {answer}'
    assert reward_components("id_q", short, truth, extra)["quote_precision"] == 0.0
    long_quote = " ".join((body + " ") .split() * 3)[:2000]
    text = f'Quote 1: "{" ".join(long_quote.split()[:35])}"\nRelevant Document IDs: {_tags(gold)}\nThe answer is: {answer}'
    parts = reward_components("id_q", text, truth, extra)
    assert parts["overlong"] == 1.0
    eleven = "\n".join(f'Quote {n}: "{" ".join(body.split()[:8])}"' for n in range(1, 12))
    parts = reward_components("id_q", f"{eleven}\nRelevant Document IDs: {_tags(gold)}\nThe answer is: {answer}", truth, extra)
    assert parts["format"] == 0.0  # more than 10 quotes breaks the format; only the first 10 are scored


@pytest.mark.parametrize("fmt", sorted(ALL))
def test_bad_inputs_are_bounded_and_never_raise(fmt, caplog):
    seed = _seed()
    rng, docs, gold, answer, truth, extra = _case(seed)
    extra = dict(extra)
    kwargs = {"judge_url": "http://127.0.0.1:9/v1", "judge_retries": 0, "judge_timeout": 0.5} if fmt == "r_judge" else {}
    huge = "[DOC 1] " * 10_000 + f"\nThe answer is: {answer}"
    cases = [None, "", "   \n", 12345, b"\xff\xfe\xfa not utf-8 \x80\nThe answer is: " + answer.encode(),
             huge, "x" * (rewards.MAX_RESPONSE_CHARS + 1), "\x00\x01\ud800 The answer is: \U0001F600",
             "[DOC 99999999] [DOC -5]\nThe answer is: " + answer, "Quote 1: \"\nThe answer is:"]
    for solution in cases:
        for gt in (truth, None, 3.5, {"answers": None, "gold_ids": ["a", None]}, [answer], "{broken json"):
            for ei in (extra, None, "not a dict", {"documents": [None, 5, "text"]}):
                score = ALL[fmt]("hotpotqa", solution, gt, ei, **kwargs)
                assert isinstance(score, float) and 0.0 <= score <= MAX[fmt], (fmt, repr(solution)[:40], gt, seed)
    assert ALL[fmt]("hotpotqa", huge, truth, extra, **kwargs) == 0.0  # longer than MAX_RESPONSE_CHARS
    # bytes with bad UTF-8 are decoded with replacement characters; the answer line still counts
    assert ALL["ao"]("x", b"\xff\xfe\nThe answer is: " + answer.encode(), truth) == 1.0


def test_non_finite_gold_ids_are_ignored():
    """A JSON ground truth may carry Infinity as an id: int(inf) raised OverflowError out of a
    reward documented never to raise (found by benchmarks/fuzz.py)."""
    truth = json.dumps({"answers": ["x"], "gold_ids": [float("inf"), float("nan"), 1]})
    for fmt in ("ao", "id", "id_c", "id_q"):
        score = ALL[fmt]("hotpotqa", "[DOC 1]\nThe answer is: x", truth, {"documents": ["a", "b"]})
        assert isinstance(score, float) and 0.0 <= score <= MAX[fmt]


def test_enormous_output_is_fast():
    seed = _seed()
    rng, docs, gold, answer, truth, extra = _case(seed)
    text = "\n".join(f'Quote {n}: "{" ".join(rng.choice(WORDS) for _ in range(400))}"' for n in range(1, 11))
    text += f"\nRelevant Document IDs: {_tags(range(12))}\nThe answer is: {answer}"
    assert len(text) < rewards.MAX_RESPONSE_CHARS
    start = time.perf_counter()
    for fmt in ("id", "id_c", "id_q"):
        ALL[fmt]("x", text, truth, extra)
    assert time.perf_counter() - start < 5.0


def test_unknown_weight_is_a_clear_error():
    with pytest.raises(TypeError, match="w_typo"):
        compute_score_id("x", "The answer is: y", {"answers": ["y"]}, None, w_typo=1.0)
    with pytest.raises(ValueError, match="fmt must be one of"):
        reward_components("bogus", "x", "y")
    # VERL's reward-router keywords are accepted and ignored
    assert compute_score_ao("x", "The answer is: y", "y", None, reward_router_address=None) == 1.0


def test_weights_are_parameters():
    seed = _seed()
    rng, docs, gold, answer, truth, extra = _case(seed)
    text = f"{_tags(gold[:1])}\nThe answer is: {answer}"
    assert compute_score_id("x", text, truth, extra, w_id=3.0, w_ao=0.5) == pytest.approx(3.0 * 2 / 3 + 0.5)


def test_dispatching_compute_score():
    truth = {"answers": ["y"], "gold_ids": [1]}
    assert compute_score("x", "[DOC 1]\nThe answer is: y", truth, {"format": "id"}) == 2.0
    assert compute_score("x", "[DOC 1]\nThe answer is: y", truth, None) == 1.0


def test_subem_matches_a_reference_definition():
    """SubEM against a direct re-statement of HELMET's rule on random word strings."""
    seed = _seed()
    rng = random.Random(seed)
    vocab = ["a", "the", "an", "red", "Red,", "fox", "fox.", "ran", "1", "1990"]
    for _ in range(300):
        pred = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 6)))
        gold = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 3)))
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        want = float(bool(g) and any(p[i:i + len(g)] == g for i in range(len(p) - len(g) + 1)))
        assert subem(pred, [gold]) == want, (pred, gold, seed)


# ----------------------------------------------------------------------------- judge
class _Judge:
    """Local OpenAI-compatible judge; each request pops the next reply mode."""

    def __init__(self):
        self.modes, self.requests = [], []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append((self.path, body, self.headers.get("Authorization")))
                mode = judge.modes.pop(0) if judge.modes else "good"
                if mode == "http500":
                    self.send_response(500)
                    self.end_headers()
                    return
                if mode == "timeout":
                    time.sleep(1.0)
                content = {"good": "Grading.\n\\boxed{Criterion 1: 1}\n\\boxed{Criterion 2: 0}\n\\boxed{Criterion 3: 1}",
                           "all": "\\boxed{Criterion 1: 1} \\boxed{Criterion 2: 1} \\boxed{Criterion 3: 1}",
                           "malformed": "The response is good. Score: 3/3",
                           "timeout": "\\boxed{Criterion 1: 1}\\boxed{Criterion 2: 1}\\boxed{Criterion 3: 1}"}.get(mode)
                payload = b"{not json" if mode == "badjson" else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge():
    server = _Judge()
    yield server
    server.close()


def test_parse_criteria():
    assert parse_criteria("\\boxed{Criterion 1: 1}\\boxed{Criterion 2: 0}\\boxed{Criterion 3: 1}") == [1, 0, 1]
    assert parse_criteria("\\boxed{ criterion 3 : 0 } \\boxed{Criterion 1: 1} \\boxed{Criterion 2: 1}") == [1, 1, 0]
    for bad in ["", "\\boxed{Criterion 1: 1}\\boxed{Criterion 2: 0}", "\\boxed{Criterion 1: 2}" * 3,
                "\\boxed{Criterion 1: 1}\\boxed{Criterion 1: 0}\\boxed{Criterion 2: 0}\\boxed{Criterion 3: 1}",
                "\\boxed{Criterion 4: 1}\\boxed{Criterion 2: 0}\\boxed{Criterion 3: 1}", None]:
        assert parse_criteria(bad) is None, bad


def test_r_judge_with_local_judge(judge):
    seed = _seed()
    rng, docs, gold, answer, truth, extra = _case(seed)
    text = f"According to [DOC {gold[0]}], the founder was {answer}.\nThe answer is: {answer}"
    kwargs = {"judge_url": judge.url, "judge_model": "tiny-judge", "judge_api_key": "k123", "judge_timeout": 5}
    assert compute_score_r_judge("x", text, truth, extra, **kwargs) == 2.0 + 1.0
    path, body, auth = judge.requests[-1]
    assert path == "/v1/chat/completions" and body["model"] == "tiny-judge" and auth == "Bearer k123"
    prompt = body["messages"][-1]["content"]
    assert "Who founded it?" in prompt and answer in prompt and f"[DOC {gold[0]}]" in prompt
    judge.modes = ["malformed", "all"]  # a malformed reply is retried
    assert compute_score_r_judge("x", text, truth, extra, **kwargs) == 3.0 + 1.0


@pytest.mark.parametrize("failure", ["malformed", "http500", "badjson", "timeout"])
def test_judge_failures_score_zero_with_a_log(judge, failure, caplog):
    truth = {"answers": ["Paris"], "gold_ids": [0]}
    judge.modes = [failure] * 10
    with caplog.at_level(logging.WARNING, logger="training.judge"):
        parts = reward_components("r_judge", "According to [DOC 0], Paris.\nThe answer is: Paris", truth,
                                  {"documents": ["Paris\nParis is the capital."], "question": "q"},
                                  judge_url=judge.url, judge_timeout=0.3, judge_retries=1)
    assert parts["judge"] == 0.0 and parts["judge_ok"] == 0.0 and parts["score"] == 1.0
    assert any("judge part scored 0" in r.getMessage() for r in caplog.records)


def test_judge_unreachable_and_unconfigured(caplog, monkeypatch):
    monkeypatch.delenv("LCKV_JUDGE_URL", raising=False)
    truth = {"answers": ["Paris"], "gold_ids": [0]}
    with caplog.at_level(logging.WARNING, logger="training.judge"):
        assert compute_score_r_judge("x", "The answer is: Paris", truth, None) == 1.0
        start = time.perf_counter()
        assert compute_score_r_judge("x", "The answer is: Paris", truth, None, judge_url="http://127.0.0.1:9/v1",
                                     judge_retries=2, judge_timeout=0.5) == 1.0
        assert time.perf_counter() - start < 5.0
    messages = [r.getMessage() for r in caplog.records]
    assert any("LCKV_JUDGE_URL is not set" in m for m in messages)
    assert any("after 3 attempt(s)" in m for m in messages)


def test_judge_client_configuration(monkeypatch, judge):
    monkeypatch.setenv("LCKV_JUDGE_URL", judge.url)
    monkeypatch.setenv("LCKV_JUDGE_MODEL", "env-model")
    client = JudgeClient()
    assert client.grade([{"role": "user", "content": "hi"}]) == [1, 0, 1]
    assert judge.requests[-1][1]["model"] == "env-model"
    with pytest.raises(ValueError, match="timeout"):
        JudgeClient(timeout=0)
    with pytest.raises(ValueError, match="retries"):
        JudgeClient(retries=-1)
