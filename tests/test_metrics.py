"""Metrics against cases worked out by hand from the official evaluators' rules (see each module)."""

import doctest
import importlib
import inspect
import math

import pytest

import meteor.eval.metrics
from meteor.eval.metrics import (anls, evalai_normalize, exact_match, extract_choice, mmbench_can_infer,
                            pope_answer, pope_scores, relaxed_accuracy, textvqa_accuracy, vqa_accuracy,
                            vqa_normalize)
from meteor.eval.metrics import chartqa, choice, gqa, pope, vqa

anls_module = importlib.import_module("meteor.eval.metrics.anls")   # the package's `anls` is the function


def test_docstring_examples_hold():
    for module in (vqa, pope):
        failed, _ = doctest.testmod(module)
        assert failed == 0, module.__name__


EXPORTED = {"vqa_accuracy": vqa, "textvqa_accuracy": vqa, "vqa_normalize": vqa, "evalai_normalize": vqa,
            "anls": anls_module, "relaxed_accuracy": chartqa, "exact_match": gqa, "pope_scores": pope,
            "pope_answer": pope, "extract_choice": choice, "mmbench_can_infer": choice}
"""Each metric the package exports → the module that defines it."""


def test_package_exports_every_metric():
    for name, module in EXPORTED.items():
        exported = getattr(meteor.eval.metrics, name)
        assert exported is getattr(module, name), name                   # the submodule's own function,
        assert exported.__module__ == module.__name__, name               # defined there, not re-wrapped
        assert name in meteor.eval.metrics.__all__, name
    assert set(meteor.eval.metrics.__all__) == set(EXPORTED) | {"BENCHMARKS"}
    assert meteor.eval.metrics.BENCHMARKS is choice.BENCHMARKS
    # and no public function of a metric module is left out of the package
    for module in set(EXPORTED.values()):
        public = {name for name, value in vars(module).items() if inspect.isfunction(value)
                  and value.__module__ == module.__name__ and not name.startswith("_")}
        assert public <= set(EXPORTED), (module.__name__, public - set(EXPORTED))


# --- VQA normalisation (vqaEval.py processPunctuation + processDigitArticle) ------------------

@pytest.mark.parametrize("answer, normalised", [
    ("Two", "2"),                    # number words, after lower-casing
    ("two dogs", "2 dogs"),
    ("ten", "10"),
    ("eleven", "eleven"),            # the map stops at ten
    ("twofold", "twofold"),          # whole words only
    ("none", "0"),                   # "none" is a number word for the evaluator
    ("a dog", "dog"),                # articles dropped
    ("An apple", "apple"),
    ("the dog", "dog"),
    ("a-b", "b"),                    # "-" becomes a space, then "a" is an article
    ("Dont", "don't"),               # contractions restored
    ("isnt", "isn't"),
    ("Im", "im"),                    # the map's key is "Im": never matches after lower-casing
    ("somebody'd", "somebodyd"),     # the map's one backwards entry
    ("it's", "it's"),                # "'" is not a punctuation mark for the evaluator
    ("12:30", "12:30"),              # nor is ":"
    ("1.5", "1.5"),                  # a period before a digit stays
    ("1.5.", "1.5"),
    ("5.", "5"),
    ("U.S.", "us"),
    ("yes.", "yes"),
    ("1,000", "1000"),               # digit-comma-digit: every mark deleted, not spaced
    ("10,000 people", "10000 people"),
    ("red, white", "red white"),     # "," touches a space: deleted
    ("red,white", "red white"),      # "," touches no space: becomes a space
    ("e-mail", "e mail"),
    ("e-mail - x", "email x"),       # one "-" touches a space, so every "-" is deleted
    ("e-mail 1,000", "email 1000"),  # a digit-comma-digit anywhere deletes every mark
    ("hello!world", "hello world"),
    ("what?", "what"),
    ("  Yes\n", "yes"),
    ("x." * 40, "x" * 32 + "x." * 8),  # only the first 32 periods go (re.UNICODE passed as count)
])
def test_vqa_normalize_follows_the_official_evaluator(answer, normalised):
    assert vqa_normalize(answer) == normalised


