"""Which option letter a free-form answer picks, by the rules of MMBench's and MMMU's evaluators.

The two benchmarks read the same answer differently; ``extract_choice`` names the rule set:

* ``"mmbench"`` — the rule stage of MMBench's official evaluator, ``can_infer`` in
  ``vlmeval/utils/matching_util.py`` of github.com/open-compass/VLMEvalKit, as of commit
  e8e78f05f3080fe28154f2130321f17951c3be94 (2026-08-18); the line numbers below are that file's.
  Where it finds no letter it would ask a GPT judge; here that is ``None`` (``mmbench_can_infer``
  tells a refusal, "Z", from an undecided answer; the judge stage itself is
  ``meteor.eval.official.mmbench_judge``).
* ``"mmmu"`` — ``parse_multi_choice_response`` in ``eval/eval_utils.py`` of
  github.com/MMMU-Benchmark/MMMU. Where it finds no letter it picks one at random; here ``None``.
"""

from __future__ import annotations

import re

from meteor.eval.metrics._checks import require_options, require_text

BENCHMARKS = ("mmbench", "mmmu")

# can_infer_option, lines 21-22: VLMEvalKit's marker of a failed API call; no letter is read from it.
_MMBENCH_API_FAILURE = "Failed to obtain answer via API"
# Lines 24-30: an answer containing one of these (exact, case-sensitive substrings) is a refusal,
# read as "Z" before any letter rule runs. Nothing else counts as one ("I cannot tell" does not).
_MMBENCH_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                     "I'm sorry, but without the image provided", "Cannot determine the answer")
# Lines 40-44: these characters become spaces before the answer is split on white space.
_MMBENCH_SEPARATORS = str.maketrans(dict.fromkeys(".()[],:;!*#{}", " "))
# Line 52: a lone option letter counts only if its first occurrence is among the answer's last
# four tokens (index > number of tokens - 5); in an answer of four tokens or fewer, anywhere.
_MMBENCH_LAST_TOKENS = 4
# Line 15, used at lines 57-59: "answer is X", case-insensitive, X one of A-D with optional "*"
# around, read from the answer as written. It has no word boundary after X: "the answer is a
# dog" reads "a" as A.
_MMBENCH_ANSWER_IS = re.compile(r"answer\s+is\s+\**([a-d])", re.IGNORECASE)
_MMBENCH_NO_OPTION = "Z"

_MMMU_EDGE_MARKS = (",", ".", "!", "?", ";", ":", "'")
_MMMU_CONTENT_MIN_WORDS = 6  # option texts are searched only in answers of more than 5 words


def _mmbench_letter(prediction: str, options: dict[str, str]) -> str | None:
    """``can_infer_option`` (lines 18-61): an option letter, "Z" for a refusal, or None.

    1. The API-failure marker: None. A refusal phrase anywhere: "Z", whatever letters follow.
    2. The separators ``.()[],:;!*#{}`` become spaces and the answer is split on white space, so
       "(B)", "B.", "B:" and "**B**" are the token "B"; "B?" and "b" are not.
    3. Exactly one option letter among the tokens: that letter, if its first occurrence is among
       the last four tokens ("The answer is B." yes; "B is my final answer" no). No option letter
       but a "Z" token: "Z".
    4. Otherwise (no letter, several, or one too early): "answer is X" with X in A-D, if X is an
       option ("A is wrong, so the answer is C" → C).

    The "A might be a quantifier" guard of the original (lines 49-51) only runs with the
    ``VERBOSE`` environment variable set; by default it is off, so "A cat." picks option A.
    """
    if _MMBENCH_API_FAILURE in prediction:
        return None
    if any(refusal in prediction for refusal in _MMBENCH_REFUSALS):
        return _MMBENCH_NO_OPTION
    words = prediction.translate(_MMBENCH_SEPARATORS).split()
    present = [letter for letter in options if letter in words]
    if len(present) == 1:
        if len(words) - words.index(present[0]) <= _MMBENCH_LAST_TOKENS:
            return present[0]
    elif not present and _MMBENCH_NO_OPTION in words:
        return _MMBENCH_NO_OPTION
    stated = _MMBENCH_ANSWER_IS.search(prediction)
    if stated is not None and stated.group(1).upper() in options:
        return stated.group(1).upper()
    return None


