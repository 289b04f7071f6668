"""Argument checks shared by the metric functions: each error names the argument and what was given."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def require_text(name: str, value: object) -> str:
    """Return ``value`` if it is a ``str``; otherwise raise a ``TypeError`` that names ``name``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}: {value!r:.80}")
    return value


def require_texts(name: str, values: object, *, at_least: int = 1) -> list[str]:
    """Return ``values`` as a list of ``str``, refusing a bare string, non-strings and short lists.

    A bare ``str`` is refused on purpose: it is iterable, and ``anls("7", "17")`` would otherwise
    compare against the answers ``"1"`` and ``"7"`` without a word.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(values).__name__}: {values!r:.80}")
    texts = list(values)
    for index, value in enumerate(texts):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{index}] must be a str, got {type(value).__name__}: {value!r:.80}")
    if len(texts) < at_least:
        raise ValueError(f"{name} needs at least {at_least} entr{'y' if at_least == 1 else 'ies'}, "
                         f"got {len(texts)}")
    return texts


def require_options(options: object) -> dict[str, str]:
    """Return the letter → option-text mapping of a multiple-choice question, checked.

    Keys must be single uppercase letters (``"A"``…``"Z"``), as both MMBench and MMMU label their
    options; values must be the option texts.
    """
    if not isinstance(options, Mapping):
        raise TypeError(f"options must map letters to option texts, e.g. {{'A': 'cat', 'B': 'dog'}}, "
                        f"got {type(options).__name__}: {options!r:.80}")
    if not options:
        raise ValueError("options is empty: a multiple-choice question needs at least one option")
    for letter, text in options.items():
        if not (isinstance(letter, str) and len(letter) == 1 and "A" <= letter <= "Z"):
            raise ValueError(f"option keys must be single uppercase letters 'A'..'Z', got {letter!r}")
        if not isinstance(text, str):
            raise TypeError(f"options[{letter!r}] must be the option text (str), "
                            f"got {type(text).__name__}: {text!r:.80}")
    return dict(options)
