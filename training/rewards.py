"""The five GRPO rewards, behind VERL's custom reward signature.

Each ``compute_score_*`` is ``(data_source, solution_str, ground_truth, extra_info=None, **weights)
-> float`` and can be named in ``reward.custom_reward_function.name``; VERL passes
``reward.custom_reward_function.reward_kwargs`` as extra keyword arguments, which is how the
weights below are changed. :func:`compute_score` dispatches on ``extra_info["format"]``.

Inputs (as the data builder writes them):

* ``ground_truth``: ``{"answers": [alias, ...], "gold_ids": [i, ...]}`` (a JSON string of it, a
  bare answer string or a list of aliases are accepted too). ``gold_ids`` empty means no
  document is relevant, spelled ``[DOC -1]``.
* ``extra_info["documents"]``: the context documents as shown after each ``[DOC i]`` tag
  (``title\\ntext``), index = id; needed by ID+C (content match), ID+Q (quote verification) and
  R+Judge (the judge sees the relevant ones). ``extra_info["question"]`` for the judge.

Rewards (default weights; all are keyword parameters):

=========  =========================================================================  ==========
name       score                                                                      range
=========  =========================================================================  ==========
AO         answer match (below)                                                       [0, 1]
ID         ID-F1 + AO                                                                 [0, 2]
ID+C       max(0, 1.5 ID-F1 + 1.0 content + 2.0 AO + 0.3 format - 0.3 n_irrelevant)  [0, 4.8]
ID+Q       max(0, quote precision + coverage + ID-F1 (only once a quote is verified)  [0, 4.2]
           + AO + 0.2 format - 0.1 overlong-quote fraction)
R+Judge    judge criteria met (0..3; 0 when the judge is unreachable) + AO            [0, 4]
=========  =========================================================================  ==========

Anti-gaming rules (every case scores within the range above and never raises):

* No answer line, or more than one ``The answer is:`` line: AO = 0 (and format = 0).
* The answer must be short: AO = 0 when the parsed answer has more than
  ``len(gold) + max_extra_answer_words`` words (default 5), or contains the gold answer more
  than once (repeating the answer or listing many candidates does not pay; a list of up to 5
  extra words still can, the price of accepting short verbose answers).
* ``solution_str`` that is None, not text, empty, or longer than ``max_response_chars``
  (default 40,000): score 0. Bytes are decoded as UTF-8 with replacement characters.
* Citing every document: ID-F1 falls with precision; ID+C subtracts 0.3 per irrelevant id.
* Quotes count as verified only with ``min_quote_words`` (4) to ``4 * max_quote_words`` words
  and a fuzzy match >= ``quote_threshold`` (0.8) inside some context document; quotes past the
  tenth are ignored. Word counts stand in for tokens (the reward sees no tokenizer).
"""
from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Iterable

from training.judge import JudgeClient
from training.matching import normalize_answer, partial_similarity, char_f1, subem
from training.prompts import build_judge_messages

__all__ = [
    "compute_score", "compute_score_ao", "compute_score_id", "compute_score_id_c", "compute_score_id_q",
    "compute_score_r_judge", "reward_components", "parse_answer", "parse_doc_ids", "id_f1",
    "answer_reward", "MAX_RESPONSE_CHARS",
]

logger = logging.getLogger("training.rewards")

MAX_RESPONSE_CHARS = 40_000
# Passed by VERL's reward managers when a reward-model router exists; unused here.
_VERL_EXTRA_KWARGS = ("reward_router_address", "reward_model_tokenizer")
_ANSWER_LINE = re.compile(r"^[ \t*_#>]*the answer is[ \t*_]*:[ \t*_]*(.*?)[ \t*_]*$", re.IGNORECASE | re.MULTILINE)
_DOC_TAG = re.compile(r"\[\s*DOC\s*(-?\d{1,9})\s*\]", re.IGNORECASE)
_RELEVANT_DOCS = re.compile(r"^[ \t*_#]*relevant documents[ \t*_]*:", re.IGNORECASE | re.MULTILINE)
_RELEVANT_IDS = re.compile(r"^[ \t*_#]*relevant document ids[ \t*_]*:", re.IGNORECASE | re.MULTILINE)
_QUOTE_LINE = re.compile(r"^[ \t*_]*quote[ \t]*(\d{1,4})[ \t]*:[ \t]*[\"\u201c](.*)[\"\u201d][ \t]*$",
                         re.IGNORECASE | re.MULTILINE)


