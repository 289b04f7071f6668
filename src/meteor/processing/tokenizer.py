"""What the processor needs of a tokenizer, and saving one so it tokenises as it did.

- ``prepare_tokenizer``: the image placeholder as a special token (added where missing), a pad token
  where the tokenizer has none, and checks that the placeholder and EOS read as one id inside text.
- ``separator_ids``: the ids a slice or row separator has inside running text.
- ``save_tokenizer``: write a tokenizer's files so that, loaded back and prepared, it tokenises exactly
  as before (checked by reloading).
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Sequence

from meteor.processing.conversation import VICUNA_SYSTEM


def prepare_tokenizer(tokenizer, image_token: str) -> int:
    """What the processor adds to a tokenizer, the same when it is built and when it is loaded: the
    image placeholder (`ensure_image_token`) and, where the tokenizer has none, a pad token (LLaMA
    and Vicuna ship none; LLaVA pads with unk, and padded positions are masked anyway). Returns the
    placeholder's id. Also checks that the placeholder and EOS each read as one id inside text."""
    token_id = ensure_image_token(tokenizer, image_token)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} {tokenizer.name_or_path!r} has no end-of-sequence token, "
                         f"which ends every answer: give it one (eos_token in tokenizer_config.json)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    for name, text, expected in (("image placeholder", image_token, token_id),
                                 ("end-of-sequence token", tokenizer.eos_token, tokenizer.eos_token_id)):
        ids = tokenizer(f"a{text}b", add_special_tokens=False)["input_ids"]
        if ids.count(expected) != 1:
            raise ValueError(f"the {name} {text!r} does not tokenise as its one id {expected} inside "
                             f"text with {type(tokenizer).__name__} {tokenizer.name_or_path!r} (got "
                             f"{tokenizer.convert_ids_to_tokens(ids)}): it must be a special token")
    return token_id


def separator_ids(tokenizer, separator: str) -> list[int]:
    """The ids ``separator`` has inside running text: the ids that ``context + separator`` has
    beyond ``context``'s, for several contexts, which must agree. (Tokenised alone or after a
    special token, a sentencepiece tokenizer would prefix it with "▁".)"""
    if not separator:
        return []
    found: Counter = Counter()
    for context in ("a", "image", "The answer is x"):
        base = tokenizer(context, add_special_tokens=False)["input_ids"]
        full = tokenizer(context + separator, add_special_tokens=False)["input_ids"]
        if len(full) > len(base) and full[:len(base)] == base:
            found[tuple(full[len(base):])] += 1
    if not found or found.most_common(1)[0][1] < 2:
        raise ValueError(f"{type(tokenizer).__name__} {tokenizer.name_or_path!r} gives the separator "
                         f"{separator!r} no stable ids inside text (it merges with the text before it): "
                         f"choose another slice_separator / row_separator in MeteorConfig")
    return list(found.most_common(1)[0][0])


