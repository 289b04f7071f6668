"""Stage-2 and test questions with exact answers, one asker per question type.

Every question is answerable from the image alone and uniquely: an object is only named ("the
star", "the large star", "the red star") when exactly one object fits the name. Each question
carries a ``query`` (the structured meaning of its words) so an evaluator, or a test, can recompute
the answer from the scene without parsing English.

Types: ``colour``, ``count``, ``exist`` (POPE-style yes/no, balanced, with random and adversarial
absent objects), ``read`` (TextVQA-style, the small grey text), ``position`` (left/right,
above/below) and ``choice`` (MMBench-style lettered options A-D).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from meteor.demo.world.captions import article
from meteor.demo.world.config import COLOURS, PLURALS, SHAPES, WORDS, WorldConfig
from meteor.demo.world.scene import Scene, SceneObject

LETTERS = "ABCD"
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
ABSENT_COUNT_RATE = 0.15
"""Share of count questions about something absent (answer "0"), so "0" is a real answer."""
EXIST_COLOUR_RATE = 0.6
"""Share of exist questions naming colour and shape ("a red star"); the rest name a shape."""
EXIST_ADVERSARIAL_RATE = 0.75
"""Share of colour-and-shape negatives that are adversarial (near misses) rather than random."""

COLOUR_TEMPLATES = ("What colour is the {thing}?", "What is the colour of the {thing}?")
EXTREMES = {"top": "topmost", "bottom": "bottommost", "left": "leftmost", "right": "rightmost"}


@dataclass(frozen=True)
class Question:
    question_type: str
    question: str
    """The text shown to the model (without the image placeholder)."""
    answer: str
    """The gold answer: a short exact string."""
    subtype: str
    """Finer category for per-case evaluation; may depend on the answer (exist: positive / random
    / adversarial, POPE's split of the negatives)."""
    query: dict[str, Any]
    """The question's meaning: which attributes name the target(s)."""
    answer_space: int
    """Number of answers the question type admits: 1 / answer_space is chance accuracy."""
    options: tuple[str, ...] = ()
    """Choice questions: the options in letter order."""
    form: str = ""
    """The wording pattern, which a model sees without the image (e.g. "shape" for "Is there a
    star…?"); "" means the same as ``subtype``. Blind baselines group by it."""

    def to_dict(self) -> dict[str, Any]:
        data = {"question_type": self.question_type, "question": self.question, "answer": self.answer,
                "subtype": self.subtype, "form": self.form or self.subtype, "query": self.query,
                "answer_space": self.answer_space}
        if self.options:
            data["options"] = list(self.options)
        return data


@dataclass
class SplitState:
    """What balancing needs to remember across the images of one split (filled in order)."""

    type_counts: Counter = field(default_factory=Counter)
    exist_answers: Counter = field(default_factory=Counter)
    choice_letters: Counter = field(default_factory=Counter)


def ask_questions(scene: Scene, config: WorldConfig, state: SplitState) -> list[Question]:
    """``config.questions_per_image`` distinct questions about ``scene``.

    Each slot takes the type least asked so far in this image, then in the split (ties broken at
    random) that has a well-posed question here; so types stay balanced across a split even though
    some images cannot host every type."""
    rng = random.Random(f"meteor.world/{config.seed}/{scene.image_id}/questions")
    asked: list[Question] = []
    for _ in range(config.questions_per_image):
        used = Counter(q.question_type for q in asked)
        order = sorted(config.question_types, key=lambda t: (used[t], state.type_counts[t], rng.random()))
        for question_type in order:
            question = ASKERS[question_type](scene, config, state, rng)
            if question is not None and all(question.question != q.question for q in asked):
                break
        else:
            break  # nothing new can be asked about this image
        asked.append(question)
        state.type_counts[question_type] += 1
        if question_type == "exist":
            state.exist_answers[question.answer] += 1
        elif question_type == "choice":
            state.choice_letters[question.answer] += 1
    return asked


# --- naming objects -----------------------------------------------------------------------------------

def matches(obj: SceneObject, query: dict[str, Any]) -> bool:
    return all(getattr(obj, key) == value for key, value in query.items()
               if key in ("shape", "colour", "size"))


def describe(query: dict[str, Any], plural: bool = False) -> str:
    """"large red star" (size, colour, shape order); a query without a shape names "shapes"."""
    words = [query[key] for key in ("size", "colour") if key in query]
    noun = query.get("shape")
    words.append((PLURALS[noun] if plural else noun) if noun else ("shapes" if plural else "shape"))
    return " ".join(words)


def _unique_refs(scene: Scene, keys_options: tuple[tuple[str, ...], ...]) -> list[tuple[SceneObject, dict]]:
    """(object, query) for every object that the first fitting key set names uniquely."""
    refs = []
    for obj in scene.objects:
        for keys in keys_options:
            query = {key: getattr(obj, key) for key in keys}
            if sum(matches(other, query) for other in scene.objects) == 1:
                refs.append((obj, query))
                break
    return refs


# --- askers -------------------------------------------------------------------------------------------

Asker = Callable[[Scene, WorldConfig, SplitState, random.Random], "Question | None"]


def ask_colour(scene: Scene, config: WorldConfig, state: SplitState, rng: random.Random) -> Question | None:
    refs = _unique_refs(scene, (("shape",), ("size", "shape")))
    if not refs:
        return None
    obj, query = rng.choice(refs)
    text = rng.choice(COLOUR_TEMPLATES).format(thing=describe(query))
    return Question("colour", text, obj.colour, "+".join(query), query, len(COLOURS))


def ask_count(scene: Scene, config: WorldConfig, state: SplitState, rng: random.Random) -> Question | None:
    if not scene.objects:
        return None
    keys = rng.choice((("shape",), ("colour",), ("colour", "shape")))
    if rng.random() < ABSENT_COUNT_RATE:
        values = {"shape": list(SHAPES), "colour": sorted(COLOURS)}
        query = {key: rng.choice(values[key]) for key in keys}
    else:
        query = {key: getattr(rng.choice(scene.objects), key) for key in keys}
    count = sum(matches(obj, query) for obj in scene.objects)
    text = f"How many {describe(query, plural=True)} are there?"
    return Question("count", text, str(count), "+".join(keys), query, config.max_objects + 1)


def ask_exist(scene: Scene, config: WorldConfig, state: SplitState, rng: random.Random) -> Question | None:
    """POPE-style. Answers are kept 50/50 over the split, and the wording ("a star" or "a red
    star") is drawn before the answer, so the wording says nothing about it. Negatives named by
    colour and shape are adversarial (the scene's shape in a colour it lacks here, or its colour on
    a shape it lacks) three times out of four, else random (neither the shape nor the colour is
    in the image); negatives named by shape alone are random (a shape absent from the image)."""
    if not scene.objects:
        return None
    yes, no = state.exist_answers["yes"], state.exist_answers["no"]
    want_yes = yes < no or (yes == no and rng.random() < 0.5)
    by_colour = rng.random() < EXIST_COLOUR_RATE
    present = sorted({(o.shape, o.colour) for o in scene.objects})
    shapes = {o.shape for o in scene.objects}
    colours = {o.colour for o in scene.objects}
    if want_yes:
        shape, colour = rng.choice(present)
        subtype = "positive"
    elif not by_colour:
        shape, colour, subtype = rng.choice([s for s in SHAPES if s not in shapes]), None, "random"
    else:
        absent = [(s, c) for s in SHAPES for c in sorted(COLOURS) if (s, c) not in present]
        adversarial = [(s, c) for s, c in absent if s in shapes or c in colours]
        far = [(s, c) for s, c in absent if s not in shapes and c not in colours]
        near_miss = adversarial and (not far or rng.random() < EXIST_ADVERSARIAL_RATE)
        subtype = "adversarial" if near_miss else "random"
        shape, colour = rng.choice(adversarial if subtype == "adversarial" else far)
    query = {"colour": colour, "shape": shape} if by_colour else {"shape": shape}
    thing = describe(query)
    answer = "yes" if any(matches(o, query) for o in scene.objects) else "no"
    return Question("exist", f"Is there {article(thing)} {thing} in the image?", answer, subtype, query, 2,
                    form="+".join(query))


def ask_read(scene: Scene, config: WorldConfig, state: SplitState, rng: random.Random) -> Question | None:
    kinds = Counter(t.kind for t in scene.texts)
    candidates = []
    for text in scene.texts:
        if kinds[text.kind] == 1:
            candidates.append((f"What {text.kind} is written in the image?", text, text.kind,
                               {"kind": text.kind}))
        if len(scene.texts) == 1:
            candidates.append(("What is written in the image?", text, "any", {}))
        others = [t for t in scene.texts if t is not text]
        extremes = {"top": all(text.bbox[3] <= t.bbox[1] for t in others),
                    "bottom": all(text.bbox[1] >= t.bbox[3] for t in others),
                    "left": all(text.bbox[2] <= t.bbox[0] for t in others),
                    "right": all(text.bbox[0] >= t.bbox[2] for t in others)}
        for side, is_extreme in extremes.items():
            if others and is_extreme:
                candidates.append((f"What is the {EXTREMES[side]} text in the image?", text, side,
                                   {"extreme": side}))
    if not candidates:
        return None
    question, text, subtype, query = rng.choice(candidates)
    numbers = 10 ** config.number_digits
    space = {"word": len(WORDS), "number": numbers}.get(subtype, len(WORDS) + numbers)
    return Question("read", question, text.text, subtype, query, space)


def ask_position(scene: Scene, config: WorldConfig, state: SplitState, rng: random.Random) -> Question | None:
    refs = _unique_refs(scene, (("colour", "shape"),))
    pairs = []
    for a, query_a in refs:
        for b, query_b in refs:
            if a is b:
                continue
            if a.bbox[2] <= b.bbox[0] or b.bbox[2] <= a.bbox[0]:  # x-ranges disjoint
                pairs.append((query_a, query_b, "horizontal", "left" if a.bbox[2] <= b.bbox[0] else "right"))
            if a.bbox[3] <= b.bbox[1] or b.bbox[3] <= a.bbox[1]:  # y-ranges disjoint
                pairs.append((query_a, query_b, "vertical", "above" if a.bbox[3] <= b.bbox[1] else "below"))
    if not pairs:
        return None
    query_a, query_b, axis, answer = rng.choice(pairs)
    relation = "left or right of" if axis == "horizontal" else "above or below"
    text = f"Is the {describe(query_a)} {relation} the {describe(query_b)}?"
    return Question("position", text, answer, axis, {"first": query_a, "second": query_b}, 2)


def ask_choice(scene: Scene, config: WorldConfig, state: SplitState, rng: random.Random) -> Question | None:
    """MMBench-style: a colour, shape, count or word question with four lettered options; the
    correct letter is the one least used so far in the split (ties at random), so A-D stay even."""
    builders = []
    colour_refs = _unique_refs(scene, (("shape",), ("size", "shape")))
    if colour_refs:
        obj, query = rng.choice(colour_refs)
        builders.append(("colour", f"What colour is the {describe(query)}?", obj.colour, sorted(COLOURS),
                         query))
    shape_refs = _unique_refs(scene, (("colour",),))
    if shape_refs:
        obj, query = rng.choice(shape_refs)
        builders.append(("shape", f"Which shape is {obj.colour}?", obj.shape, list(SHAPES), query))
    if scene.objects:
        shape = rng.choice(sorted({o.shape for o in scene.objects}))
        count = sum(o.shape == shape for o in scene.objects)
        numbers = [str(n) for n in range(max(config.max_objects, 3) + 1)]
        builders.append(("count", f"How many {PLURALS[shape]} are there?", str(count), numbers,
                         {"shape": shape}))
    words = [t for t in scene.texts if t.kind == "word"]
    if len(words) == 1:
        unseen = [w for w in WORDS if w not in {t.text for t in scene.texts}]
        builders.append(("read", "Which word is written in the image?", words[0].text,
                         [words[0].text] + unseen, {"kind": "word"}))
    if not builders:
        return None
    subtype, question, answer, space, query = rng.choice(builders)
    options = rng.sample([v for v in space if v != answer], len(LETTERS) - 1)
    fewest = min(state.choice_letters[letter] for letter in LETTERS)
    position = rng.choice([k for k, letter in enumerate(LETTERS) if state.choice_letters[letter] == fewest])
    options.insert(position, answer)
    lines = [question] + [f"{letter}. {option}" for letter, option in zip(LETTERS, options)] + [CHOICE_SUFFIX]
    return Question("choice", "\n".join(lines), LETTERS[options.index(answer)], subtype, query, len(LETTERS),
                    options=tuple(options))


ASKERS: dict[str, Asker] = {"colour": ask_colour, "count": ask_count, "exist": ask_exist, "read": ask_read,
                            "position": ask_position, "choice": ask_choice}