# ----------------------------------------------------------------------------- input coercion
def _text(solution_str, max_response_chars: int) -> str | None:
    if isinstance(solution_str, (bytes, bytearray)):
        solution_str = bytes(solution_str).decode("utf-8", errors="replace")
    if not isinstance(solution_str, str):
        return None
    if not solution_str.strip() or len(solution_str) > max_response_chars:
        return None
    return solution_str


def _truth(ground_truth) -> tuple[list[str], set[int]]:
    """(answer aliases, gold ids) from the accepted ground-truth forms; ([], set()) if unusable."""
    if isinstance(ground_truth, (bytes, bytearray)):
        ground_truth = bytes(ground_truth).decode("utf-8", errors="replace")
    if isinstance(ground_truth, str):
        stripped = ground_truth.strip()
        if stripped.startswith("{"):
            try:
                ground_truth = json.loads(stripped)
            except ValueError:
                ground_truth = {"answers": [ground_truth]}
        else:
            ground_truth = {"answers": [ground_truth]}
    elif not hasattr(ground_truth, "get") and _is_iterable(ground_truth):
        ground_truth = {"answers": list(ground_truth)}
    if not hasattr(ground_truth, "get"):
        return [], set()
    answers = ground_truth.get("answers")
    answers = [answers] if isinstance(answers, str) else _as_list(answers)
    answers = [a for a in answers if isinstance(a, str)]
    gold = set()
    for i in _as_list(ground_truth.get("gold_ids")):
        try:
            gold.add(int(i))
        except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float id
            continue
    gold.discard(-1)
    return answers, gold


def _is_iterable(x) -> bool:
    return isinstance(x, Iterable) and not isinstance(x, (str, bytes, dict))


def _as_list(x) -> list:
    if x is None or isinstance(x, (str, bytes)):
        return []
    try:
        return list(x)
    except TypeError:
        return []


def _documents(extra_info) -> list[str]:
    if not hasattr(extra_info, "get"):
        return []
    return [d if isinstance(d, str) else "" for d in _as_list(extra_info.get("documents"))]


# ----------------------------------------------------------------------------- parsing
def parse_answer(text: str) -> str | None:
    """The text after the single ``The answer is:`` line; None if there are zero or several."""
    found = _ANSWER_LINE.findall(text)
    if len(found) != 1:
        return None
    return found[0].strip()


def _answer_is_last(text: str) -> bool:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return bool(lines) and _ANSWER_LINE.fullmatch(lines[-1]) is not None


def _before_answer(text: str) -> str:
    match = _ANSWER_LINE.search(text)
    return text[: match.start()] if match else text


def parse_doc_ids(text: str) -> list[int]:
    """Distinct ``[DOC i]`` ids in order of first appearance (``[DOC -1]`` included)."""
    seen: dict[int, None] = {}
    for i in _DOC_TAG.findall(text):
        seen.setdefault(int(i), None)
    return list(seen)


def id_f1(predicted: Iterable[int], gold: Iterable[int]) -> float:
    """F1 of predicted against gold document ids. An empty gold set stands for ``{-1}`` (no
    relevant document); an empty prediction scores 0."""
    pred, gold = set(predicted), set(gold) or {-1}
    if not pred:
        return 0.0
    hits = len(pred & gold)
    if not hits:
        return 0.0
    precision, recall = hits / len(pred), hits / len(gold)
    return 2 * precision * recall / (precision + recall)


def answer_reward(text: str, answers: list[str], max_extra_answer_words: int = 5) -> float:
    """AO: SubEM of the single parsed answer line against the aliases, with the length and
    repetition guards described in the module docstring."""
    answer = parse_answer(text)
    if answer is None or not answers:
        return 0.0
    pred = normalize_answer(answer)
    best = 0.0
    for alias in answers:
        gold = normalize_answer(alias)
        if not gold or not subem(answer, [alias]):
            continue
        too_long = len(pred.split()) > len(gold.split()) + max_extra_answer_words
        repeated = len(re.findall(rf"(?<!\S){re.escape(gold)}(?!\S)", pred)) > 1
        if not too_long and not repeated:
            best = 1.0
    return best