def ensure_image_token(tokenizer, image_token: str) -> int:
    """Add the image placeholder as a special token if the tokenizer lacks it; return its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"could not register {image_token!r} as a token of {type(tokenizer).__name__}")
    return token_id


TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "tekken.json",
                   "chat_template.jinja", "chat_template.json", "additional_chat_templates")
"""File names a Hugging Face tokenizer folder may hold (its class may name more)."""

_PROBES = (
    f"{VICUNA_SYSTEM} USER: <image>\nWhat is in the image? ASSISTANT: a red circle</s>USER: And? ASSISTANT:",
    " leading space,  two spaces\n\nnew lines\ttab <image>, <image>\n<image> 0123456789",
    "Ünïcödé café 中文 ½ → <s>x</s> <unk> ▁marker",
)


def tokenizer_difference(expected, actual) -> str | None:
    """How ``actual`` tokenises differently from ``expected`` (vocabulary, special tokens, chat
    template, ids of a few probe texts), in words; None if it does not."""
    if expected.get_vocab() != actual.get_vocab():
        extra = sorted(set(actual.get_vocab()) ^ set(expected.get_vocab()))[:5]
        return f"has another vocabulary ({len(actual)} vs {len(expected)} tokens; e.g. {extra})"
    for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        if getattr(expected, name) != getattr(actual, name):
            return f"has {name} {getattr(actual, name)} instead of {getattr(expected, name)}"
    if getattr(expected, "chat_template", None) != getattr(actual, "chat_template", None):
        return "has another chat template"
    for text in _PROBES:
        for special in (True, False):
            want = expected(text, add_special_tokens=special)["input_ids"]
            got = actual(text, add_special_tokens=special)["input_ids"]
            if want != got:
                return (f"tokenises {text!r} as {actual.convert_ids_to_tokens(got)} instead of "
                        f"{expected.convert_ids_to_tokens(want)}")
    return None


def _tokenizer_source(tokenizer) -> Path | None:
    """The local folder the tokenizer was loaded from, if any: its ``name_or_path``, or for one
    loaded by hub name, the cached folder its vocabulary file lies in."""
    kwargs = getattr(tokenizer, "init_kwargs", {}) or {}
    files = [kwargs.get(key) for key in ("vocab_file", "tokenizer_file")]
    candidates = [getattr(tokenizer, "name_or_path", "")] + [str(Path(f).parent) for f in files if f]
    for name in candidates:
        folder = Path(name) if name else None
        if folder is not None and folder.is_dir() and any((folder / f).exists() for f in TOKENIZER_FILES):
            return folder
    return None


def _copy_tokenizer_files(source: Path, out: str | Path, names: Sequence[str] = TOKENIZER_FILES) -> None:
    for name in names:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, Path(out) / name, dirs_exist_ok=True)
        elif path.is_file():
            shutil.copy2(path, Path(out) / name)


def save_tokenizer(tokenizer, folder: str | Path, image_token: str) -> None:
    """Write ``tokenizer`` into ``folder`` so that loading it back (``AutoTokenizer``, then
    ``prepare_tokenizer`` with ``image_token``) tokenises exactly as it does now, checked by reloading.

    A tokenizer loaded from a folder is saved as the files it came from, copied as they are:
    re-serialising can change it (transformers 5 writes a sentencepiece LLaMA tokenizer back as
    another tokenizer.json, without ``legacy``, which splits text differently). One built in memory
    is saved with its own ``save_pretrained``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = _tokenizer_source(tokenizer)
    names = TOKENIZER_FILES + tuple(getattr(tokenizer, "vocab_files_names", {}).values())
    attempts = ([("its original files", lambda out: _copy_tokenizer_files(source, out, names))] if source else [])
    attempts.append(("save_pretrained", tokenizer.save_pretrained))
    problems = []
    for how, write in attempts:
        with tempfile.TemporaryDirectory() as scratch:
            write(scratch)
            problem = _reload_difference(tokenizer, scratch, image_token)
            if problem is None:
                _copy_tokenizer_files(Path(scratch), folder, names=[p.name for p in Path(scratch).iterdir()])
                return
        problems.append(f"saved with {how}, it {problem}")
    raise ValueError(f"the tokenizer {tokenizer.name_or_path or type(tokenizer).__name__} cannot be saved so "
                     f"that it tokenises as it does now ({'; '.join(problems)}): build the model from the "
                     f"tokenizer's folder (tokenizer=PATH) instead of a modified tokenizer object")


def _reload_difference(tokenizer, folder: str | Path, image_token: str) -> str | None:
    """How the tokenizer saved in ``folder``, once loaded and prepared, differs from ``tokenizer``;
    None if it does not."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(folder)
        prepare_tokenizer(loaded, image_token)
    except (OSError, ValueError, TypeError) as err:
        return f"does not load ({err})"
    return tokenizer_difference(tokenizer, loaded)
