"""VQA soft accuracy (VQAv2, VizWiz, TextVQA) and the official answer normalisation.

Two official tools score these benchmarks, and they differ in when they normalise:

* ``vqa_accuracy`` follows the VQA API's evaluator, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
  of github.com/GT-Vision-Lab/VQA (master), the script behind the VQAv2 and VizWiz servers.
* ``textvqa_accuracy`` follows ``TextVQAAccuracyEvaluator`` of ``m4c_evaluator.py`` (MMF/pythia,
  copied into LLaVA as ``llava/eval/m4c_evaluator.py``), which is how LLaVA scores TextVQA val.

Both average ``min(1, matches / 3)`` over the leave-one-out subsets of the human answers; see
``vqa_accuracy`` for the arithmetic and the case of fewer than ten answers.
"""

from __future__ import annotations

import re

from meteor.eval.metrics._checks import require_text, require_texts

# The evaluator's contraction map, applied word by word after lower-casing. Kept verbatim, quirks
# included: "Im", "Ive", "Id've" and "I'dve" have capitals and so can never match, and
# "somebody'd" maps *to* "somebodyd".
_CONTRACTIONS = dict(pair.split(":") for pair in """
    aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
    couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
    hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
    howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
    itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
    mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
    neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
    'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
    shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
    somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll
    somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've
    someonell:someone'll someones:someone's somethingd:something'd somethingd've:something'd've
    something'dve:something'd've somethingll:something'll thats:that's thered:there'd
    thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
    theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
    wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll
    whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
    whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
    whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've
    wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll
    y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd
    youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've
""".split())

# "none" counts as a number word too: the evaluator turns the answer "none" into "0".
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# Neither ":" nor "'" is in the list: "don't" keeps its apostrophe, "12:30" its colon.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a look-*ahead* typo for a
# look-behind and never fails at a ".", so a period goes unless a digit follows it ("1.5" stays,
# "5." loses it, "U.S." becomes "US").
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official call passes ``re.UNICODE`` (== 32) where ``sub`` takes its ``count``: only the
# first 32 such periods are removed.
_PERIODS_REMOVED_AT_MOST = 32


def _unwrap(text: str) -> str:
    """Tabs and newlines to spaces, then strip: done to every answer before anything else."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """``processPunctuation`` of vqaEval.py (GT-Vision-Lab/VQA).

    Each mark is decided once for the whole answer: it is deleted everywhere if it touches a space
    somewhere ("red, white") or if the answer holds a digit-comma-digit ("1,000"); otherwise every
    occurrence becomes a space ("e-mail" → "e mail"). Then periods not followed by a digit go.
    """
    delete_every_mark = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # The decision reads the answer as given, not as already rewritten by earlier marks.
        if delete_every_mark or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIODS_REMOVED_AT_MOST)


def _process_digit_article(text: str) -> str:
    """``processDigitArticle`` of vqaEval.py: lower-case, number words to digits, drop articles,
    restore contractions, one space between words."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_normalize(answer: str) -> str:
    """An answer as the official VQA evaluator normalises it before comparing.

    Follows ``vqaEval.py`` of github.com/GT-Vision-Lab/VQA: tabs/newlines to spaces and strip, then
    ``processPunctuation`` (marks deleted or spaced, see below; periods dropped unless a digit
    follows) and ``processDigitArticle`` (lower-case; "zero".."ten" and "none" → digits; "a",
    "an", "the" dropped; "dont" → "don't" and the rest of the contraction map).

    Quirks kept on purpose: a mark is deleted everywhere when it touches a space anywhere or when
    the answer holds a digit-comma-digit, otherwise replaced by spaces ("e-mail" → "e mail", but
    "e-mail 1,000" → "email 1000"); only the first 32 periods are removed; "Im" is not restored.

    >>> vqa_normalize("Two dogs.")
    '2 dogs'
    """
    require_text("answer", answer)
    return _process_digit_article(_process_punctuation(_unwrap(answer)))