# ----------------------------------------------------------------------------- components
def _components_ao(text, answers, gold, documents, *, max_extra_answer_words=5):
    ao = answer_reward(text, answers, max_extra_answer_words)
    return {"score": ao, "ao": ao}


def _components_id(text, answers, gold, documents, *, max_extra_answer_words=5, w_id=1.0, w_ao=1.0):
    ao = answer_reward(text, answers, max_extra_answer_words)
    f1 = id_f1(parse_doc_ids(_before_answer(text)), gold)
    return {"score": w_id * f1 + w_ao * ao, "id_f1": f1, "ao": ao}


def _cited_blocks(section: str) -> dict[int, str]:
    """``{id: copied text}`` for each ``[DOC i]`` block of an ID+C section (first copy wins)."""
    tags = list(_DOC_TAG.finditer(section))
    blocks: dict[int, str] = {}
    for k, tag in enumerate(tags):
        end = tags[k + 1].start() if k + 1 < len(tags) else len(section)
        blocks.setdefault(int(tag.group(1)), section[tag.end():end].strip())
    return blocks


def _components_id_c(text, answers, gold, documents, *, max_extra_answer_words=5, w_id=1.5, w_content=1.0,
                     w_ao=2.0, w_format=0.3, w_irrelevant=0.3):
    ao = answer_reward(text, answers, max_extra_answer_words)
    head = _RELEVANT_DOCS.search(text)
    section = _before_answer(text[head.end():]) if head else ""
    blocks = _cited_blocks(section)
    cited = set(blocks)
    f1 = id_f1(cited, gold)
    if gold:
        content = sum(char_f1(blocks[i], documents[i]) for i in gold & cited if 0 <= i < len(documents)) / len(gold)
    else:
        content = 1.0 if cited <= {-1} else 0.0
    n_irrelevant = len(cited - (gold or {-1}))
    fmt = float(bool(head) and bool(blocks) and parse_answer(text) is not None and _answer_is_last(text))
    score = w_id * f1 + w_content * content + w_ao * ao + w_format * fmt - w_irrelevant * n_irrelevant
    return {"score": max(0.0, score), "id_f1": f1, "content": content, "ao": ao, "format": fmt,
            "n_irrelevant": n_irrelevant}


def _components_id_q(text, answers, gold, documents, *, max_extra_answer_words=5, max_quotes=10,
                     max_quote_words=30, min_quote_words=4, quote_threshold=0.8, w_precision=1.0,
                     w_coverage=1.0, w_id=1.0, w_ao=1.0, w_format=0.2, w_length=0.1):
    ao = answer_reward(text, answers, max_extra_answer_words)
    body = _before_answer(text)
    quotes = _QUOTE_LINE.findall(body)
    counted = quotes[:max_quotes]
    verified, supported = 0, set()
    for _, quote in counted:
        n_words = len(quote.split())
        if n_words < min_quote_words or n_words > 4 * max_quote_words:
            continue
        sims = [partial_similarity(quote, doc) for doc in documents]
        if sims and max(sims) >= quote_threshold:
            verified += 1
            supported.add(max(range(len(sims)), key=sims.__getitem__))
    precision = verified / len(counted) if counted else 0.0
    if gold:
        coverage = len(supported & gold) / len(gold)
    else:
        coverage = 1.0 if not counted else 0.0
    marker = _RELEVANT_IDS.search(body)
    listed = parse_doc_ids(body[marker.end():]) if marker else []
    f1 = id_f1(listed, gold) if verified else 0.0
    overlong = sum(len(q.split()) > max_quote_words for _, q in counted) / len(counted) if counted else 0.0
    numbered = [int(n) for n, _ in quotes] == list(range(1, len(quotes) + 1))
    fmt = float(0 < len(quotes) <= max_quotes and numbered and marker is not None
                and parse_answer(text) is not None and _answer_is_last(text))
    score = (w_precision * precision + w_coverage * coverage + w_id * f1 + w_ao * ao + w_format * fmt
             - w_length * overlong)
    return {"score": max(0.0, score), "quote_precision": precision, "coverage": coverage, "id_f1": f1,
            "ao": ao, "format": fmt, "overlong": overlong}


