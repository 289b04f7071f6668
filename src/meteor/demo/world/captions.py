"""Stage-1 captions: a request from a few templates, and a caption that lists every shape and text."""

from __future__ import annotations

import random
import re
from collections import Counter

from meteor.demo.world.config import PLURALS
from meteor.demo.world.scene import Scene, SceneText

CAPTION_REQUESTS = (
    "Describe the image briefly.",
    "Give a short caption for this image.",
    "What does this picture show?",
    "Summarize the image in one sentence.",
    "Write a brief description of the image.",
)

BACKGROUND_PHRASES = {"plain": "a plain light background", "noise": "a lightly textured background",
                      "gradient": "a softly shaded background"}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")


def caption_request(rng: random.Random) -> str:
    return rng.choice(CAPTION_REQUESTS)


def caption(scene: Scene) -> str:
    """E.g. 'A large red circle, two small blue squares and a medium green star on a plain light
    background. The word "CAT" is written in small grey letters near the top left.'

    Shapes are grouped by (size, colour, shape) in reading order of their first member (top to
    bottom, then left to right); texts follow in reading order with where they are."""
    objects = sorted(scene.objects, key=lambda o: (_centre(o.bbox)[1], _centre(o.bbox)[0]))
    groups = Counter((o.size, o.colour, o.shape) for o in objects)  # insertion order = reading order
    phrases = []
    for (size, colour, shape), count in groups.items():
        if count == 1:
            phrases.append(f"{article(size)} {size} {colour} {shape}")
        else:
            phrases.append(f"{NUMBER_WORDS[count]} {size} {colour} {PLURALS[shape]}")
    sentences = [f"{join_phrases(phrases)} on {BACKGROUND_PHRASES[scene.background]}."]
    if not phrases:
        sentences = [f"Nothing but text on {BACKGROUND_PHRASES[scene.background]}."]
    texts = sorted(scene.texts, key=lambda t: (_centre(t.bbox)[1], _centre(t.bbox)[0]))
    for text in texts:
        sentences.append(f"{_upper_first(text_name(text))} is written in small grey letters "
                         f"{region_phrase(text.bbox, scene.width, scene.height)}.")
    sentences[0] = _upper_first(sentences[0])
    return " ".join(sentences)


def text_name(text: SceneText) -> str:
    return f'the {text.kind} "{text.text}"'


def item_phrases(meta: dict) -> list[tuple[tuple[int, int, int, int], str]]:
    """Each shape and text of a record's ``meta`` with its box and the phrase that names it alone,
    e.g. ((62, 40, 89, 67), "a large orange cross") or ((14, 3, 53, 17), 'the word "SUN"'): the
    regions of the CLIP's region–phrase loss (``meteor.demo.clip``)."""
    items = [(tuple(o["bbox"]), f"{article(o['size'])} {o['size']} {o['colour']} {o['shape']}")
             for o in meta["objects"]]
    return items + [(tuple(t["bbox"]), f'the {t["kind"]} "{t["text"]}"') for t in meta["texts"]]


def scene_line(meta: dict) -> str:
    """A record's ``meta`` (``Scene.to_meta``) as one line of text: shapes in reading order, then
    texts, each with where it is ("Scene: large red star near the top left; …; word "CAT" on the
    right."). The demo's LLaMA is pretrained on scenes written this way; scene distillation puts it
    where the image was."""
    width, height = meta["size"]
    objects = sorted(meta["objects"], key=lambda o: (_centre(o["bbox"])[1], _centre(o["bbox"])[0]))
    parts = [f'{o["size"]} {o["colour"]} {o["shape"]} {region_phrase(o["bbox"], width, height)}' for o in objects]
    parts += [f'{t["kind"]} "{t["text"]}" {region_phrase(t["bbox"], width, height)}' for t in meta["texts"]]
    return "Scene: " + "; ".join(parts) + "."


def region_phrase(bbox: tuple[int, int, int, int], width: int, height: int) -> str:
    """Where a box's centre falls in the image's 3×3 grid, e.g. "near the top left", "in the centre"."""
    cx, cy = _centre(bbox)
    column = ("left", "", "right")[min(2, int(3 * cx / width))]
    row = ("top", "", "bottom")[min(2, int(3 * cy / height))]
    if row and column:
        return f"near the {row} {column}"
    if row:
        return f"near the {row}"
    if column:
        return f"on the {column}"
    return "in the centre"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def join_phrases(phrases: list[str]) -> str:
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _centre(bbox: tuple[int, int, int, int]) -> tuple[float, float]:
    return (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2


# --- foils: hard negatives for contrastive training ---------------------------------------------------

def _foil_kinds() -> dict[str, tuple[str, ...]]:
    from meteor.demo.world.config import COLOURS, SHAPES, SIZES
    return {"shape": SHAPES, "plural": tuple(PLURALS[s] for s in SHAPES), "colour": tuple(COLOURS),
            "size": tuple(SIZES), "count": NUMBER_WORDS[2:7]}


_FOIL_PATTERN = re.compile(r'"[^"]+"|[A-Za-z]+')


def foil_caption(text: str, rng: random.Random) -> str | None:
    """``text`` with one detail made false: a shape, colour, size, count word or written text
    swapped for another value of its kind (a word for another word, a number for another number of
    as many digits). A hard negative for contrastive training (NegCLIP-style), so a caption cannot
    be matched by its colours alone. None when the caption names nothing swappable."""
    kinds = _foil_kinds()
    candidates = []
    for match in _FOIL_PATTERN.finditer(text):
        token = match.group()
        if token.startswith('"'):
            candidates.append((match, "text"))
            continue
        for kind, values in kinds.items():
            if token.lower() in values:
                candidates.append((match, kind))
                break
    if not candidates:
        return None
    kind = rng.choice(sorted({kind for _, kind in candidates}))     # each kind as likely, then a mention
    match, kind = rng.choice([c for c in candidates if c[1] == kind])
    token = match.group()
    if kind == "text":
        inner = token[1:-1]
        if inner.isdigit():
            while (new := "".join(rng.choice("0123456789") for _ in inner)) == inner or \
                    (len(new) > 1 and new[0] == "0"):
                pass
        else:
            from meteor.demo.world.config import WORDS
            new = rng.choice([w for w in WORDS if w != inner])
        replacement = f'"{new}"'
    else:
        replacement = rng.choice([v for v in kinds[kind] if v != token.lower()])
        if token[0].isupper():
            replacement = _upper_first(replacement)
    result = text[:match.start()] + replacement + text[match.end():]
    return _fix_articles(result)


def _fix_articles(text: str) -> str:
    """'a orange' → 'an orange' and 'an large' → 'a large' after a swap."""
    return re.sub(r"\b([Aa])(n?) ([a-z]+)",
                  lambda m: f"{m.group(1)}{'n' if m.group(3)[0] in 'aeiou' else ''} {m.group(3)}", text)
