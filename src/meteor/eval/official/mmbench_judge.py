"""MMBench's two-stage answer matching, circular evaluation included, as VLMEvalKit runs it.

Source: github.com/open-compass/VLMEvalKit, checked at commit e8e78f05 (2026-08-18):
``vlmeval/dataset/utils/multiple_choice.py`` (``build_prompt`` lines 224-241,
``extract_answer_from_item`` 359-405, ``prefetch_circular_group`` 409-428, ``eval_circular_group``
441-472), ``build_option_str`` of ``vlmeval/smp/vlm.py`` (174-179), with ``can_infer`` of
``vlmeval/utils/matching_util.py`` as the rule (``meteor.eval.metrics.mmbench_can_infer``).

1. **Rule stage** (``prefetch_circular_group``): every variant (rotation) of a question is read by
   ``can_infer``. One variant read as a wrong letter (or "Z", a refusal) decides the question:
   wrong. Every variant read as its right letter decides it: right.
2. **Judge stage** (``eval_circular_group``): otherwise the variants the rule could not read are
   sent, in rotation order, to a GPT judge with the official prompt (below); its reply is read by
   ``can_infer`` again ("Z": none of the options, a decision). A reply that cannot be read is asked
   again, up to three attempts in all (VLMEvalKit's ``retry = 3``; its judge runs at temperature 0).
   The first variant judged wrong ends the question (the later ones are not sent).
3. **Failure**: three unreadable replies. VLMEvalKit then draws a random option; here the variant,
   hence the question, counts as wrong. Without a judge at all (VLMEvalKit's ``exact_matching``
   policy) a question that reaches stage 2 counts as wrong too.

Each question's verdict names the stage that decided it: ``"rule"``, ``"judge"``, ``"failed"``
(the judge gave no readable reply) or ``"unjudged"`` (stage 2 was needed but no judge was
configured). With any "failed" or "unjudged" question, the accuracy is a lower bound on the
official one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from meteor.eval.metrics import mmbench_can_infer

JUDGE_ATTEMPTS = 3
JUDGE_TEMPERATURE = 0.0
JUDGE_MAX_TOKENS = 1024
"""VLMEvalKit's judge (``OpenAIWrapper``) runs at temperature 0 with a reply budget of 1024 tokens
(2048 in later versions): far more than a letter, so a chatty reply is read whole, not cut."""
API_FAILURE = "Failed to obtain answer via API"
STAGES = ("rule", "judge", "failed", "unjudged")

# build_prompt of VLMEvalKit, English version (MMBench-CN's Chinese prompt is not used here). The
# "?" after the question is the original's: it is added even when the question ends with one.
JUDGE_PROMPT = (
    "You are an AI assistant who will help me to match an answer with several options of a single-choice "
    "question. You are provided with a question, several options, and an answer, and you need to find which "
    "option is most similar to the answer. If the meaning of all options are significantly different from the "
    "answer, output Z. Your should output a single uppercase character in A, B, C, D (if they are valid "
    "options), and Z. \n"
    "Example 1: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\n"
    "Example 2: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: Spider\nYour output: Z\n"
    "Example 3: \n"
    "Question: {question}?\nOptions: {options}\nAnswer: {prediction}\nYour output: "
)

Judge = Callable[[str, float], str]
"""(prompt, temperature) → the judge's reply text; ``mmvet.OpenAIGrader`` is one."""


def judge_prompt(question: str, options: dict[str, str], prediction: str) -> str:
    """The official judge prompt for one variant: its question (the TSV's ``question`` cell,
    without the hint), its options in the order shown, and the model's answer."""
    # build_option_str: a header line, then one "A. text" line per option, each ending in "\n".
    listed = "There are several options: \n" + "".join(f"{letter}. {text}\n" for letter, text in options.items())
    return JUDGE_PROMPT.format(question=question, options=listed, prediction=prediction)


def read_judge_reply(reply: str, options: dict[str, str]) -> str | None:
    """An option letter or "Z" read from the judge's reply by ``can_infer``; None if unreadable
    (including VLMEvalKit's API-failure marker)."""
    if API_FAILURE in reply:
        return None
    return mmbench_can_infer(reply, options)


@dataclass
class JudgeCall:
    """What the judge said about one variant's answer."""

    letter: str | None
    """The letter read from a reply ("Z": none of the options), or None after every attempt failed."""
    replies: list[str] = field(default_factory=list)


def ask_judge(judge: Judge, question: str, options: dict[str, str], prediction: str) -> JudgeCall:
    """Up to ``JUDGE_ATTEMPTS`` calls until a reply can be read (``extract_answer_from_item``)."""
    prompt = judge_prompt(question, options, prediction)
    replies = []
    for _ in range(JUDGE_ATTEMPTS):
        replies.append(judge(prompt, JUDGE_TEMPERATURE))
        letter = read_judge_reply(replies[-1], options)
        if letter is not None:
            return JudgeCall(letter, replies)
    return JudgeCall(None, replies)


@dataclass
class CircularVerdict:
    """One MMBench question (all its variants) after matching."""

    hit: bool
    stage: str
    """Which stage decided the question: one of ``STAGES``."""
    letters: dict[Any, str | None]
    """question_id → the letter each variant was read as (None: not read, or not reached)."""
    stages: dict[Any, str]
    """question_id → how that variant's letter was obtained ("rule", "judge", "failed",
    "unjudged", or "skipped" where the question was decided before the variant was needed)."""


VariantJudge = Callable[[dict[str, Any]], JudgeCall]
"""Judges one prediction row (``ask_judge`` on its question, options and prediction, maybe cached)."""


def circular_verdict(variants: Sequence[dict[str, Any]], judge: VariantJudge | None) -> CircularVerdict:
    """The official circular decision over one question's variants (rows with ``question_id``,
    ``round``, ``options``, ``answer`` and ``prediction``), in rotation order."""
    variants = sorted(variants, key=lambda row: row["round"])
    rule = {row["question_id"]: mmbench_can_infer(row["prediction"], row["options"]) for row in variants}
    stages = {qid: "rule" if letter is not None else "skipped" for qid, letter in rule.items()}
    letters = dict(rule)
    if any(letter is not None and letter != row["answer"] for row, letter in zip(variants, rule.values())):
        return CircularVerdict(False, "rule", letters, stages)
    if all(letter is not None for letter in rule.values()):
        return CircularVerdict(True, "rule", letters, stages)
    if judge is None:
        for qid, letter in rule.items():
            if letter is None:
                stages[qid] = "unjudged"
        return CircularVerdict(False, "unjudged", letters, stages)
    for row in variants:
        qid = row["question_id"]
        if rule[qid] is not None:
            continue
        call = judge(row)
        letters[qid] = call.letter
        if call.letter is None:
            stages[qid] = "failed"
            return CircularVerdict(False, "failed", letters, stages)
        stages[qid] = "judge"
        if call.letter != row["answer"]:
            return CircularVerdict(False, "judge", letters, stages)
    return CircularVerdict(True, "judge", letters, stages)


def stage_counts(verdicts: Sequence[CircularVerdict]) -> dict[str, int]:
    """How many questions each stage decided, every stage listed."""
    return {stage: sum(v.stage == stage for v in verdicts) for stage in STAGES}
