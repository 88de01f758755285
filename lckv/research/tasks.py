"""Synthetic long-context tasks at a requested token length (the categories of RULER).

Each generator takes a tokenizer, a target ``length`` in tokens and a ``seed`` and returns a
:class:`TaskSample`: the prompt (context, then the question), the gold answers, the prefix the
reply starts with, the scoring rule and metadata (task, length, seed, where the needles sit).
Nothing is downloaded: fillers are a repeated paragraph, real HotpotQA text from the shared data
(:mod:`lckv.research.data`) or word lists; English words come from the ``wonderwords`` package
when it is installed (its noun, adjective and verb lists), else from deterministic pseudo-words.

=========================  ===================================================================
``niah_single_repeat``     one needle ``A special magic number for <key> is <7 digits>.`` in
                           one paragraph repeated; asked for the number
``niah_single_hotpotqa``   the same in real text (HotpotQA paragraphs, ``../shared/data``)
``niah_multikey``          4 needles with different keys; asked for one key's number
``niah_multivalue``        4 needles with one key; asked for all its numbers
``niah_multiquery``        4 needles with different keys; asked for all 4 numbers
``variable_tracking``      ``VAR A = 12345.``, ``VAR B = VAR A.``, ... (4 hops) among filler;
                           asked for every variable that holds the value
``common_words``           a numbered word list: 10 words occur up to 30 times each, the others
                           at most 3 times; asked for the 10 common words
``frequent_words``         coded pseudo-words with Zipf counts (alpha 2); asked for the top 3
=========================  ===================================================================

Length: ``sample.prompt`` tokenises (no special tokens) to at most ``length`` tokens, and one
more filler unit (a word of filler, a list entry) would exceed it, so it lands within a few
tokens of the request. A length too short for the fixed parts raises :class:`TaskTooShortError`.
Chat markup is not counted: a harness that wraps the prompt asks for ``length`` minus its markup.

Reproducible: the same tokenizer, length, seed and options give the same sample (string seeds of
:class:`random.Random` do not depend on ``PYTHONHASHSEED``); the needles' keys and values, their
depths and the filler's start differ across seeds. A value the task plants exactly once (every
needle value, the tracked value) is checked to occur exactly once in the context.

Scoring: :func:`score` with the sample's ``metric``: ``"all"`` (RULER's rule: the fraction of
gold answers found in the reply) or ``"any"``; answers match case-insensitively on
alphanumeric boundaries (``1234567`` is not found in ``12345678``).

>>> from lckv.research.llama2c import load_tokenizer            # doctest: +SKIP
>>> tok = load_tokenizer("tok512.bin")                            # doctest: +SKIP
>>> s = generate("niah_single_repeat", tok, 1024, seed=0)         # doctest: +SKIP
>>> s.metadata["n_tokens"], s.answers                             # doctest: +SKIP
(1022, ['4721365'])
>>> score("The number is 4721365.", s.answers, s.metric)          # doctest: +SKIP
1.0
"""
from __future__ import annotations

import bisect
import functools
import math
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "TaskSample", "TaskTooShortError", "TASKS", "available_tasks", "generate", "count_tokens", "score",
    "string_match_all", "string_match_any", "english_words", "pseudo_words", "niah", "variable_tracking",
    "common_words", "frequent_words", "largest_fitting", "REPEATED_PARAGRAPH",
]

#: The filler of the passkey-retrieval test (Mohtashami and Jaggi, 2023), repeated.
REPEATED_PARAGRAPH = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                      "There and back again.")
HAYSTACKS = ("repeat", "hotpotqa")
VOCABULARIES = ("auto", "english", "pseudo")


class TaskTooShortError(ValueError):
    """The requested length cannot hold the task's fixed parts."""


@dataclass
class TaskSample:
    """One generated prompt and its gold answers.

    ``prompt`` is ``context + "\\n\\n" + question``; a reply is expected to continue
    ``answer_prefix`` (appended after the chat template's generation prompt). ``metric`` names the
    scorer (``"all"``, ``"any"``, or ``"subem"`` for QA built outside this module).
    """

    task: str
    context: str
    question: str
    answers: list[str]
    answer_prefix: str
    metric: str
    max_new_tokens: int
    metadata: dict = field(default_factory=dict)
    system: str | None = None

    @property
    def prompt(self) -> str:
        return f"{self.context}\n\n{self.question}"