def _components_r_judge(text, answers, gold, documents, *, extra_info=None, max_extra_answer_words=5,
                        w_judge=1.0, w_ao=1.0, judge_url=None, judge_model=None, judge_api_key=None,
                        judge_timeout=30.0, judge_retries=2, judge_client=None):
    ao = answer_reward(text, answers, max_extra_answer_words)
    client = judge_client or JudgeClient(base_url=judge_url, model=judge_model, api_key=judge_api_key,
                                         timeout=judge_timeout, retries=judge_retries)
    question = extra_info.get("question", "") if hasattr(extra_info, "get") else ""
    relevant = [f"[DOC {i}] {documents[i]}" for i in sorted(gold) if 0 <= i < len(documents)]
    verdicts = client.grade(build_judge_messages(str(question), answers, relevant, text))
    judge = float(sum(verdicts)) if verdicts is not None else 0.0
    return {"score": w_judge * judge + w_ao * ao, "judge": judge, "ao": ao,
            "judge_ok": float(verdicts is not None)}


_COMPONENTS = {"ao": _components_ao, "id": _components_id, "id_c": _components_id_c,
               "id_q": _components_id_q, "r_judge": _components_r_judge}


def reward_components(fmt: str, solution_str, ground_truth, extra_info=None, *,
                      max_response_chars: int = MAX_RESPONSE_CHARS, **weights) -> dict:
    """Score and its parts for reward ``fmt`` (one of ao, id, id_c, id_q, r_judge).

    Returns ``{"score": float, <component>: float, ...}``; unusable input gives
    ``{"score": 0.0, "invalid": 1.0}``.
    """
    if fmt not in _COMPONENTS:
        raise ValueError(f"fmt must be one of {sorted(_COMPONENTS)}, got {fmt!r}")
    component = _COMPONENTS[fmt]
    for name in _VERL_EXTRA_KWARGS:
        weights.pop(name, None)
    accepted = inspect.signature(component).parameters
    unknown = sorted(set(weights) - set(accepted) - {"extra_info"})
    if unknown:
        raise TypeError(f"unknown keyword argument(s) {unknown} for reward {fmt!r}; accepted: "
                        f"{sorted(n for n in accepted if n not in ('text', 'answers', 'gold', 'documents'))}")
    text = _text(solution_str, max_response_chars)
    if text is None:
        return {"score": 0.0, "invalid": 1.0}
    answers, gold = _truth(ground_truth)
    documents = _documents(extra_info)
    if fmt == "r_judge":
        weights["extra_info"] = extra_info
    parts = component(text, answers, gold, documents, **weights)
    parts["score"] = float(parts["score"])
    return parts


def _verl_reward(fmt: str):
    def compute(data_source=None, solution_str=None, ground_truth=None, extra_info=None, **weights) -> float:
        return reward_components(fmt, solution_str, ground_truth, extra_info, **weights)["score"]

    compute.__name__ = f"compute_score_{fmt}"
    compute.__qualname__ = compute.__name__
    compute.__doc__ = f"VERL custom reward for the {fmt!r} format; see the module docstring."
    return compute


compute_score_ao = _verl_reward("ao")
compute_score_id = _verl_reward("id")
compute_score_id_c = _verl_reward("id_c")
compute_score_id_q = _verl_reward("id_q")
compute_score_r_judge = _verl_reward("r_judge")


def compute_score(data_source=None, solution_str=None, ground_truth=None, extra_info=None, **weights) -> float:
    """Dispatch on ``extra_info["format"]`` (default ``"ao"``): one reward entry for mixed data."""
    fmt = extra_info.get("format", "ao") if hasattr(extra_info, "get") else "ao"
    if fmt not in _COMPONENTS:
        logger.warning("unknown extra_info['format'] %r: scored with 'ao'", fmt)
        fmt = "ao"
    return reward_components(fmt, solution_str, ground_truth, extra_info, **weights)["score"]