def _mmbench_option_text(prediction: str, options: dict[str, str]) -> str | None:
    """``can_infer_text`` (lines 107-121): the one option whose text occurs in the answer
    (case-insensitive), or None. Answers longer than twice all option texts together (in
    characters, lines 109-110) are not searched: a long explanation names options in passing."""
    lowered = prediction.lower()
    if len(lowered) > 2 * sum(len(text) for text in options.values()):
        return None
    found = [letter for letter, text in options.items() if text.lower() in lowered]
    return found[0] if len(found) == 1 else None


def mmbench_can_infer(answer: str, options: dict[str, str]) -> str | None:
    """``can_infer`` itself (lines 124-127): an option letter, ``"Z"`` (a refusal, or a bare "Z":
    none of the options), or None (undecided: where MMBench's evaluator turns to its GPT judge).

    The letter rules run first, the option texts only if they find nothing. MMBench's evaluator
    reads the judge's reply with this same function, so "Z" is a decision (counted wrong), not a
    failure; ``extract_choice`` folds it into None because it only reports picked options.
    """
    require_text("answer", answer)
    checked = require_options(options)
    return _mmbench_letter(answer, checked) or _mmbench_option_text(answer, checked)


def _mmbench_choice(prediction: str, options: dict[str, str]) -> str | None:
    letter = mmbench_can_infer(prediction, options)
    # "Z" is the evaluator's "no option" verdict (refusal or a bare "Z"): no letter is picked.
    return letter if letter in options else None


def _mmmu_choice(prediction: str, options: dict[str, str]) -> str | None:
    """``parse_multi_choice_response`` without its random fallback.

    1. Strip ``, . ! ? ; : '`` from both ends, one mark after the other in that order (so "A.,"
       becomes "A" but "A,." keeps "A,"; whitespace is not stripped), and pad with a space on
       each side.
    2. Candidates are the letters written "(A)"; failing that, letters standing between two
       spaces (" A "; "A," or "A\\n" do not count); failing that, and only if the answer has more
       than 5 words, the options whose text occurs in it (case-insensitive).
    3. Several candidates: the one whose pattern ("(A)", " A " or the option text) occurs last
       wins (``rfind``); on a tie, the earlier option. No candidate: None (the original guesses).
    """
    response = prediction
    for mark in _MMMU_EDGE_MARKS:
        response = response.strip(mark)
    response = f" {response} "

    patterns = {letter: f"({letter})" for letter in options if f"({letter})" in response}
    haystack = response
    if not patterns:
        patterns = {letter: f" {letter} " for letter in options if f" {letter} " in response}
    if not patterns and len(response.split()) >= _MMMU_CONTENT_MIN_WORDS:
        haystack = response.lower()
        patterns = {letter: text.lower() for letter, text in options.items() if text.lower() in haystack}
    if not patterns:
        return None
    # max() keeps the first of equal positions, as np.argmax does in the original.
    return max(patterns, key=lambda letter: haystack.rfind(patterns[letter]))


def extract_choice(prediction: str, options: dict[str, str], benchmark: str) -> str | None:
    """The option letter a free-form answer picks under ``benchmark``'s official rules, or None.

    ``options`` maps letters to option texts in the order they were shown, e.g.
    ``{"A": "dog", "B": "cat"}``. ``benchmark`` is ``"mmbench"`` (VLMEvalKit's rule stage: see
    ``_mmbench_letter`` and ``_mmbench_option_text``; None where it would call its GPT judge or
    where it reads a refusal) or ``"mmmu"`` (MMMU's ``parse_multi_choice_response``: see
    ``_mmmu_choice``; None where it would pick at random).

    The rule sets disagree on purpose-built cases, for example with options dog/cat/bird/fish:
    "(B) because A is wrong" is B for MMMU and None for MMBench (two letters stand as words);
    "The cat" is B for MMBench (option text) and None for MMMU (too short to search texts);
    "C is more likely than D" is D for MMMU (last letter wins) and None for MMBench.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {', '.join(map(repr, BENCHMARKS))} "
                         f"(their rule sets differ), got {benchmark!r}")
    require_text("prediction", prediction)
    checked = require_options(options)
    if benchmark == "mmbench":
        return _mmbench_choice(prediction, checked)
    return _mmmu_choice(prediction, checked)