# ----------------------------------------------------------------------------- tokens, scoring
def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` without special tokens, for a transformers tokenizer (including the
    llama2.c one of :func:`lckv.research.llama2c.load_tokenizer`), a ``tokenizers.Tokenizer``, or
    a callable ``text -> ids``."""
    encode = getattr(tokenizer, "encode", None)
    if encode is not None:
        try:
            ids = encode(text, add_special_tokens=False)
        except TypeError:
            ids = encode(text)
        return len(getattr(ids, "ids", ids))
    if callable(tokenizer):
        ids = tokenizer(text)
        return len(ids["input_ids"] if isinstance(ids, dict) else ids)
    raise TypeError(f"tokenizer must have encode() or be callable, got {type(tokenizer).__name__}")


def _found(prediction: str, answer: str) -> bool:
    pattern = rf"(?<![0-9a-z]){re.escape(answer.strip().lower())}(?![0-9a-z])"
    return bool(answer.strip()) and re.search(pattern, prediction.lower()) is not None


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` found in ``prediction`` (case-insensitive, on alphanumeric boundaries)."""
    if not answers:
        raise ValueError("answers is empty")
    return sum(_found(prediction, a) for a in answers) / len(answers)


def string_match_any(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any of ``answers`` is found in ``prediction``, else 0.0."""
    if not answers:
        raise ValueError("answers is empty")
    return float(any(_found(prediction, a) for a in answers))


_SCORERS = {"all": string_match_all, "any": string_match_any}


def score(prediction: str, answers: Sequence[str], metric: str = "all") -> float:
    """Score of one reply under ``metric`` (``"all"`` or ``"any"``), in [0, 1]."""
    if metric not in _SCORERS:
        raise ValueError(f"metric must be one of {sorted(_SCORERS)}, got {metric!r}")
    return _SCORERS[metric](prediction, answers)


def _occurrences(text: str, phrase: str) -> int:
    return len(re.findall(rf"(?<![0-9A-Za-z]){re.escape(phrase)}(?![0-9A-Za-z])", text))


# ----------------------------------------------------------------------------- vocabularies
@functools.lru_cache(maxsize=None)
def english_words() -> tuple[str, ...] | None:
    """Lowercase alphabetic nouns, adjectives and verbs (3-10 letters, profanity excluded) of the
    ``wonderwords`` package, sorted; None when it is not installed."""
    try:
        from importlib import resources

        assets = resources.files("wonderwords") / "assets"
        lists = {name: (assets / f"{name}.txt").read_text(encoding="utf-8").splitlines()
                 for name in ("nounlist", "adjectivelist", "verblist", "profanitylist")}
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    banned = {w.strip().lower() for w in lists.pop("profanitylist")}
    words = {w.strip() for lines in lists.values() for w in lines}
    return tuple(sorted(w for w in words if w.isalpha() and w.islower() and 3 <= len(w) <= 10 and w not in banned))


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "pl",
           "st", "tr", "sh", "ch")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou")


def pseudo_words(n: int, seed: int | str = 0, syllables: tuple[int, int] = (2, 3)) -> list[str]:
    """``n`` distinct pronounceable pseudo-words (``"drokamu"``), deterministic in ``seed``."""
    rng = random.Random(f"pseudo_words:{seed}")
    out, seen = [], set()
    while len(out) < n:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) for _ in range(rng.randint(*syllables)))
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out


def _vocabulary(words: str, at_least: int = 0) -> tuple[str, list[str]]:
    """``(name, word list)`` for ``words`` in :data:`VOCABULARIES`."""
    if words not in VOCABULARIES:
        raise ValueError(f"words must be one of {VOCABULARIES}, got {words!r}")
    english = english_words() if words in ("auto", "english") else None
    if words == "english" and english is None:
        raise ModuleNotFoundError("words='english' needs the wonderwords package: pip install wonderwords")
    if english is not None and len(english) >= at_least:
        return "english", list(english)
    return "pseudo", pseudo_words(max(at_least, 4096))


# ----------------------------------------------------------------------------- fillers
@functools.lru_cache(maxsize=4)
def _hotpotqa_sentences() -> tuple[tuple[str, ...], ...]:
    from lckv.research.data import hotpotqa_paragraphs

    return tuple(tuple(s for s in re.split(r"(?<=[.!?])\s+", p.strip()) if s) for p in hotpotqa_paragraphs())