@pytest.mark.parametrize("answer, normalised", [
    ("It's", "it 's"),               # "'s" split off first
    ("1,000", "1000"),
    ("what?", "what"),
    ("Coca-Cola", "coca cola"),
    ("Two.", "2"),
    ("1,5 a-b", "15 b"),             # commas gone first, so "-" is only spaced
])
def test_evalai_normalize_tokenises_before_the_vqa_rules(answer, normalised):
    assert evalai_normalize(answer) == normalised


def test_the_two_normalisations_differ_where_commas_meet_digits():
    assert vqa_normalize("1,5 a-b") == "15 ab"
    assert evalai_normalize("1,5 a-b") == "15 b"


# --- VQA accuracy (leave-one-out over the human answers) --------------------------------------

@pytest.mark.parametrize("agreeing, expected", [(1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (9, 1.0)])
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(agreeing, expected):
    # With 3 matches: 3 subsets keep 2 (2/3 each), 7 keep 3 (1 each): (2 + 7) / 10 = 0.9.
    answers = ["2"] * agreeing + ["3"] * (10 - agreeing)
    assert vqa_accuracy("two", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_of_a_prediction_no_human_gave_is_zero():
    assert vqa_accuracy("4", ["2"] * 5 + ["3"] * 5) == 0.0


@pytest.mark.parametrize("prediction, expected", [
    ("yes", 1.0),
    (" yes\n", 1.0),   # tabs/newlines and outer spaces always go
    ("Yes", 0.0),      # unanimous humans: nothing is normalised, case counts
    ("yes.", 0.0),
    ("two", 0.0),
])
def test_vqa_accuracy_skips_normalisation_when_all_humans_agree(prediction, expected):
    answers = ["2"] * 10 if prediction == "two" else ["yes"] * 10
    assert vqa_accuracy(prediction, answers) == expected


def test_normalising_the_prediction_first_reproduces_llavas_submission():
    assert vqa_accuracy(vqa_normalize("Yes."), ["yes"] * 10) == 1.0
    assert vqa_accuracy(evalai_normalize("Two."), ["2"] * 10) == 1.0


def test_vqa_accuracy_normalises_both_sides_when_humans_disagree():
    answers = ["the dog"] * 4 + ["dogs"] * 6
    assert vqa_accuracy("Dog", answers) == 1.0   # "the dog" → "dog" and "Dog" → "dog"
    assert vqa_accuracy("a cat", answers) == 0.0


def test_vqa_accuracy_with_fewer_than_ten_answers():
    assert vqa_accuracy("cat", ["cat"] * 3) == pytest.approx(2 / 3)
    # k=2 of n=4: two subsets keep 1 match (1/3), two keep 2 (2/3): (2/3 + 4/3) / 4 = 0.5.
    assert vqa_accuracy("cat", ["cat", "cat", "dog", "dog"]) == pytest.approx(0.5)


def test_vqa_accuracy_refuses_a_single_answer_and_wrong_types():
    with pytest.raises(ValueError, match="single human answer"):
        vqa_accuracy("cat", ["cat"])
    with pytest.raises(ValueError, match="at least 1"):
        vqa_accuracy("cat", [])
    with pytest.raises(TypeError, match="answers must be a list of str"):
        vqa_accuracy("cat", "cat")
    with pytest.raises(TypeError, match=r"answers\[1\]"):
        vqa_accuracy("2", ["2", 2])
    with pytest.raises(TypeError, match="prediction must be a str"):
        vqa_accuracy(None, ["cat", "cat"])


def test_textvqa_accuracy_always_normalises_both_sides():
    assert textvqa_accuracy("Coca-Cola", ["coca cola"] * 10) == 1.0
    assert vqa_accuracy("Coca-Cola", ["coca cola"] * 10) == 0.0
    assert textvqa_accuracy("It's open", ["it's open"] * 10) == 1.0
    assert textvqa_accuracy("STOP.", ["stop"] * 3 + ["go"] * 7) == pytest.approx(0.9, abs=1e-12)
    with pytest.raises(ValueError, match="single human answer"):
        textvqa_accuracy("stop", ["stop"])


# --- ANLS (RRC DocVQA / InfographicVQA script) ------------------------------------------------

@pytest.mark.parametrize("prediction, answers, expected", [
    ("abcd", ["abef"], 0.5),               # similarity exactly at the threshold is kept
    ("abcdefghi", ["abcdexxxx"], 5 / 9),   # just above
    ("abcdefghi", ["abcdxxxxx"], 0.0),     # 4/9, just below: zero
    ("abcd", ["abcx"], 0.75),
    ("kitten", ["sitting"], 1 - 3 / 7),    # Levenshtein 3
    ("Hello World", ["hello world"], 1.0),  # case-insensitive
    ("new  york", ["New York"], 1.0),      # whitespace runs squashed
    ("  abcd  ", ["abef"], 0.75),          # but the denominator is the raw length: 1 - 2/8
    ("abcd", ["zzzz", "abcd"], 1.0),       # best answer wins
    ("abcd", ["abxx", "abcx"], 0.75),
    ("", [""], 1.0),
    ("abc", [""], 0.0),
])
def test_anls(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_anls_threshold_is_a_parameter_and_is_checked():
    assert anls("abcd", ["abef"], threshold=0.6) == 0.0
    assert anls("abcdefghi", ["abcdxxxxx"], threshold=0.4) == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match="threshold"):
        anls("abcd", ["abcd"], threshold=1.5)
    with pytest.raises(TypeError, match="answers must be a list of str"):
        anls("7", "17")
    with pytest.raises(ValueError, match="at least 1"):
        anls("7", [])


# --- ChartQA relaxed accuracy (pix2struct relaxed_correctness) --------------------------------

@pytest.mark.parametrize("prediction, target, expected", [
    ("105", "100", 1.0),        # exactly 5% above
    ("95", "100", 1.0),         # exactly 5% below
    ("105.1", "100", 0.0),      # 5.1%
    ("94.9", "100", 0.0),
    ("-105", "-100", 1.0),      # relative to |target|
    ("1.04", "1", 1.0),
    ("1.05", "1", 0.0),         # float arithmetic: 0.050000000000000044 > 0.05
    (" 100 ", "100", 1.0),      # float() accepts surrounding spaces
    ("45%", "45%", 1.0),
    ("0.45", "45%", 1.0),       # "45%" is 0.45
    ("45", "45%", 0.0),
    ("45%", "45", 0.0),
    ("46%", "45%", 1.0),        # 0.01 / 0.45 = 2.2%
    ("47.5%", "45%", 0.0),      # 0.025 / 0.45 = 5.6%
    ("0", "0", 1.0),            # zero target: falls back to string equality
    ("0.0", "0", 0.0),
    ("0.01", "0", 0.0),
    ("0", "0%", 0.0),
    ("0%", "0%", 1.0),
    ("Yes", "yes", 1.0),        # non-numeric: case-insensitive equality
    ("yes ", "yes", 0.0),       # but no stripping
    ("1,000", "1000", 0.0),     # "1,000" is not a number: string comparison fails
    ("1000", "1,000", 0.0),
])
def test_relaxed_accuracy(prediction, target, expected):
    assert relaxed_accuracy(prediction, target) == expected


def test_relaxed_accuracy_tolerance_is_a_parameter_and_is_checked():
    assert relaxed_accuracy("110", "100", tolerance=0.1) == 1.0
    assert relaxed_accuracy("110", "100") == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        relaxed_accuracy("1", "1", tolerance=-0.1)
    with pytest.raises(TypeError, match="target must be a str"):
        relaxed_accuracy("1", 1)


# --- GQA exact match (LLaVA: strip, rstrip('.'), lower; eval.py: ==) --------------------------

@pytest.mark.parametrize("prediction, answer, expected", [
    ("yes", "yes", 1.0),
    ("Yes.", "yes", 1.0),
    ("  Yes. ", "yes", 1.0),
    ("yes..", "yes", 1.0),
    ("yes .", "yes", 0.0),       # the space before the period survives
    ("dog!", "dog", 0.0),
    ("The dog", "dog", 0.0),
    ("yes", "Yes", 0.0),         # the gold side is not touched
])
def test_exact_match(prediction, answer, expected):
    assert exact_match(prediction, answer) == expected


# --- POPE (RUCAIBox/POPE evaluate.py) ---------------------------------------------------------

@pytest.mark.parametrize("text, read", [
    ("No, there is not a dog.", "no"),
    ("Yes, there is a cat. No other animals.", "yes"),  # only the first sentence counts
    ("There is not.", "no"),
    ("yes", "yes"),
    ("No", "no"),
    ("There is no dog in the image.", "no"),
    ("Yes, but not a dog.", "no"),           # "not" anywhere in the first sentence
    ("Not really", "yes"),                   # "Not" is not in the list
    ("NO", "yes"),
    ("no!", "yes"),
    ("isn't", "yes"),
    ("", "yes"),
    ("The answer is 2.5, no", "yes"),        # cut at the first "." even inside a number
    ("yes\nno", "yes"),                      # split on spaces only
])
def test_pope_answer(text, read):
    assert pope_answer(text) == read


def test_pope_scores():
    predictions = ["Yes", "yes", "Yes, there is.", "No", "no", "There is not."]
    labels = ["yes", "yes", "no", "no", "yes", "yes"]
    # read yes,yes,yes,no,no,no → TP 2, FP 1, TN 1, FN 2
    scores = pope_scores(predictions, labels)
    assert scores == pytest.approx({"accuracy": 0.5, "precision": 2 / 3, "recall": 0.5,
                                    "f1": 4 / 7, "yes_ratio": 0.5})


def test_pope_scores_are_nan_where_the_official_script_divides_by_zero():
    scores = pope_scores(["no", "No"], ["yes", "no"])
    assert math.isnan(scores["precision"]) and math.isnan(scores["f1"])
    assert (scores["recall"], scores["accuracy"], scores["yes_ratio"]) == (0.0, 0.5, 0.0)


def test_pope_scores_refuse_bad_labels_and_lengths():
    with pytest.raises(ValueError, match=r"labels\[1\] must be 'yes' or 'no'.*'Yes'"):
        pope_scores(["yes", "no"], ["yes", "Yes"])
    with pytest.raises(ValueError, match="2 predictions and 1 labels"):
        pope_scores(["yes", "no"], ["yes"])
    with pytest.raises(ValueError, match="at least 1"):
        pope_scores([], [])


# --- MMBench (VLMEvalKit can_infer) vs MMMU (parse_multi_choice_response) ---------------------

OPTIONS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("prediction, by_mmbench, by_mmmu", [
    ("B", "B", "B"),
    ("B.", "B", "B"),
    ("(B)", "B", "B"),
    ("The answer is B.", "B", "B"),
    ("Answer: B", "B", "B"),
    ("A cat.", "A", "A"),                            # "A" read as a letter by both
    ("I think it is a bird", "C", "C"),              # "I" is no option; texts searched (6 words)
    ("**B**", "B", None),                            # "*" is a separator only for MMBench
    ("B\n", "B", None),                              # MMMU strips no whitespace: " B\n " ≠ " B "
    ("A,.", "A", None),                              # MMMU strips "," then ".": "A," is left
    ("A.,", "A", "A"),
    ("(B) because A is wrong", None, "B"),           # two letter-words vs one bracketed letter
    ("A, B", None, "B"),                             # only " B " stands between spaces
    ("C is more likely than D", None, "D"),          # MMMU: the last occurrence wins
    ("(A) or (B)", None, "B"),
    ("The cat", "B", None),                          # MMMU searches option texts only past 5 words
    ("It is probably a dog or a cat, most likely a cat", None, "B"),  # two texts; last wins
    ("Cannot determine the answer, maybe B", None, "B"),  # MMBench: a refusal ("Z")
    ("Z", None, None),
    ("E", None, None),                               # not an option
    ("b", None, None),                               # letters are case-sensitive
])
def test_mmbench_and_mmmu_rules(prediction, by_mmbench, by_mmmu):
    assert extract_choice(prediction, OPTIONS, "mmbench") == by_mmbench
    assert extract_choice(prediction, OPTIONS, "mmmu") == by_mmmu


def test_mmmu_breaks_ties_by_option_order_and_mmbench_gives_up():
    same_text = {"A": "cat", "B": "cat"}
    assert extract_choice("I am sure that it is a cat", same_text, "mmmu") == "A"
    assert extract_choice("I am sure that it is a cat", same_text, "mmbench") is None


def test_mmbench_skips_the_letter_rules_after_an_api_failure():
    assert extract_choice("Oops. B", OPTIONS, "mmbench") == "B"
    assert extract_choice("Failed to obtain answer via API. B", OPTIONS, "mmbench") is None


@pytest.mark.parametrize("answer, read_as", [
    ("B", "B"),
    ("Cannot determine the answer, maybe B", "Z"),   # a refusal: decided, counted wrong, not judged
    ("Z", "Z"),                                      # the judge's "none of the options"
    ("The answer is Z.", "Z"),
    ("Z or B", "B"),                                 # a real option letter comes first
    ("no idea", None),                               # undecided: where the GPT judge is asked
    ("B or C", None),
])
def test_mmbench_can_infer_tells_a_refusal_from_an_undecided_answer(answer, read_as):
    assert mmbench_can_infer(answer, OPTIONS) == read_as
    assert extract_choice(answer, OPTIONS, "mmbench") == (read_as if read_as != "Z" else None)


# VLMEvalKit's vlmeval/utils/matching_util.py at e8e78f05, line numbers in choice.py's comments.
@pytest.mark.parametrize("answer, read_as", [
    ("B is it", "B"),                                # four tokens or fewer: the letter counts anywhere
    ("So B is my answer", "B"),                      # 4th token from the end: counted (line 52)
    ("B is my final answer", None),                  # 5th from the end: not counted, nothing else reads
    ("B, I pick it as answer", None),
    ("B. The dog chases it away", "A"),              # the letter too early: the option text decides
    ("Option B looks right, but I am not sure at all", None),
    ("B B B is my final answer", None),              # the first occurrence is the one placed
])
def test_mmbench_counts_a_lone_letter_only_among_the_answers_last_four_tokens(answer, read_as):
    assert mmbench_can_infer(answer, OPTIONS) == read_as


@pytest.mark.parametrize("answer", [
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided I cannot say. B",
    "Cannot determine the answer",
    "B. Cannot determine the answer",                 # the refusal wins over a readable letter
])
def test_mmbench_reads_the_four_refusal_phrases_as_z(answer):
    assert mmbench_can_infer(answer, OPTIONS) == "Z"
    assert extract_choice(answer, OPTIONS, "mmbench") is None


# can_infer_option's refusal list in VLMEvalKit's vlmeval/utils/matching_util.py at e8e78f05 (lines
# 24-27; the same four phrases in vlmeval/dataset/utils/corecognition.py), written out here from
# that source, not read from meteor's code: an answer holding one of them is option "Z".
VLMEVALKIT_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                       "I'm sorry, but without the image provided", "Cannot determine the answer")


def test_the_rule_stage_knows_exactly_vlmevalkits_refusal_phrases():
    assert set(choice._MMBENCH_REFUSALS) == set(VLMEVALKIT_REFUSALS)


@pytest.mark.parametrize("phrase", VLMEVALKIT_REFUSALS)
@pytest.mark.parametrize("around", ["{}", "{} B", "B. {}", "The answer is C. {}", "(A) {} (D)", "{}\nA dog."])
def test_each_vlmevalkit_refusal_phrase_is_z_wherever_it_stands(phrase, around):
    """Alone, before or after a letter the rules would read, beside option texts: "Z" (checked
    before any letter rule, line 28-30), for the model's answer and for a judge's reply alike."""
    from meteor.eval.official.mmbench_judge import read_judge_reply

    answer = around.format(phrase)
    assert mmbench_can_infer(answer, OPTIONS) == "Z"
    assert extract_choice(answer, OPTIONS, "mmbench") is None        # "Z" picks no option
    assert read_judge_reply(answer, OPTIONS) == "Z"                  # a judge refusing decides too


@pytest.mark.parametrize("phrase", VLMEVALKIT_REFUSALS)
def test_a_refused_variant_decides_its_mmbench_question_wrong_without_the_judge(phrase):
    from meteor.eval.official.mmbench_judge import circular_verdict

    def judge(row):
        raise AssertionError(f"the judge was asked about {row['prediction']!r}")

    variants = [{"question_id": k, "round": k, "options": OPTIONS, "answer": "BCDA"[k], "prediction": prediction}
                for k, prediction in enumerate(["B", phrase, "D", "A"])]
    verdict = circular_verdict(variants, judge)
    assert (verdict.hit, verdict.stage, verdict.letters[1]) == (False, "rule", "Z")


@pytest.mark.parametrize("answer, read_as", [
    ("Failed to obtain answer via API. Cannot determine the answer", None),  # the API marker is checked first
    ("I\u2019m sorry, but without the image provided", None),                  # a typographic apostrophe: not the phrase
    ("cannot determine the answer", None),                                     # case-sensitive
])
def test_only_vlmevalkits_exact_refusal_phrases_give_z(answer, read_as):
    assert mmbench_can_infer(answer, OPTIONS) == read_as


@pytest.mark.parametrize("answer, read_as", [
    ("I cannot determine the answer", None),          # phrases match exactly: "cannot" is not "Cannot"
    ("I cannot tell", None),                          # not on the list at all
    ("Sorry, I can't help", None),
])
def test_mmbench_refusals_are_only_the_listed_phrases(answer, read_as):
    assert mmbench_can_infer(answer, OPTIONS) == read_as


@pytest.mark.parametrize("answer, read_as", [
    ("A is wrong, so the answer is C", "C"),          # two letters: "answer is X" decides (lines 57-59)
    ("The correct answer is **D**. Here is why: a fish swims and a dog does not", "D"),
    ("the answer is b", "B"),                         # case-insensitive
    ("The answer is bird", "B"),                      # no word boundary: "b" of "bird" (VLMEvalKit's reading)
    ("C or D? The answer is E", None),                # only A-D, and only an option
])
def test_mmbench_reads_answer_is_x_when_the_token_rules_do_not_decide(answer, read_as):
    assert mmbench_can_infer(answer, OPTIONS) == read_as


def test_mmbench_searches_option_texts_only_in_answers_up_to_twice_their_length():
    assert 2 * sum(len(text) for text in OPTIONS.values()) == 28
    assert mmbench_can_infer("I think it is a bird", OPTIONS) == "C"                    # 20 characters
    assert mmbench_can_infer("Looking closely, I would say it is a bird", OPTIONS) is None   # 41 > 28


@pytest.mark.parametrize("options, error, words", [
    ({}, ValueError, "empty"),
    ({"a": "dog"}, ValueError, "uppercase letters"),
    ({"AB": "dog"}, ValueError, "uppercase letters"),
    ({"A": 1}, TypeError, r"options\['A'\]"),
    (["dog", "cat"], TypeError, "map letters"),
])
def test_extract_choice_refuses_bad_options(options, error, words):
    with pytest.raises(error, match=words):
        extract_choice("A", options, "mmbench")


def test_extract_choice_refuses_unknown_benchmarks_and_non_text():
    with pytest.raises(ValueError, match="'mmbench', 'mmmu'.*'seed'"):
        extract_choice("A", OPTIONS, "seed")
    with pytest.raises(TypeError, match="prediction must be a str"):
        extract_choice(3, OPTIONS, "mmmu")
    assert choice.BENCHMARKS == ("mmbench", "mmmu")
