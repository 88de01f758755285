"""The synthetic long-context task generators (lckv.research.tasks): reproducible per seed, the
planted answers where each task says, lengths within 2% for the stories260K and SmolLM2
tokenizers, and the string-match scorers against hand-made cases."""
import re
from collections import Counter

import pytest

from lckv.research import tasks

SYNTHETIC = [t for t in tasks.available_tasks() if t != "niah_single_hotpotqa"]
NIAH = ["niah_single_repeat", "niah_multikey", "niah_multivalue", "niah_multiquery"]


@pytest.fixture(scope="module")
def stories_tokenizer(stories260k_files):
    from lckv.research.llama2c import load_tokenizer

    return load_tokenizer(stories260k_files[1])


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2):
    return smollm2[1]


def _n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _count(text, phrase):
    """Occurrences of ``phrase`` not glued to other letters or digits."""
    return len(re.findall(rf"(?<![0-9A-Za-z]){re.escape(phrase)}(?![0-9A-Za-z])", text))


# ----------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("task", SYNTHETIC + [pytest.param("niah_single_hotpotqa", marks=pytest.mark.data)])
def test_same_seed_same_sample_other_seed_other_sample(task, stories_tokenizer, request):
    if task == "niah_single_hotpotqa":
        request.getfixturevalue("hotpotqa_file")
    a = tasks.generate(task, stories_tokenizer, 1500, seed=11)
    b = tasks.generate(task, stories_tokenizer, 1500, seed=11)
    c = tasks.generate(task, stories_tokenizer, 1500, seed=12)
    assert (a.prompt, a.answers, a.answer_prefix, a.metadata) == (b.prompt, b.answers, b.answer_prefix, b.metadata)
    assert a.prompt != c.prompt
    assert set(a.answers) != set(c.answers)
    assert a.metadata["seed"] == 11 and c.metadata["seed"] == 12 and a.metadata["task"] == task


# ----------------------------------------------------------------------------- planted answers
@pytest.mark.parametrize("task", NIAH)
@pytest.mark.parametrize("words", ["auto", "pseudo"])
def test_needles_planted_once_and_asked_correctly(task, words, stories_tokenizer):
    for seed in range(3):
        s = tasks.generate(task, stories_tokenizer, 2000, seed=seed, words=words)
        needles = re.findall(r"A special magic number for (\S+) is (\d{7})\.", s.context)
        expected = {"niah_single_repeat": 1}.get(task, 4)
        assert len(needles) == expected, s.context[:500]
        for key, value in needles:
            assert _count(s.context, value) == 1
            assert _count(s.prompt, value) == 1  # the question does not give it away
        keys = [k for k, _ in needles]
        if task == "niah_multivalue":
            assert len(set(keys)) == 1 and sorted(s.answers) == sorted(v for _, v in needles)
            assert keys[0] in s.question
        elif task == "niah_multiquery":
            assert len(set(keys)) == 4 and sorted(s.answers) == sorted(v for _, v in needles)
            assert all(k in s.question for k in keys)
        else:
            asked = [k for k in keys if k in s.question]
            assert len(asked) == 1 and len(set(keys)) == len(keys)
            assert s.answers == [dict(needles)[asked[0]]]
            assert _count(s.context, asked[0]) == 1
        assert s.metric == "all"


def test_needle_depth_is_where_requested(stories_tokenizer):
    for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
        s = tasks.niah(stories_tokenizer, 3000, seed=4, depth=depth)
        value = s.answers[0]
        at = re.search(rf"A special magic number for \S+ is {value}\.", s.prompt).start()
        before = _n_tokens(stories_tokenizer, s.prompt[:at])
        total = _n_tokens(stories_tokenizer, s.prompt)
        # the needle goes to the sentence boundary nearest the depth of the filler (intro and question
        # are outside the filler: a few percent of the prompt)
        assert abs(before / total - depth) < 0.06, (depth, before / total)
        recorded = s.metadata["needles"][0]
        assert recorded["value"] == value and recorded["asked"]
        assert recorded["char"] == at and recorded["depth"] == pytest.approx(before / total)


def test_variable_tracking_chain(stories_tokenizer):
    for seed in range(3):
        s = tasks.variable_tracking(stories_tokenizer, 2000, seed=seed, num_chains=2, num_hops=3)
        value = re.search(r"hold the value (\d{5})", s.question).group(1)
        assert _count(s.context, value) == 1
        first = re.search(rf"VAR ([A-Z]{{5}}) = {value}\.", s.context).group(1)
        # follow the chain through the text independently of the generator's bookkeeping
        chain, position = [first], s.context.index(f"VAR {first} = {value}.")
        while True:
            nxt = re.search(rf"VAR ([A-Z]{{5}}) = VAR {chain[-1]}\.", s.context)
            if nxt is None:
                break
            assert nxt.start() > position  # statements appear in chain order
            chain.append(nxt.group(1))
            position = nxt.start()
        assert chain == s.answers and len(chain) == 4
        assert len(re.findall(r"VAR [A-Z]{5} = \d{5}\.", s.context)) == 2  # the distractor chain's root
        distractor = [v for v in re.findall(r"VAR [A-Z]{5} = (\d{5})\.", s.context) if v != value]
        assert len(distractor) == 1 and distractor[0] not in s.question