def _filler_sentences(haystack: str, rng: random.Random, max_words: int) -> list[tuple[str, str]]:
    """At least ``max_words`` words of filler as ``[(sentence, separator after it)]``."""
    if haystack == "repeat":
        paragraphs = [tuple(re.split(r"(?<=\.)\s+", REPEATED_PARAGRAPH))]
        start = 0
    elif haystack == "hotpotqa":
        paragraphs = _hotpotqa_sentences()
        start = rng.randrange(len(paragraphs))
    else:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    out, words, i = [], 0, start
    while words < max_words:
        sentences = paragraphs[i % len(paragraphs)]
        for j, sentence in enumerate(sentences):
            out.append((sentence, "\n\n" if haystack == "hotpotqa" and j == len(sentences) - 1 else " "))
            words += len(sentence.split())
        i += 1
    return out


class _Filler:
    """Filler sentences cut to a number of words, with sentences planted at relative depths."""

    def __init__(self, sentences: list[tuple[str, str]]):
        self.sentences = sentences
        self.ends = []  # cumulative word count at the end of each sentence
        total = 0
        for sentence, _ in sentences:
            total += len(sentence.split())
            self.ends.append(total)

    @property
    def max_words(self) -> int:
        return self.ends[-1]

    @staticmethod
    def _nearest(bounds: list[int], offset: float) -> int:
        j = bisect.bisect_left(bounds, offset)
        return min((b for b in (j - 1, j) if 0 <= b < len(bounds)), key=lambda b: abs(bounds[b] - offset))

    def text(self, n_words: int, planted: Sequence[tuple[float, str]] = ()) -> str:
        """The first ``n_words`` words of filler (the last sentence cut), with each ``(depth,
        sentence)`` of ``planted`` inserted at the sentence boundary nearest ``depth`` of the
        words (in order when several share a boundary)."""
        n_full = bisect.bisect_right(self.ends, n_words)
        items = list(self.sentences[:n_full])
        cut = n_words - (self.ends[n_full - 1] if n_full else 0)
        if cut > 0:
            items.append((" ".join(self.sentences[n_full][0].split()[:cut]), " "))
        # word offset of boundary b (before item b), b = 0 .. len(items)
        bounds = [0] + self.ends[:max(len(items) - 1, 0)] + ([n_words] if items else [])
        at = sorted((self._nearest(bounds, depth * n_words), order, sentence)
                    for order, (depth, sentence) in enumerate(planted))
        for boundary, _, sentence in reversed(at):
            items.insert(boundary, (sentence, " "))
        return "".join(s + sep for s, sep in items).strip()


def largest_fitting(measure: Callable[[int], int], target: int, hi: int) -> int:
    """Largest ``n`` in ``[0, hi]`` with ``measure(n) <= target`` for a non-decreasing ``measure``
    (interpolation steps alternating with bisection). Raises :class:`TaskTooShortError` when even
    ``measure(0)`` exceeds ``target``."""
    lo, lo_v = 0, measure(0)
    if lo_v > target:
        raise TaskTooShortError(f"the task's fixed parts take {lo_v} tokens, more than the {target} requested")
    hi_v = measure(hi)
    if hi_v <= target:
        return hi
    step = 0
    while hi - lo > 1:
        if step % 2 == 0:
            guess = lo + round((target - lo_v) * (hi - lo) / max(hi_v - lo_v, 1))
        else:
            guess = (lo + hi) // 2
        guess = min(max(guess, lo + 1), hi - 1)
        value = measure(guess)
        if value <= target:
            lo, lo_v = guess, value
        else:
            hi, hi_v = guess, value
        step += 1
    return lo


def _depth_in_tokens(tokenizer, prompt: str, phrase: str, n_tokens: int) -> dict:
    char = prompt.index(phrase)
    return {"char": char, "depth": count_tokens(tokenizer, prompt[:char]) / n_tokens}