def evalai_normalize(answer: str) -> str:
    """An answer as LLaVA's ``EvalAIAnswerProcessor`` normalises it (m4c_evaluator.py, from MMF/pythia).

    This is what LLaVA applies to VQAv2 and VizWiz predictions before uploading them
    (``scripts/convert_vqav2_for_submission.py``, ``convert_vizwiz_for_submission.py``) and to
    both sides of every TextVQA comparison. It is ``vqa_normalize`` preceded by a tokenising step:
    lower-case, delete every "," and "?", and split "'s" off the word before it ("it's" → "it 's").
    Because the commas are gone first, the digit-comma-digit rule of ``vqa_normalize`` never fires.
    """
    require_text("answer", answer)
    tokenised = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return _process_digit_article(_process_punctuation(_unwrap(tokenised)))


def _human_answers(answers: object) -> list[str]:
    """The human answers, checked: a list of at least two strings."""
    humans = require_texts("answers", answers)
    if len(humans) == 1:
        raise ValueError(f"answers has a single human answer ({humans[0]!r}): the leave-one-out "
                         "average of VQA accuracy would score every prediction 0; pass all the "
                         "human answers, or use exact_match for single-answer benchmarks")
    return humans


def _leave_one_out_accuracy(prediction: str, humans: list[str]) -> float:
    """Mean over the leave-one-out subsets of the human answers of ``min(1, matches / 3)``."""
    matches = sum(human == prediction for human in humans)
    per_subset = [min(1.0, (matches - (human == prediction)) / 3) for human in humans]
    return sum(per_subset) / len(per_subset)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 / VizWiz soft accuracy of one prediction against its human answers, in [0, 1].

    Follows ``VQAEval.evaluate`` of ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` in
    github.com/GT-Vision-Lab/VQA (master):

    1. Prediction and answers get tabs/newlines turned into spaces and are stripped.
    2. Only if the human answers are not all identical are they *and the prediction* normalised
       (``vqa_normalize``). When all humans agree, the comparison is on the raw strings, so
       ``"Yes"`` or ``"yes."`` scores 0 against ten ``"yes"``. LLaVA sidesteps this by normalising
       predictions before upload; call ``vqa_accuracy(evalai_normalize(p), answers)`` to reproduce
       its VQAv2/VizWiz pipeline.
    3. For each human answer, leave it out, count the matches ``m`` among the others, score
       ``min(1, m / 3)``; return the mean of these scores.

    With ``n`` answers of which ``k`` equal the prediction this is
    ``(k·min(1, (k−1)/3) + (n−k)·min(1, k/3)) / n``; for ``n = 10``: k = 0, 1, 2, 3, ≥4 give
    0, 0.3, 0.6, 0.9, 1.0.

    Fewer than ten answers: the official loop does not check the count and neither does this
    function; the formula above applies as is (three unanimous answers give 2/3, and 1.0 needs at
    least four matches). One answer is refused: its only leave-one-out subset is empty, so every
    prediction would score 0 — use ``exact_match`` for single-answer benchmarks.

    The official evaluator on the EvalAI VQA 2017 challenge (github.com/Cloud-CV/VQA-Challenge)
    differs: it always normalises the prediction, with a regex version of the punctuation step.
    """
    require_text("prediction", prediction)
    humans = [_unwrap(answer) for answer in _human_answers(answers)]
    predicted = _unwrap(prediction)
    if len(set(humans)) > 1:
        humans = [_process_digit_article(_process_punctuation(human)) for human in humans]
        predicted = _process_digit_article(_process_punctuation(predicted))
    return _leave_one_out_accuracy(predicted, humans)


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
    """TextVQA soft accuracy as LLaVA's ``llava/eval/eval_textvqa.py`` computes it, in [0, 1].

    Follows ``TextVQAAccuracyEvaluator`` of ``m4c_evaluator.py`` (MMF/pythia): the prediction and
    every human answer always go through ``evalai_normalize``, then the leave-one-out average of
    ``vqa_accuracy`` (step 3) is taken. Unlike ``vqa_accuracy`` there is no "all humans agree"
    shortcut, so ``"Coca-Cola"`` scores 1.0 against ten ``"coca cola"``.

    The original asserts exactly ten answers; here any count of two or more is accepted with the
    arithmetic documented in ``vqa_accuracy``, and a single answer is refused for the same reason.
    """
    require_text("prediction", prediction)
    humans = [evalai_normalize(answer) for answer in _human_answers(answers)]
    return _leave_one_out_accuracy(evalai_normalize(prediction), humans)
