"""MMMU's reading of open (short-answer) responses: ``parse_open_response`` and ``eval_open`` of
``eval/eval_utils.py`` in github.com/MMMU-Benchmark/MMMU, rewritten as pure functions.

The quirks are the original's and are kept: the response is lower-cased *before* it is split at
". " followed by a capital letter (so that split never fires, only newlines split); "=" counts as
an answer indicator in the last sentence only; numbers are compared as floats rounded to 2
decimals; a one-character text answer matches only with a space on one side.
"""

from __future__ import annotations

import re

_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_LONE_MARKS = (":", ",", ".", "!", "?", ";", "'")
_NUMBER_PATTERNS = (re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),                 # 1,234,567
                    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),              # 1.5e-3
                    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])"))  # 3, 2.5, .5


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize(text: str) -> list[str | float]:
    """A number becomes [its float rounded to 2 places]; a text is lower-cased, and a single
    character becomes [" c", "c "] so that it only matches as a word edge."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _numbers(text: str) -> list[str]:
    return [found for pattern in _NUMBER_PATTERNS for found in pattern.findall(text)]


def _key_responses(response: str) -> list[str]:
    """The shortest tail after an answer indicator ("is ", "so ", "therefore ", …) in each sentence."""
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for position, sentence in enumerate(sentences):
        indicators = _INDICATORS + (("=",) if position == len(sentences) - 1 else ())
        tails = [sentence.split(indicator)[-1].strip() for indicator in indicators if indicator in sentence]
        if tails:
            shortest = min(tails, key=len)   # min keeps the first of equal lengths, as the original
            if shortest.strip() not in _LONE_MARKS:
                keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list[str | float]:
    """Every candidate answer MMMU reads in a free-form response (normalised, deduplicated)."""
    keys = _key_responses(response)
    candidates = keys + [number for key in keys for number in _numbers(key)]
    return list({value: None for text in candidates for value in normalize(text)})


def eval_open(answers: str | list[str], candidates: list[str | float]) -> bool:
    """Right if a text candidate contains a normalised text answer, or a number candidate equals a
    normalised number answer."""
    golds = [value for answer in ([answers] if isinstance(answers, str) else answers)
             for value in normalize(answer)]
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(gold, str) and gold in candidate for gold in golds):
                return True
        elif candidate in golds:
            return True
    return False