def _finish(tokenizer, length: int, seed: int, task: str, build: Callable[[int], TaskSample], hi: int,
            metadata: dict) -> TaskSample:
    """Fits ``build(n)`` (``n`` filler units) to ``length`` tokens and records the metadata."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    n = largest_fitting(lambda k: count_tokens(tokenizer, build(k).prompt), length, hi)
    sample = build(n)
    sample.metadata = {"task": task, "length": length, "n_tokens": count_tokens(tokenizer, sample.prompt),
                       "seed": seed, "filler_units": n, **metadata, **sample.metadata}
    return sample


# ----------------------------------------------------------------------------- needle in a haystack
_NIAH_INTRO = ("The text below hides some special magic numbers. Read it carefully and remember them: "
               "you will be asked about them afterwards.")
_NIAH_KINDS = ("single", "multikey", "multivalue", "multiquery")


def _distinct(draw: Callable[[], str], n: int, avoid: set[str] = frozenset()) -> list[str]:
    """``n`` distinct draws, none in ``avoid``."""
    out: list[str] = []
    while len(out) < n:
        item = draw()
        if item not in out and item not in avoid:
            out.append(item)
    return out


def niah(tokenizer, length: int, seed: int = 0, *, kind: str = "single", haystack: str = "repeat",
         num_needles: int = 4, depth: float | None = None, words: str = "auto") -> TaskSample:
    """Needle in a haystack.

    ``kind``: ``"single"`` (one needle), ``"multikey"`` (``num_needles`` keys, one asked),
    ``"multivalue"`` (``num_needles`` values of one key, all asked), ``"multiquery"``
    (``num_needles`` keys, all asked). Keys are ``word-word`` pairs, values distinct 7-digit
    numbers, each value planted exactly once. The asked needle of ``single``/``multikey`` sits at
    relative depth ``depth`` (seeded uniform in [0, 1] when None); the other needles at seeded
    uniform depths. ``metadata["needles"]`` lists each needle's key, value, character offset in
    the prompt, token depth (tokens before it / prompt tokens) and whether it is asked.
    """
    if kind not in _NIAH_KINDS:
        raise ValueError(f"kind must be one of {_NIAH_KINDS}, got {kind!r}")
    if kind != "single" and num_needles < 2:
        raise ValueError(f"num_needles must be >= 2 for kind {kind!r}, got {num_needles}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    task = f"niah_{kind}" + (f"_{haystack}" if kind == "single" else "")
    rng = random.Random(f"{task}:{seed}")
    vocabulary, vocab = _vocabulary(words)
    n = 1 if kind == "single" else num_needles
    keys = _distinct(lambda: f"{rng.choice(vocab)}-{rng.choice(vocab)}", 1 if kind == "multivalue" else n)
    values = _distinct(lambda: str(rng.randrange(1_000_000, 10_000_000)), n)
    needle_keys = keys * n if kind == "multivalue" else keys
    depths = [rng.random() for _ in range(n)]
    if depth is not None and kind in ("single", "multikey"):
        depths[0] = depth
    asked = [0] if kind in ("single", "multikey") else list(range(n))
    filler = _Filler(_filler_sentences(haystack, rng, length))
    planted = [(d, f"A special magic number for {k} is {v}.") for d, k, v in zip(depths, needle_keys, values)]
    if kind in ("single", "multikey"):
        question = f"What is the special magic number for {keys[0]} mentioned in the text above?"
        prefix = f"The special magic number for {keys[0]} mentioned in the text above is"
    elif kind == "multivalue":
        question = f"What are all the special magic numbers for {keys[0]} mentioned in the text above?"
        prefix = f"The special magic numbers for {keys[0]} mentioned in the text above are"
    else:
        listed = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        question = f"What are the special magic numbers for {listed} mentioned in the text above?"
        prefix = f"The special magic numbers for {listed} mentioned in the text above are"

    def build(n_words: int) -> TaskSample:
        context = f"{_NIAH_INTRO}\n\n{filler.text(n_words, planted)}"
        return TaskSample(task, context, question, [values[i] for i in asked], prefix, "all",
                          24 if len(asked) == 1 else 16 * len(asked))

    sample = _finish(tokenizer, length, seed, task, build, filler.max_words,
                     {"vocabulary": vocabulary, "haystack": haystack})
    for value in values:  # a filler that happens to hold a value would make the answer ambiguous
        if _occurrences(sample.context, value) != 1:
            raise RuntimeError(f"{task} seed {seed}: value {value} occurs "
                               f"{_occurrences(sample.context, value)} times in the context")
    sample.metadata["needles"] = [
        {"key": k, "value": v, "asked": i in asked,
         **_depth_in_tokens(tokenizer, sample.prompt, text, sample.metadata["n_tokens"])}
        for i, ((_, text), k, v) in enumerate(zip(planted, needle_keys, values))]
    return sample


# ----------------------------------------------------------------------------- variable tracking
def variable_tracking(tokenizer, length: int, seed: int = 0, *, num_chains: int = 1, num_hops: int = 4,
                      haystack: str = "repeat") -> TaskSample:
    """Variable tracking: chain ``c`` is ``VAR X0 = <5 digits>.``, then ``VAR X1 = VAR X0.``, ...
    up to ``X<num_hops>``, its statements in order at seeded depths of the filler. Chain 0 is
    asked: the answers are its ``num_hops + 1`` names (5 capital letters); the other chains hold
    other values (distractors). Each value occurs exactly once. ``metadata["statements"]`` gives
    each statement's chain, character offset and token depth."""
    if num_chains < 1 or num_hops < 1:
        raise ValueError(f"num_chains and num_hops must be >= 1, got {num_chains} and {num_hops}")
    task = "variable_tracking"
    rng = random.Random(f"{task}:{seed}")
    names = _distinct(lambda: "".join(rng.choice(string.ascii_uppercase) for _ in range(5)),
                      num_chains * (num_hops + 1), avoid={"VAR"})
    values = _distinct(lambda: str(rng.randrange(10_000, 100_000)), num_chains)
    chains = [names[c * (num_hops + 1):(c + 1) * (num_hops + 1)] for c in range(num_chains)]
    planted, owner = [], []
    for c, chain in enumerate(chains):
        statements = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        for d, statement in zip(sorted(rng.random() for _ in statements), statements):
            planted.append((d, statement))
            owner.append(c)
    filler = _Filler(_filler_sentences(haystack, rng, length))
    question = f"Which variables in the text above hold the value {values[0]}? Name every one of them."
    prefix = f"The variables that hold the value {values[0]} are:"
    intro = ("Remember the variable assignments in the text below. A variable is assigned either a number "
             "or the value of another variable.")

    def build(n_words: int) -> TaskSample:
        return TaskSample(task, f"{intro}\n\n{filler.text(n_words, planted)}", question, list(chains[0]), prefix,
                          "all", 8 * (num_hops + 1))

    sample = _finish(tokenizer, length, seed, task, build, filler.max_words,
                     {"haystack": haystack, "num_chains": num_chains, "num_hops": num_hops})
    for value in values:
        if _occurrences(sample.context, value) != 1:
            raise RuntimeError(f"{task} seed {seed}: value {value} occurs "
                               f"{_occurrences(sample.context, value)} times in the context")
    sample.metadata["statements"] = [
        {"chain": c, "text": text, **_depth_in_tokens(tokenizer, sample.prompt, text, sample.metadata["n_tokens"])}
        for (_, text), c in zip(planted, owner)]
    return sample