def test_common_words_counts(stories_tokenizer):
    for length, seed in ((700, 0), (4000, 1)):
        s = tasks.common_words(stories_tokenizer, length, seed=seed)
        entries = re.findall(r"^(\d+)\. (\S+)$", s.context, flags=re.M)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(w for _, w in entries)
        freq = s.metadata["common_freq"]
        assert len(s.answers) == 10 and all(counts[w] == freq for w in s.answers)
        others = [c for w, c in counts.items() if w not in s.answers]
        assert others and max(others) <= 3 < freq
    assert tasks.common_words(stories_tokenizer, 8000, seed=0).metadata["common_freq"] == 30


def test_frequent_words_top_is_strict(stories_tokenizer):
    for seed in range(3):
        s = tasks.frequent_words(stories_tokenizer, 2500, seed=seed)
        counts = Counter(s.context.split("\n\n", 1)[1].split())
        ranked = counts.most_common()
        assert {w for w, _ in ranked[:3]} == set(s.answers)
        assert ranked[2][1] > ranked[3][1]
        # Zipf with alpha 2: the top word holds about 1 / zeta(2) = 61% of the words
        assert 0.55 < ranked[0][1] / sum(counts.values()) < 0.65


# ----------------------------------------------------------------------------- lengths
LENGTHS = {"common_words": (1024, 4096), "frequent_words": (512, 4096)}


@pytest.mark.parametrize("task", SYNTHETIC + [pytest.param("niah_single_hotpotqa", marks=pytest.mark.data)])
def test_length_within_two_percent_stories260k(task, stories_tokenizer, request):
    if task == "niah_single_hotpotqa":
        request.getfixturevalue("hotpotqa_file")
    for length in LENGTHS.get(task, (512, 1500, 4096)):
        for seed in (0, 1):
            s = tasks.generate(task, stories_tokenizer, length, seed=seed)
            n = _n_tokens(stories_tokenizer, s.prompt)
            assert length * 0.98 <= n <= length, (task, length, n)
            assert s.metadata["n_tokens"] == n and s.metadata["length"] == length


@pytest.mark.parametrize("task", SYNTHETIC + [pytest.param("niah_single_hotpotqa", marks=pytest.mark.data)])
def test_length_within_two_percent_smollm2(task, smollm2_tokenizer, request):
    if task == "niah_single_hotpotqa":
        request.getfixturevalue("hotpotqa_file")
    for length in (1024, 8192):
        s = tasks.generate(task, smollm2_tokenizer, length, seed=3)
        n = _n_tokens(smollm2_tokenizer, s.prompt)
        assert length * 0.98 <= n <= length, (task, length, n)


def test_too_short_raises(stories_tokenizer):
    with pytest.raises(tasks.TaskTooShortError, match="more than the 40 requested"):
        tasks.generate("variable_tracking", stories_tokenizer, 40)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.generate("nope", stories_tokenizer, 1000)


def test_count_tokens_accepts_a_callable(stories_tokenizer):
    text = "The grass is green. The sky is blue."
    ids = stories_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tasks.count_tokens(lambda t: stories_tokenizer(t, add_special_tokens=False)["input_ids"], text) == len(ids)
    assert tasks.count_tokens(stories_tokenizer, text) == len(ids)


def test_largest_fitting_finds_the_boundary():
    cost = lambda n: 10 + 3 * n + (n // 7)  # noqa: E731  non-decreasing, not linear
    for target in (10, 11, 100, 2500, 99999):
        n = tasks.largest_fitting(cost, target, 40000)
        assert cost(n) <= target and (n == 40000 or cost(n + 1) > target)
    with pytest.raises(tasks.TaskTooShortError):
        tasks.largest_fitting(cost, 9, 100)


def test_pseudo_words_deterministic_and_distinct():
    a, b = tasks.pseudo_words(500, seed=1), tasks.pseudo_words(500, seed=1)
    assert a == b and len(set(a)) == 500 and all(w.isalpha() and w.islower() for w in a)
    assert tasks.pseudo_words(500, seed=2) != a


# ----------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("prediction, answers, metric, expected", [
    (" 4721365.", ["4721365"], "all", 1.0),
    ("The number is 47213650", ["4721365"], "all", 0.0),      # not on a digit boundary
    ("14721365", ["4721365"], "all", 0.0),
    ("1234567 and 7654321", ["1234567", "7654321", "1111111", "2222222"], "all", 0.5),
    ("PTERZ, yjdya and IVXYX", ["PTERZ", "YJDYA", "IVXYX", "NAFWL"], "all", 0.75),   # case-insensitive
    ("PTERZX", ["PTERZ"], "all", 0.0),
    ("nothing here", ["1234567", "7654321"], "any", 0.0),
    ("maybe 7654321", ["1234567", "7654321"], "any", 1.0),
    ("", ["1234567"], "all", 0.0),
])
def test_string_match_hand_made(prediction, answers, metric, expected):
    assert tasks.score(prediction, answers, metric) == expected


def test_score_rejects_unknown_metric():
    with pytest.raises(ValueError, match="metric must be one of"):
        tasks.score("x", ["x"], "subem")