# ----------------------------------------------------------------------------- word extraction
def _estimate_tokens_per_entry(tokenizer, entries: Sequence[str]) -> float:
    probe = "\n".join(f"{i}. {w}" for i, w in enumerate(entries[:200], 1))
    return count_tokens(tokenizer, probe) / max(1, min(len(entries), 200))


def common_words(tokenizer, length: int, seed: int = 0, *, num_common: int = 10, common_freq: int = 30,
                 uncommon_freq: int = 3, words: str = "auto") -> TaskSample:
    """Common-words extraction: a numbered list in which ``num_common`` words occur ``f`` times
    each and every other word at most ``uncommon_freq`` times; the answers are the common words.

    ``f`` is ``common_freq`` when the common words take at most half of the length, else lowered
    (down to ``uncommon_freq + 1``) until they do; ``metadata["common_freq"]`` records it. The
    list grows by one uncommon entry per filler unit."""
    if not 1 <= uncommon_freq < common_freq:
        raise ValueError(f"need 1 <= uncommon_freq < common_freq, got {uncommon_freq} and {common_freq}")
    task = "common_words"
    rng = random.Random(f"{task}:{seed}")
    # an entry ("12. word" and a line break) takes >= 2 tokens: length // 2 entries exceed the length
    needed = num_common + length // (2 * uncommon_freq) + 1
    vocabulary, vocab = _vocabulary(words, at_least=needed)
    pool = rng.sample(vocab, needed)
    common, uncommon = pool[:num_common], pool[num_common:]
    intro = "Below is a numbered list of words. Some words occur more often than others: remember which."
    question = f"What are the {num_common} most common words in the list above?"
    prefix = f"The {num_common} most common words in the list are:"
    per_entry = _estimate_tokens_per_entry(tokenizer, pool)
    room = (length - count_tokens(tokenizer, f"{intro}\n\n\n\n{question}")) / per_entry
    freq = min(common_freq, max(uncommon_freq + 1, int(room / (2 * num_common))))

    def build(n_uncommon: int) -> TaskSample:
        entries = [w for w in common for _ in range(freq)]
        entries += [uncommon[i // uncommon_freq] for i in range(n_uncommon)]
        random.Random(f"{task}:{seed}:order").shuffle(entries)
        listing = "\n".join(f"{i}. {w}" for i, w in enumerate(entries, 1))
        return TaskSample(task, f"{intro}\n\n{listing}", question, list(common), prefix, "all", 12 * num_common)

    hi = len(uncommon) * uncommon_freq
    return _finish(tokenizer, length, seed, task, build, hi,
                   {"vocabulary": vocabulary, "common_freq": freq, "uncommon_freq": uncommon_freq})


def frequent_words(tokenizer, length: int, seed: int = 0, *, num_answers: int = 3, alpha: float = 2.0) -> TaskSample:
    """Frequent-words extraction over coded (pseudo) words: with ``N`` words in the text, the word
    of rank ``i`` occurs ``floor(N i^-alpha / H)`` times (``H = sum_i i^-alpha``), the remainder
    as words occurring once; the answers are the ``num_answers`` most frequent words, whose counts
    are checked to be strictly above every other word's. ``metadata["counts"]`` holds the counts of
    the top ``num_answers + 1`` ranks."""
    if num_answers < 1 or alpha <= 0:
        raise ValueError(f"need num_answers >= 1 and alpha > 0, got {num_answers} and {alpha}")
    task = "frequent_words"
    rng = random.Random(f"{task}:{seed}")
    vocab = pseudo_words(length + 64, seed=f"{task}:{seed}", syllables=(1, 3))
    rng.shuffle(vocab)
    intro = "Below is a text of coded words. Keep count of how often each coded word occurs."
    question = f"What are the {num_answers} most frequent coded words in the text above?"
    prefix = f"The {num_answers} most frequent coded words are:"

    def counts(n: int) -> list[int]:
        harmonic = sum(i ** -alpha for i in range(1, n + 1))
        out = [math.floor(n * i ** -alpha / harmonic) for i in range(1, n + 1)]
        out = [c for c in out if c > 0]
        return out + [1] * (n - sum(out))

    def build(n: int) -> TaskSample:
        c = counts(n)
        entries = [vocab[i] for i, k in enumerate(c) for _ in range(k)]
        random.Random(f"{task}:{seed}:order").shuffle(entries)
        sample = TaskSample(task, f"{intro}\n\n{' '.join(entries)}", question, vocab[:num_answers], prefix, "all",
                            8 * num_answers)
        sample.metadata["counts"] = c[:num_answers + 1]
        return sample

    sample = _finish(tokenizer, length, seed, task, build, length, {"vocabulary": "pseudo", "alpha": alpha})
    c = sample.metadata["counts"]
    if len(c) <= num_answers or c[num_answers - 1] <= c[num_answers]:
        raise TaskTooShortError(f"{task}: {length} tokens hold too few words for a strict top {num_answers} "
                                f"(counts {c})")
    return sample


# ----------------------------------------------------------------------------- registry
TASKS: dict[str, Callable[..., TaskSample]] = {
    "niah_single_repeat": functools.partial(niah, kind="single", haystack="repeat"),
    "niah_single_hotpotqa": functools.partial(niah, kind="single", haystack="hotpotqa"),
    "niah_multikey": functools.partial(niah, kind="multikey"),
    "niah_multivalue": functools.partial(niah, kind="multivalue"),
    "niah_multiquery": functools.partial(niah, kind="multiquery"),
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
}


def available_tasks() -> list[str]:
    return list(TASKS)


def generate(task: str, tokenizer, length: int, seed: int = 0, **options) -> TaskSample:
    """The sample of ``task`` (a name of :data:`TASKS`) at ``length`` tokens for ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    return TASKS[task](tokenizer, length, seed, **options)
